"""Per-call cost of the weight-array safety checks (issue 17, item 1).

The CPU backend validates a weight's index arrays once and keeps private
copies for the kernels; per call it compares identities, addresses, sizes,
version counters and the values' storage size. This script times the
1-token Linear path (what a decoder step or a small layer calls) with the
current backend against the previous one (validation remembered by pointer
and version, kernels reading the caller's arrays), loaded from git in the
same process, interleaved (alternating order), medians of repeats; and reports the memory the
private copies take.

    python benchmarks/bench_safety.py [--ref main] [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import types

import torch

import sparsert
from sparsert.nn import SparseLinear
from sparsert.ops.backends import cpu


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
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", default="main", help="git ref of the previous backend (default main)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    sparsert.ops.set_num_threads(1)
    previous = _previous_backend(args.ref)
    print(f"cpu: {sparsert.ops.cpu_isa()}, threads 1; previous backend: {args.ref if previous else 'unavailable'}")
    print("| layer | format | nnz | new us/call | previous us/call | overhead (median of ratios) | "
          "check alone, ns (min): new vs previous | private copies (bytes) | weight arrays (bytes) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (out_f, in_f), kind, sparsity in [((768, 768), "csr", 0.9), ((768, 768), "bsr4x1", 0.9),
                                          ((3072, 768), "nm2:4", 0.5), ((256, 256), "csr", 0.9)]:
        lin = torch.nn.Linear(in_f, out_f)
        with torch.no_grad():
            if kind.startswith("nm"):
                lin.weight.view(out_f, -1, 4)[..., 2:] = 0
            else:
                lin.weight.mul_(torch.rand(out_f, in_f) >= sparsity)
        m = SparseLinear.from_dense(lin, kind)
        x = torch.randn(1, in_f)
        rp, ci, v = m._kernel_arrays()
        r, c = m._block
        new = lambda: cpu.linear_bsr_cpu(x, rp, ci, v, out_f, r, c, m.bias, 0, 1)  # noqa: E731
        old = (lambda: previous.linear_bsr_cpu(x, rp, ci, v, out_f, r, c, m.bias, 0, 1)) if previous else None
        assert previous is None or torch.equal(new(), old())
        ratios, t_new, t_old = [], [], []
        for i in range(args.rounds):  # alternating which goes first: load drifts hit both alike
            if i % 2:
                b = _time(old, args.calls) if old else float("nan")
                a = _time(new, args.calls)
            else:
                a = _time(new, args.calls)
                b = _time(old, args.calls) if old else float("nan")
            t_new.append(a)
            t_old.append(b)
            ratios.append(a / b)
        checked = cpu.check_weight_arrays(rp, ci, v, out_f, in_f, r, c)
        private = sum(t.nbytes for t in checked.indices)
        arrays = rp.nbytes + ci.nbytes + v.nbytes
        checks = []
        if previous:  # the per-call check alone (a cache hit), new against previous
            new_check = lambda: cpu.check_weight_arrays(rp, ci, v, out_f, in_f, r, c)  # noqa: E731
            old_check = lambda: previous.check_weight_arrays(rp, ci, v, out_f, in_f, r, c)  # noqa: E731
            for _ in range(args.rounds):
                checks.append((_time(new_check, args.calls * 10), _time(old_check, args.calls * 10)))
        # minimum over rounds: the least-disturbed measure of a sub-microsecond step
        check_text = (f"{min(a for a, _ in checks) * 1e9:.0f} vs {min(b for _, b in checks) * 1e9:.0f}"
                      if checks else "-")
        print(f"| {out_f}x{in_f} | {kind} | {ci.numel()} | {statistics.median(t_new) * 1e6:.1f} | "
              f"{statistics.median(t_old) * 1e6:.1f} | {(statistics.median(ratios) - 1) * 100:+.1f}% | {check_text} | "
              f"{private} | {arrays} ({private / arrays:.1%}) |")


if __name__ == "__main__":
    main()
