"""1-token (decode, GEMV) sparse Linear kernels against the dense paths, per kernel.

    python benchmarks/bench_spmv.py                     # A, B, C at 50% and 70%, 1 thread
    python benchmarks/bench_spmv.py --sparsity 0.5 --threads 2

Times every runnable bitmask16 spmv kernel of the registry (forced by name), the
default CSR and rowgroup4 paths and the dense paths in one process, round-robin,
medians. Prints microseconds, the ratio vs the best dense path and vs torch eager,
the bytes per weight each format reads and the GB/s that reaches. With 1 thread the
clock is this thread's CPU time (robust on a shared machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparsert import ops  # noqa: E402
from sparsert.bench import random_pruned_weight  # noqa: E402
from sparsert.formats import pack  # noqa: E402
from sparsert.ops.backends.cpu import bitmask_kernels, linear_bitmask_cpu  # noqa: E402

from harness import best_dense, dense_linear_methods, time_methods  # noqa: E402

SHAPES = {"A": (768, 3072), "B": (3072, 768), "C": (4096, 4096)}  # name: (in_features, out_features)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    spmv = [k["name"] for k in bitmask_kernels()
            if k["supported"] and k["kind"] == "spmv" and k["isa"] != "scalar"]  # scalar: the portable fallback
    for s in args.sparsity:
        for shape in args.shapes:
            in_f, out_f = SHAPES[shape]
            w = random_pruned_weight(out_f, in_f, s, None, gen)
            x = torch.randn(1, in_f, generator=gen)
            ref = x.double() @ w.double().T
            weights = in_f * out_f
            methods = {name: (lambda f=f: f(x)) for name, f in dense_linear_methods(w, None, args.threads).items()}
            nbytes = {name: 4 * weights for name in methods}
            for kind in ("csr", "rowgroup4"):
                fmt = pack(w, kind)
                methods[kind] = lambda f=fmt: ops.linear(x, f)
                nbytes[kind] = fmt.nbytes
            bm = pack(w, "bitmask16")
            masks, offsets, values, _, _ = bm.kernel_arrays()
            for k in spmv:
                methods[k] = (lambda k=k: linear_bitmask_cpu(x, masks, offsets, values, out_f, None, 0,
                                                             args.threads, k))
                nbytes[k] = bm.nbytes
            for name, f in methods.items():
                out = torch.as_tensor(f()).double().reshape(ref.shape)
                assert torch.allclose(out, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max())), name
            times = time_methods(methods, rounds=args.rounds, clock=clock)
            best_name, best = best_dense(times)
            eager = times["torch eager"]
            print(f"\n{shape} {in_f}->{out_f} sparsity {s:.0%} threads {args.threads}: best dense {best_name}")
            for name, t in times.items():
                print(f"  {name:32s} {t * 1e6:9.1f} us  vs best {best / t:5.2f}x  vs eager {eager / t:5.2f}x  "
                      f"{nbytes[name] / weights:5.2f} B/weight  {nbytes[name] / t / 1e9:6.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
