"""Timing helpers shared by the benchmark scripts.

Methods are timed round-robin (one sample of each per round) so that noise
from other processes on a shared machine hits every method alike; each
sample runs enough calls to last ~`min_sample_s`, and the reported time is
the median over rounds, after warm-up.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_methods(methods: dict[str, Callable[[], object]], *, rounds: int = 30, warmup: int = 3,
                 min_sample_s: float = 2e-3, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each zero-argument callable, timed round-robin (each round
    starting one method later).

    ``clock=time.thread_time`` counts only the CPU time of the calling
    thread: on a machine shared with other jobs, single-threaded methods
    are then compared without the time the scheduler gave to others."""
    calls = {}
    for name, fn in methods.items():
        for _ in range(warmup):
            fn()
        start = clock()
        fn()
        one = max(clock() - start, 1e-7)
        calls[name] = max(1, int(min_sample_s / one))
    samples: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods.items())
    for r in range(rounds):
        # Each round starts one method later, so every method follows every other one equally
        # often: a call right after another engine (its weights in the caches, torch's threads
        # asleep) starts colder than one right after itself.
        for name, fn in order[r % len(order):] + order[:r % len(order)]:
            n = calls[name]
            start = clock()
            for _ in range(n):
                fn()
            samples[name].append((clock() - start) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


# --------------------------------------------------------------------------- dense baselines
#: the dense Linear paths every benchmark times; "best dense" is the fastest of them
DENSE_METHODS = ("torch eager", "oneDNN prepacked", "sparsert GEMV", "onnxruntime")


def ort_linear(w: torch.Tensor, b: Optional[torch.Tensor], threads: int):
    """An onnxruntime session computing x @ w.T + b (Gemm, weight as an initializer), as a
    function of a numpy x; None when onnxruntime/onnx are not installed (``pip install
    sparsert[bench]``)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    out_f, in_f = w.shape
    b = torch.zeros(out_f) if b is None else b
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", in_f])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", out_f])],
        [numpy_helper.from_array(w.detach().numpy(), "w"), numpy_helper.from_array(b.detach().numpy(), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # interleaved timing: ORT's threads spin after each run and would steal the cores from
    # whichever method runs next (measured: sparsert eager 49 ms after ORT vs 17 ms alone)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def dense_linear_methods(w: torch.Tensor, b: Optional[torch.Tensor], threads: int) -> dict:
    """name -> (x -> y) for each dense path of :data:`DENSE_METHODS` this machine has:
    torch eager ``F.linear``, oneDNN with a prepacked weight and, for up to 4 tokens, sparsert's
    GEMV (both paths of sparsert's best-dense backend) and onnxruntime when installed. Build once
    per weight, call per input; :func:`for_tokens` drops the GEMV where the input has more tokens."""
    from sparsert.ops.backends.best_dense import PackedDenseLinear, gemv, gemv_available

    packed = PackedDenseLinear(w, b)
    methods = {"torch eager": lambda x: F.linear(x, w, b)}
    if packed.backend == "onednn":
        methods["oneDNN prepacked"] = lambda x: packed(x, path="onednn")
    if gemv_available():
        wc = w.contiguous()
        methods["sparsert GEMV"] = lambda x: gemv(x, wc, b)  # (up to GEMV_MAX_ROWS tokens: see gemv_tokens)
    ort = ort_linear(w, b, threads)
    if ort is not None:
        methods["onnxruntime"] = lambda x: ort(x.numpy())
    return methods


def for_tokens(methods: dict, tokens: int) -> dict:
    """``methods`` without the GEMV when ``tokens`` is more than it takes."""
    from sparsert.ops.backends.best_dense import GEMV_MAX_ROWS

    return {k: v for k, v in methods.items() if k != "sparsert GEMV" or tokens <= GEMV_MAX_ROWS}


def best_dense(times: dict) -> tuple:
    """(name, seconds) of the fastest dense path in ``times`` (keys of :data:`DENSE_METHODS`)."""
    name = min((n for n in DENSE_METHODS if n in times), key=times.get)
    return name, times[name]


#: the language-model quality windows (tokens per window, windows per batch) both
#: prune_quality.py and prune_recover.py use, so their perplexities compare
LM_QUALITY_WINDOW, LM_QUALITY_BATCH = 256, 4


def lm_quality_windows(smollm2, tokenizer, calib_split: str, calib_tokens: int, eval_tokens: int,
                       seq_len: int = LM_QUALITY_WINDOW) -> tuple:
    """``(calibration batches, held-out batches)`` of a causal LM: about ``calib_tokens`` of the
    ``calib_split`` split and ``eval_tokens`` of the "eval" split (another source), in windows of
    ``seq_len`` tokens, ``LM_QUALITY_BATCH`` windows per batch (``smollm2``: the model module)."""
    from sparsert.data import corpus

    def windows(split: str, tokens: int) -> list:
        return smollm2.token_batches(tokenizer, corpus.split(split), seq_len, LM_QUALITY_BATCH,
                                     max_batches=max(1, tokens // (seq_len * LM_QUALITY_BATCH)))

    return windows(calib_split, calib_tokens), windows("eval", eval_tokens)

