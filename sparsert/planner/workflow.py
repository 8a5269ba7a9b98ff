"""The whole job for a target speedup, as the command line and the demo run it:
plan, prune, refit, pack per plan, save, reload, measure, judge quality.

Quality is judged on held-out text of *another source* than the calibration
text for sentence embedders (calibration: Python standard-library prose,
evaluation: numpy/scipy/torch prose, :mod:`sparsert.data.corpus`), as mean and
worst cosine similarity of the embeddings to the dense model's.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .pruner import Pruner
from .tables import DEFAULT_PATTERNS

__all__ = ["prune_to_speedup", "calibration_batches", "quality", "reference_embeddings"]

#: held-out evaluation sentences (corpus "eval" split) and calibration sentences
EVAL_SENTENCES = 256
CALIB_SENTENCES = 256


def calibration_batches(wl, limit: int = 8, data: Optional[str] = None) -> list:
    """Calibration batches: for a model with a tokenizer, standard-library prose from the
    offline corpus (never the evaluation source); otherwise the workload's own."""
    if data is None and wl.family == "hf" and wl.tokenizer is not None:
        from ..data import corpus
        from ..models import minilm

        return minilm.tokenize(wl.tokenizer, corpus.split("calibration", n=32 * limit), 32)[:limit]
    return wl.calibration(data, limit=limit)


def _embedder(wl) -> bool:
    return wl.family == "hf" and wl.tokenizer is not None


@torch.no_grad()
def reference_embeddings(wl, reference) -> Optional[torch.Tensor]:
    """The reference model's embeddings of the held-out sentences (``None`` without a tokenizer),
    to compute once and hand to :func:`quality` for every model compared with it."""
    if not _embedder(wl):
        return None
    from ..data import corpus
    from ..models import minilm

    return minilm.embed(reference, wl.tokenizer, corpus.split("eval", n=EVAL_SENTENCES, shuffled=True, seed=0))


@torch.no_grad()
def quality(wl, model, reference, reference_emb: Optional[torch.Tensor] = None) -> dict:
    """Embedding cosine (mean and min over held-out numpy/scipy/torch sentences) for a model
    with a tokenizer; the workload's own measure otherwise. ``reference_emb``: the reference's
    embeddings from :func:`reference_embeddings` (computed here if not given)."""
    if _embedder(wl):
        from ..data import corpus
        from ..models import minilm

        held = corpus.split("eval", n=EVAL_SENTENCES, shuffled=True, seed=0)
        b = reference_emb if reference_emb is not None else minilm.embed(reference, wl.tokenizer, held)
        a = b if model is reference else minilm.embed(model, wl.tokenizer, held)
        cos = (a * b).sum(-1)
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    return wl.quality(model, reference)


def prune_to_speedup(wl, target: float, *, baseline: str = "best_dense", importance: str = "wanda",
                     patterns: Sequence[str] = DEFAULT_PATTERNS, example_inputs: Any = None,
                     threads: Optional[int] = None, calib_batches: int = 8, calib: Optional[str] = None,
                     exclude: Sequence[str] = (), reconstruct: bool = True, output: "str | Path | None" = None,
                     plot: Optional[str] = None, repeats: int = 30, progress: bool = False,
                     log: Callable[[str], None] = print, timing: Optional[dict] = None) -> dict:
    """Plans, prunes ``wl.model`` (in place), packs per plan, optionally saves and reloads it,
    and measures it against torch eager and the best dense path. Returns the numbers, with
    ``steps``: ``{step: seconds}`` in the order run (each also logged as it ends)."""
    from .. import io
    from ..bench import benchmark
    from ..prune import reconstruct as refit

    t0 = time.perf_counter()
    steps: dict = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:  # where the time goes, for whoever wants it faster
        now = time.perf_counter()
        steps[name] = now - clock[0]
        clock[0] = now
        log(f"   [{name}: {steps[name]:.1f} s]")

    model = wl.model.eval()
    dense = copy.deepcopy(model)
    inputs = example_inputs if example_inputs is not None else wl.example_inputs(None)
    ref_emb = reference_embeddings(wl, dense)  # once: the dense model is the reference of every comparison
    q_dense = quality(wl, dense, dense, ref_emb)
    lap("dense quality")

    pruner = Pruner(model, importance, target_speedup=target, baseline=baseline, example_inputs=inputs,
                    patterns=patterns, threads=threads, exclude=list(exclude), progress=progress, timing=timing)
    tables = pruner.tables
    table_s = time.perf_counter() - clock[0]
    log(f"time tables: {len(tables.layers)} layers, {table_s:.1f} s ({tables.cache_hits} from the cache, "
        f"{tables.cache_misses} measured; {tables.threads} threads)")
    lap("time tables")
    batches = calibration_batches(wl, calib_batches, calib)
    pruner.calibrate(batches, wl.loss_fn())
    lap("calibrate")
    plan = pruner.plan
    log(plan.table())
    lap("sensitivity tables + plan")
    if plot:
        plan.plot(plot)
        log(f"frontier plot: {plot}")
    while True:
        pruner.step()
        if pruner.done:
            break
    lap("prune")
    refit_errors = None
    if reconstruct and plan.pruned:
        from ..prune.reconstruct import mean_errors

        res = refit(model, dense, batches, progress=progress)
        n, before, after = mean_errors(res)
        refit_errors = (before, after)
        log(f"refit the kept weights of {n} layers to the dense outputs (mean output error {before:.3f} -> "
            f"{after:.3f})")
        lap("reconstruct")
    model.eval()
    sparse = pruner.sparsify(inputs)
    lap("pack")
    loaded = sparse
    file_bytes = None
    if output is not None:
        out = Path(output)
        io.save(sparse, out)
        loaded = io.load(out).eval()
        file_bytes = out.stat().st_size
        lap("save + reload")
    q_sparse = quality(wl, loaded, dense, ref_emb)
    lap("quality (eval split)")
    result = benchmark(dense, loaded, inputs, threads=threads, repeats=repeats, per_layer=False, verbose=False)
    lap("benchmark")
    base = result.best_dense if baseline == "best_dense" else result.dense
    measured = base.median / result.sparse.median
    return {"model": wl.name, "target": target, "baseline": baseline, "plan": plan,
            "predicted_speedup": plan.predicted_speedup, "measured_speedup": measured,
            "eager_ms": result.dense.median * 1e3,
            "best_dense_ms": None if result.best_dense is None else result.best_dense.median * 1e3,
            "sparse_ms": result.sparse.median * 1e3, "quality_dense": q_dense, "quality": q_sparse,
            "file_bytes": file_bytes, "table_seconds": table_s, "cache_hits": tables.cache_hits,
            "cache_misses": tables.cache_misses, "threads": result.threads, "refit": refit_errors,
            "sparse_model": loaded, "seconds": time.perf_counter() - t0, "machine": result.machine,
            "steps": steps}
