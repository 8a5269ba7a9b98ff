"""Sparse Linear vs the dense paths (torch eager, oneDNN prepacked, onnxruntime),
torch.sparse and scipy.sparse: one table.

    python benchmarks/bench_linear.py            # full table (a few minutes)
    python benchmarks/bench_linear.py --quick    # fewer rounds
    python benchmarks/bench_linear.py --cases 50% 70% --threads 1   # moderate sparsity (bitmask16, rowgroup4)

fp32, 2 threads by default (torch, oneDNN, onnxruntime and sparsert alike;
scipy is single-threaded), every method timed round-robin in this process,
median of the rounds. Each cell is a speedup over torch eager ``F.linear``
and over the best dense path (the fastest of eager, oneDNN with a prepacked
weight and onnxruntime, which is timed when installed: ``pip install
sparsert[bench]``). With 1 thread the clock is this thread's CPU time
(robust when other jobs share the cores); with more, wall time.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sparsert  # noqa: E402
from sparsert import ops  # noqa: E402
from sparsert.bench import random_pruned_weight  # noqa: E402
from sparsert.formats import pack  # noqa: E402
from sparsert.formats.rowgroup import KBLOCK  # noqa: E402

from harness import (DENSE_METHODS, best_dense, cpu_name, dense_linear_methods, for_tokens, git_commit,  # noqa: E402
                     time_methods)

SHAPES = [(768, 3072), (3072, 768), (4096, 4096)]  # (in_features, out_features)
TOKENS = [1, 16, 128]
CASES = [  # (label, sparsity, block)
    ("0%", 0.0, None), ("50%", 0.5, None), ("70%", 0.7, None), ("80%", 0.8, None),
    ("90%", 0.9, None), ("95%", 0.95, None), ("90% 4x1", 0.9, (4, 1)), ("90% 8x1", 0.9, (8, 1)),
]


pruned_weight = random_pruned_weight


def sparsert_kinds(sparsity, block):
    """The formats timed: CSR, the case's BSR block, and bitmask16 and rowgroup4 (unblocked and
    in column blocks) at moderate sparsity."""
    if block is not None:
        return [f"bsr{block[0]}x{block[1]}", "csr"]
    return ["csr", "bitmask16", "rowgroup4", f"rowgroup4k{KBLOCK}"] if 0.2 <= sparsity <= 0.8 else ["csr"]


def run(quick: bool, threads: int, shapes, tokens_list, cases):
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    rows = []
    for in_f, out_f in shapes:
        for label, sparsity, block in cases:
            w = pruned_weight(out_f, in_f, sparsity, block, gen)
            w_torch_csr = w.to_sparse_csr()
            w_scipy = scipy.sparse.csr_matrix(w.numpy())
            formats = {kind: pack(w, kind) for kind in sparsert_kinds(sparsity, block)}
            dense_paths = dense_linear_methods(w, None, threads)
            for tokens in tokens_list:
                x = torch.randn(tokens, in_f, generator=gen)
                xt = x.t().contiguous()
                x_np = x.numpy()
                paths = for_tokens(dense_paths, tokens)
                methods = {name: (lambda f=f: f(x)) for name, f in paths.items()}
                methods["torch.sparse csr"] = lambda: torch.sparse.mm(w_torch_csr, xt)
                methods["scipy csr"] = lambda: w_scipy @ x_np.T
                for kind, fmt in formats.items():
                    methods[f"sparsert {kind}"] = (lambda f=fmt: ops.linear(x, f))
                ref = x.double() @ w.double().T
                for name in paths.keys() | {f"sparsert {k}" for k in formats}:  # same answer first
                    out = torch.as_tensor(methods[name]()).double()
                    assert torch.allclose(out, ref, rtol=1e-3, atol=1e-3 * max(float(ref.abs().max()), 1.0)), name
                times = time_methods(methods, rounds=8 if quick else 25, clock=clock)
                eager = times["torch eager"]
                best_name, best = best_dense(times)
                for name, t in times.items():
                    rows.append(dict(shape=f"{in_f}->{out_f}", tokens=tokens, case=label, method=name,
                                     ms=t * 1e3, speedup=eager / t, vs_best=best / t, best_dense=best_name))
                print(f"{in_f:>4}->{out_f:<4} T={tokens:<3} {label:<8} eager {eager*1e3:8.3f} ms, best dense "
                      f"{best*1e3:8.3f} ms ({best_name}) | "
                      + " | ".join(f"{n.replace('sparsert ', '')} {eager / t:5.2f}x/{best / t:5.2f}x"
                                   for n, t in times.items() if n not in DENSE_METHODS), flush=True)
    return rows


def markdown(rows, threads):
    methods = []
    for r in rows:
        if r["method"] not in methods and r["method"] not in DENSE_METHODS:
            methods.append(r["method"])
    lines = ["| shape | tokens | sparsity | eager (ms) | best dense (ms) | " + " | ".join(methods) + " |",
             "|---|---|---|---|---|" + "---|" * len(methods)]
    key = lambda r: (r["shape"], r["tokens"], r["case"])  # noqa: E731
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["method"]] = r
    for (shape, tokens, case), g in groups.items():
        eager = g["torch eager"]
        best = g[eager["best_dense"]]
        cells = [f"{g[m]['speedup']:.2f}x / {g[m]['vs_best']:.2f}x" if m in g else "" for m in methods]
        lines.append(f"| {shape} | {tokens} | {case} | {eager['ms']:.3f} | {best['ms']:.3f} ({best['method']}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timing rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown here")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS, help=f"token counts (default {TOKENS})")
    parser.add_argument("--cases", nargs="+", default=[c[0] for c in CASES], metavar="CASE",
                        help="sparsity cases by label, e.g. 90%% '90%% 4x1' (default: all)")
    parser.add_argument("--shapes", nargs="+", default=[f"{i}x{o}" for i, o in SHAPES], metavar="INxOUT",
                        help="in x out features, e.g. 768x3072 (default: the three benchmark shapes)")
    args = parser.parse_args(argv)
    by_label = {c[0]: c for c in CASES}
    unknown = [c for c in args.cases if c not in by_label]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(by_label)}")
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    except ValueError:
        parser.error(f"--shapes takes INxOUT pairs such as 768x3072, got {args.shapes}")
    if any(len(s) != 2 or min(s) < 1 for s in shapes):
        parser.error(f"--shapes takes INxOUT pairs of positive sizes, got {args.shapes}")
    cases = [by_label[c] for c in args.cases]
    print(f"sparsert {sparsert.__version__} | {cpu_name()} | ISA {ops.cpu_isa()} | "
          f"torch {torch.__version__} | {args.threads} threads | commit {git_commit()}")
    rows = run(args.quick, args.threads, shapes, args.tokens, cases)
    table = markdown(rows, args.threads)
    print()
    print(table)
    if args.markdown:
        header = (f"Date {datetime.date.today()}, CPU {cpu_name()}, ISA {ops.cpu_isa()}, "
                  f"torch {torch.__version__}, {args.threads} threads, commit {git_commit()}.\n"
                  f"Command: `python benchmarks/bench_linear.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
                  "Cells are speedups over torch eager F.linear / over the best dense path in the same run "
                  "(higher is better).\n\n")
        args.markdown.write_text(header + table + "\n")


if __name__ == "__main__":
    main()
