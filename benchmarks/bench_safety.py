"""Per-call cost of the weight-array safety checks (issue 17, item 1).

The CPU backend validates a weight's index arrays once and keeps private
copies for the kernels; per call it only confirms that the arrays it
validated are still the ones it is given. This script times 1-token calls
(what a decoder step or a small layer calls), 1 thread, in thread CPU time
(less disturbed by other processes than wall time), interleaved (alternating
order), median of per-round ratios:

- ``layer``: ``SparseLinear.forward`` (what a model calls) with the checks,
  against the same forward with the per-call check replaced by the remembered
  result (``no check``): what the safety costs per call.
- ``backend``: ``linear_bsr_cpu`` now against the backend as of ``--ref``
  (loaded from git in the same process; CSR/BSR/N:M only), the comparison
  the first measurement of the safety fix made.

    python benchmarks/bench_safety.py [--ref 74dbb22^1] [--rounds 30] [--calls 200]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import time
import types

import torch

import sparsert
from sparsert.nn import SparseLinear
from sparsert.ops.backends import cpu

LAYERS = [((3072, 768), "csr", 0.9), ((768, 3072), "csr", 0.9), ((3072, 768), "bitmask16", 0.6),
          ((768, 3072), "bitmask16", 0.6), ((768, 768), "csr", 0.9), ((768, 768), "bsr4x1", 0.9),
          ((3072, 768), "nm2:4", 0.5), ((256, 256), "csr", 0.9)]


def _previous_backend(ref: str):
    """The CPU backend module as of ``ref`` (without its op registrations), or None."""
    try:
        src = subprocess.run(["git", "show", f"{ref}:sparsert/ops/backends/cpu.py"], capture_output=True,
                             text=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    src = "\n".join(line for line in src.splitlines() if not line.startswith("@") or "register_kernel" not in line)
    mod = types.ModuleType("sparsert.ops.backends._previous_cpu")
    mod.__package__ = "sparsert.ops.backends"
    exec(compile(src, "previous_cpu.py", "exec"), mod.__dict__)
    return mod


def _time(fn, calls: int) -> float:
    """Thread CPU seconds per call."""
    start = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - start) / calls


def _compare(a, b, rounds: int, calls: int) -> tuple:
    """(median a, median b, median of a/b), a and b timed alternately first."""
    ta, tb, ratios = [], [], []
    for i in range(rounds):
        if i % 2:
            y = _time(b, calls)
            x = _time(a, calls)
        else:
            x = _time(a, calls)
            y = _time(b, calls)
        ta.append(x)
        tb.append(y)
        ratios.append(x / y)
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


@contextlib.contextmanager
def _checks_remembered(checked):
    """The per-call checks replaced by their (already computed) result."""
    saved = cpu.check_weight_arrays, cpu.check_bitmask_arrays
    cpu.check_weight_arrays = cpu.check_bitmask_arrays = lambda *args: checked
    try:
        yield
    finally:
        cpu.check_weight_arrays, cpu.check_bitmask_arrays = saved


def _layer(out_f: int, in_f: int, kind: str, sparsity: float) -> SparseLinear:
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        if kind.startswith("nm"):
            lin.weight.view(out_f, -1, 4)[..., 2:] = 0
        else:
            lin.weight.mul_(torch.rand(out_f, in_f) >= sparsity)
    return SparseLinear.from_dense(lin, kind)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", default="74dbb22^1",
                   help="git ref of the previous backend (default: the commit before the safety fix)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    sparsert.ops.set_num_threads(1)
    previous = _previous_backend(args.ref)
    print(f"cpu: {sparsert.ops.cpu_isa()}, threads 1, thread CPU time; previous backend: "
          f"{args.ref if previous else 'unavailable'}")
    print("| layer | format | forward us/call | no check us/call | check overhead | check overhead, minima | "
          f"backend us/call | backend at {args.ref} us/call | backend overhead | private copies (bytes) | "
          "weight arrays (bytes) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (out_f, in_f), kind, sparsity in LAYERS:
        m = _layer(out_f, in_f, kind, sparsity)
        x = torch.randn(1, in_f)
        a, b, v = m._kernel_arrays()
        with torch.no_grad():
            y = m(x)
            checked = (cpu.check_bitmask_arrays(a, b, v, out_f, in_f) if m._bitmask
                       else cpu.check_weight_arrays(a, b, v, out_f, in_f, *m._block))

            def unchecked():
                with _checks_remembered(checked):
                    return m(x)

            assert torch.equal(unchecked(), y)
            # the patch is entered once per round, not per call: time the loop inside it
            fwd = lambda: m(x)  # noqa: E731
            t_fwd, t_free, ratio = [], [], []
            for i in range(args.rounds):
                order = (0, 1) if i % 2 == 0 else (1, 0)
                times = [0.0, 0.0]
                for which in order:
                    if which == 0:
                        times[0] = _time(fwd, args.calls)
                    else:
                        with _checks_remembered(checked):
                            times[1] = _time(fwd, args.calls)
                t_fwd.append(times[0])
                t_free.append(times[1])
                ratio.append(times[0] / times[1])
            # medians, and the ratio of the minima (the least-disturbed rounds: steadier on a busy machine)
            layer = (statistics.median(t_fwd), statistics.median(t_free), statistics.median(ratio),
                     min(t_fwd) / min(t_free))
            backend = ("-", "-", "-")
            if previous is not None and not m._bitmask:
                r, c = m._block
                new = lambda: cpu.linear_bsr_cpu(x, a, b, v, out_f, r, c, m.bias, 0, 1)  # noqa: E731
                old = lambda: previous.linear_bsr_cpu(x, a, b, v, out_f, r, c, m.bias, 0, 1)  # noqa: E731
                assert torch.equal(new(), old())
                tn, to, rr = _compare(new, old, args.rounds, args.calls)
                backend = (f"{tn * 1e6:.1f}", f"{to * 1e6:.1f}", f"{(rr - 1) * 100:+.1f}%")
        private = sum(t.nbytes for t in checked.indices)
        arrays = a.nbytes + b.nbytes + v.nbytes
        print(f"| {out_f}x{in_f} | {kind} | {layer[0] * 1e6:.1f} | {layer[1] * 1e6:.1f} | "
              f"{(layer[2] - 1) * 100:+.1f}% | {(layer[3] - 1) * 100:+.1f}% | {' | '.join(backend)} | {private} | "
              f"{arrays} ({private / arrays:.1%}) |", flush=True)


if __name__ == "__main__":
    main()
