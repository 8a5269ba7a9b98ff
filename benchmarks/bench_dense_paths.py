"""Which dense Linear is fastest on this machine: torch eager, oneDNN with a
prepacked weight (two ways), MKL packed, onnxruntime. One table, interleaved.

    python benchmarks/bench_dense_paths.py [--threads 1 2] [--quick]

Decides what sparsert/ops/backends/best_dense.py packs for. onnxruntime is a
benchmark extra (pip install onnxruntime onnx); without it that column is
left out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cpu_name, git_commit, ort_linear, time_methods  # noqa: E402

SHAPES = [("A", 768, 3072), ("B", 3072, 768), ("C", 4096, 4096)]
TOKENS = [1, 16, 128]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    print(f"{cpu_name()} | torch {torch.__version__} | commit {git_commit()} | times in us, medians")
    gen = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for label, in_f, out_f in SHAPES:
            w = torch.randn(out_f, in_f, generator=gen)
            b = torch.randn(out_f, generator=gen)
            ort_fn = ort_linear(w, b, threads)
            for tokens in TOKENS:
                x = torch.randn(tokens, in_f, generator=gen)
                x_np = x.numpy()
                packed_any = torch.ops.mkldnn._reorder_linear_weight(w, None)
                packed_t = torch.ops.mkldnn._reorder_linear_weight(w, tokens)
                methods = {
                    "eager": lambda: F.linear(x, w, b),
                    "onednn packed(any)": lambda: torch.ops.mkldnn._linear_pointwise(x, packed_any, b, "none", [], ""),
                    "onednn packed(T)": lambda: torch.ops.mkldnn._linear_pointwise(x, packed_t, b, "none", [], ""),
                }
                if torch.ops.mkl._mkl_reorder_linear_weight is not None:
                    try:
                        mkl_w = torch.ops.mkl._mkl_reorder_linear_weight(w, tokens)
                        torch.ops.mkl._mkl_linear(x, mkl_w, w, b, tokens)
                        methods["mkl packed(T)"] = lambda: torch.ops.mkl._mkl_linear(x, mkl_w, w, b, tokens)
                    except (RuntimeError, AttributeError):
                        pass
                if ort_fn is not None:
                    methods["onnxruntime"] = lambda: ort_fn(x_np)
                ref = F.linear(x.double(), w.double(), b.double())
                for name, fn in methods.items():
                    out = torch.as_tensor(fn())
                    assert torch.allclose(out.double(), ref, rtol=1e-3, atol=1e-3), name
                # One thread: CPU time of this thread (robust on a shared machine); more: wall time.
                times = time_methods(methods, rounds=8 if args.quick else 21,
                                     clock=time.thread_time if threads == 1 else time.perf_counter)
                best = min(times, key=times.get)
                print(f"{threads}t {label} T={tokens:<4}" + "".join(
                    f" | {n} {t * 1e6:8.1f}" for n, t in times.items()) + f" | best: {best}", flush=True)


if __name__ == "__main__":
    main()
