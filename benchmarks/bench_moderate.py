"""Moderate sparsity (50-70% unstructured): the bitmask16 format against CSR,
torch eager and the best dense path, one table.

    python benchmarks/bench_moderate.py [--threads 1 2] [--rounds 15] [--markdown out.md]

Best dense = the fastest of eager ``F.linear``, oneDNN with a prepacked
weight (``sparsert/ops/backends/best_dense.py``) and onnxruntime (when
installed: ``pip install onnxruntime onnx``), measured in the same run.
Every method is timed round-robin in this process, median of the rounds.
With 1 thread the clock is the CPU time of this thread (robust when other
jobs share the cores); with more, wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparsert import ops  # noqa: E402
from sparsert._ext import native  # noqa: E402
from sparsert.formats import pack  # noqa: E402
from sparsert.formats.bitmask import Bitmask  # noqa: E402
from sparsert.ops.backends.best_dense import PackedDenseLinear  # noqa: E402
from sparsert.ops.backends.bitmask_cpu import linear_bitmask  # noqa: E402

from bench_dense_paths import ort_linear  # noqa: E402
from harness import cpu_name, git_commit, time_methods  # noqa: E402

SHAPES = [("A", 768, 3072), ("B", 3072, 768), ("C", 4096, 4096)]  # (label, in, out)
TOKENS = [1, 16, 128]
SPARSITIES = [0.5, 0.7]
DENSE = ("torch eager", "oneDNN prepacked", "onnxruntime")


def run(threads: int, rounds: int, shapes, tokens_list, sparsities):
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    rows = []
    for label, in_f, out_f in shapes:
        for sparsity in sparsities:
            w = torch.randn(out_f, in_f, generator=gen) * (torch.rand(out_f, in_f, generator=gen) >= sparsity)
            b = torch.randn(out_f, generator=gen)
            csr, bitmask = pack(w, "csr"), Bitmask.from_dense(w)
            best_dense = PackedDenseLinear(w, b)
            ort = ort_linear(w, b, threads)
            for tokens in tokens_list:
                x = torch.randn(tokens, in_f, generator=gen)
                x_np = x.numpy()
                methods = {
                    "torch eager": lambda: F.linear(x, w, b),
                    "oneDNN prepacked": lambda: best_dense(x),
                    "sparsert csr": lambda: ops.linear(x, csr, b),
                    "sparsert bitmask16": lambda: linear_bitmask(x, bitmask, b),
                }
                if ort is not None:
                    methods["onnxruntime"] = lambda: ort(x_np)
                ref = F.linear(x.double(), w.double(), b.double())
                for name, fn in methods.items():  # same answer before timing
                    out = torch.as_tensor(fn()).double()
                    assert torch.allclose(out, ref, rtol=1e-3, atol=1e-3), name
                times = time_methods(methods, rounds=rounds, clock=clock)
                eager = times["torch eager"]
                best_name = min((n for n in DENSE if n in times), key=times.get)
                best = times[best_name]
                row = dict(shape=label, sparsity=sparsity, tokens=tokens, threads=threads, best_dense=best_name,
                           times=times)
                rows.append(row)
                print(f"{threads}t {label} {sparsity:.0%} T={tokens:<3} best dense {best * 1e6:8.0f} us ({best_name})"
                      + "".join(f" | {n.replace('sparsert ', '')} {eager / t:4.2f}x/{best / t:4.2f}x"
                                for n, t in times.items() if n.startswith("sparsert")), flush=True)
    return rows


def markdown(rows) -> str:
    lines = ["| threads | shape | sparsity | tokens | eager (us) | best dense (us) | csr vs eager | csr vs best | "
             "bitmask16 vs eager | bitmask16 vs best | bitmask16 (us) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["times"]
        eager, best = t["torch eager"], t[r["best_dense"]]
        csr, bm = t["sparsert csr"], t["sparsert bitmask16"]
        lines.append(f"| {r['threads']} | {r['shape']} | {r['sparsity']:.0%} | {r['tokens']} | {eager * 1e6:.0f} | "
                     f"{best * 1e6:.0f} ({r['best_dense']}) | {eager / csr:.2f}x | {best / csr:.2f}x | "
                     f"{eager / bm:.2f}x | **{best / bm:.2f}x** | {bm * 1e6:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES], choices=[s[0] for s in SHAPES])
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown here")
    args = parser.parse_args(argv)
    shapes = [s for s in SHAPES if s[0] in args.shapes]
    print(f"{cpu_name()} | ISA {native().best_isa()} | torch {torch.__version__} | commit {git_commit()} | "
          "cells: speedup vs torch eager / vs best dense")
    rows = []
    for threads in args.threads:
        rows += run(threads, args.rounds, shapes, args.tokens, args.sparsities)
    table = markdown(rows)
    print()
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
