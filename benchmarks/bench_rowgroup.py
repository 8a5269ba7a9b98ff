"""rowgroup4 at many tokens: unblocked vs column-blocked (K-block) layouts vs the dense paths.

    python benchmarks/bench_rowgroup.py                       # 50%/70%, 128 and 512 tokens, 5 shapes
    python benchmarks/bench_rowgroup.py --kblocks 0 128 256 512 --tokens 128
    python benchmarks/bench_rowgroup.py --old-ext OTHER/sparsert/_C.cpython-311-x86_64-linux-gnu.so

One process, 1 thread by default (the clock is then this thread's CPU time,
robust on a shared machine), every method timed round-robin; the median and the
fastest round (steadier when other jobs share the core and evict its caches,
which CPU time does not remove). Methods:
torch eager ``F.linear``, oneDNN with a prepacked weight (the best dense path
sparsert has), and rowgroup4 packed with each ``--kblocks`` width (0: one
block of all columns, kind ``rowgroup4``; N: kind ``rowgroup4kN``). ``--old-ext`` also
times another build's ``spmm_rowgroup`` on the same arrays (a build from before
column blocks: add ``--old-unblocked-only``). Each row reports GFLOP/s of useful multiply-adds
(2 x nonzeros x tokens per call; dense: 2 x rows x cols x tokens) and every
method's speed over oneDNN.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import statistics
import importlib.util
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparsert import ops  # noqa: E402
from sparsert.bench import random_pruned_weight  # noqa: E402
from sparsert.formats.rowgroup import KBLOCK, PATTERNS, RowGroup, pattern_counts  # noqa: E402
from sparsert.ops.backends.best_dense import PackedDenseLinear  # noqa: E402
from sparsert.ops.backends.cpu import linear_rowgroup_cpu  # noqa: E402

from harness import cpu_name, git_commit  # noqa: E402

SHAPES = [(768, 3072), (3072, 768), (384, 1536), (1536, 384), (384, 384)]  # (in_features, out_features)


def load_old_extension(path: str):
    """Another build of sparsert._C, imported under a private package name (its PyInit is ``_C``)."""
    name = "sparsert_old_ext._C"
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def old_call(ext, fmt: RowGroup, threads: int):
    """x -> y through another build's spmm_rowgroup (unblocked arrays only)."""
    seg, col, val = fmt.seg_ptr, fmt.columns, fmt.values
    rows, cols = fmt.shape

    # builds from 2026-12-01 take the value offsets after the values (0: derived per call)
    offsets = ((0, 0),) if "value_offsets" in (ext.spmm_rowgroup.__doc__ or "") else ()

    def run(x):
        y = torch.empty(x.shape[0], rows)
        ext.spmm_rowgroup(rows, cols, seg.data_ptr(), seg.numel(), col.data_ptr(), col.numel(), val.data_ptr(),
                          val.numel(), *(o for pair in offsets for o in pair), x.data_ptr(), x.shape[0],
                          x.stride(0), y.data_ptr(), y.stride(0), 0, 0, threads, "")
        return y
    return run


def time_samples(methods: dict, *, rounds: int, clock, min_sample_s: float = 2e-3) -> dict:
    """Seconds per call of each method in every round, the methods round-robin
    (harness.time_methods' loop, keeping every sample for the fastest round)."""
    calls = {}
    for name, fn in methods.items():
        for _ in range(3):
            fn()
        start = clock()
        fn()
        calls[name] = max(1, int(min_sample_s / max(clock() - start, 1e-7)))
    samples = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            start = clock()
            for _ in range(calls[name]):
                fn()
            samples[name].append((clock() - start) / calls[name])
    return samples


def layout_stats(fmt: RowGroup) -> dict:
    """Mean stored columns per nonempty segment, rows per column, padding share."""
    counts = (fmt.seg_ptr[1:] - fmt.seg_ptr[:-1]).to(torch.int64)
    rows_per = pattern_counts().repeat(counts.numel() // PATTERNS)
    entries = int(counts.sum())
    nonempty = int((counts > 0).sum())
    return {"cols/segment": entries / max(1, nonempty), "rows/column": float((counts * rows_per).sum()) / max(1, entries),
            "padding": 1.0 - int((fmt.values != 0).sum()) / max(1, fmt.values.numel())}


def run(args):
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    old = load_old_extension(args.old_ext) if args.old_ext else None
    gen = torch.Generator().manual_seed(0)
    print(f"# {cpu_name()}, commit {git_commit()}, {args.threads} thread(s), "
          f"{'thread CPU time' if args.threads == 1 else 'wall time'}, median and fastest of {args.rounds} rounds")
    header = ["shape", "sparsity", "tokens", "method", "us median", "us fastest", "GF/s useful (fastest)",
              "vs oneDNN (median)", "vs oneDNN (fastest)", "cols/seg", "rows/col", "padding"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for in_f, out_f in args.shapes:
        for sparsity in args.sparsities:
            w = random_pruned_weight(out_f, in_f, sparsity, None, gen)
            nnz = int((w != 0).sum())
            formats = {kb: RowGroup.from_dense(w, kblock=kb) for kb in args.kblocks}
            for fmt in formats.values():  # the same matrix in every layout
                assert torch.equal(fmt.to_dense(), w)
            packed = PackedDenseLinear(w, None)
            for tokens in args.tokens:
                x = torch.randn(tokens, in_f, generator=gen)
                methods = {"torch eager": lambda: F.linear(x, w), "oneDNN prepacked": lambda: packed(x)}
                for kb, fmt in formats.items():
                    for kernel in args.kernels:
                        label = f"rowgroup4 kblock={kb}" + (f" {kernel}" if kernel else "")
                        methods[label] = (lambda f=fmt, k=kernel: linear_rowgroup_cpu(
                            x, f.seg_ptr, f.columns, f.values, f.shape[0], None, 0, args.threads, k))
                if old is not None:  # builds before column blocks take only kblock=0 (one block)
                    for kb in [0] if args.old_unblocked_only else formats:
                        if kb in formats:
                            call = old_call(old, formats[kb], args.threads)
                            methods[f"rowgroup4 kblock={kb} other build"] = (lambda c=call: c(x))
                ref = x.double() @ w.double().T
                for name, fn in methods.items():  # same answer first
                    err = (torch.as_tensor(fn()).double() - ref).abs().max().item()
                    assert err <= 1e-3 * (1 + ref.abs().max().item()), (name, err)
                samples = time_samples(methods, rounds=args.rounds, clock=clock)
                med = {name: statistics.median(v) for name, v in samples.items()}
                best = {name: min(v) for name, v in samples.items()}
                for name in samples:
                    kb = name.split("kblock=")[1].split()[0] if "kblock=" in name else None
                    stats = layout_stats(formats[int(kb)]) if kb is not None else None
                    flops = 2 * (nnz if name.startswith("rowgroup") else w.numel()) * tokens
                    cells = [f"{in_f}->{out_f}", f"{sparsity:.0%}", str(tokens), name, f"{med[name] * 1e6:.1f}",
                             f"{best[name] * 1e6:.1f}", f"{flops / best[name] / 1e9:.1f}",
                             f"{med['oneDNN prepacked'] / med[name]:.2f}x",
                             f"{best['oneDNN prepacked'] / best[name]:.2f}x",
                             f"{stats['cols/segment']:.1f}" if stats else "",
                             f"{stats['rows/column']:.2f}" if stats else "",
                             f"{stats['padding']:.1%}" if stats else ""]
                    print("| " + " | ".join(cells) + " |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=[f"{i}x{o}" for i, o in SHAPES],
                    help="in_features x out_features (default: %(default)s)")
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7])
    ap.add_argument("--tokens", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--kblocks", nargs="+", type=int, default=[0, KBLOCK],
                    help="rowgroup4 column-block widths to time (0 = unblocked; default: %(default)s)")
    ap.add_argument("--kernels", nargs="+", default=[""],
                    help="row-group registry kernels to force (default: the one sparsert selects)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--old-ext", default="", help="path of another build's _C extension to time beside")
    ap.add_argument("--old-unblocked-only", action="store_true",
                    help="time --old-ext on the unblocked layout only (builds before column blocks)")
    args = ap.parse_args(argv)
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    run(args)


if __name__ == "__main__":
    main()
