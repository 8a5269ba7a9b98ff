"""The whole job for a target speedup, as the command line and the demo run it:
plan, prune (SparseGPT by default for Hugging Face models), optionally refit and
recover (distillation from the dense model, masks kept), pack per plan, save,
reload, measure, judge quality.

Quality is judged on held-out text of *another source* than the calibration
and training text for sentence embedders (calibration: Python standard-library
prose, or the whole ``"train"`` split for SparseGPT; evaluation: numpy/scipy/torch
prose, :mod:`sparsert.data.corpus`), as mean and worst cosine similarity of the
embeddings to the dense model's.
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .pruner import Pruner, served_forward, served_sparse
from .tables import DEFAULT_PATTERNS, DEFAULT_SPARSITIES

__all__ = ["prune_to_speedup", "calibration_batches", "default_importance", "quality", "reference_embeddings",
           "recover_pruned", "recovery_steps_for", "recovery_start", "RECOVER_STARTS", "GRADUAL_MIN_STEPS"]

#: held-out evaluation sentences (corpus "eval" split) and calibration sentences
EVAL_SENTENCES = 256
CALIB_SENTENCES = 256


def _calibration_sentences(split: str, limit: int) -> list:
    from ..data import corpus

    return (corpus.split(split, n=32 * limit) if split == "calibration"
            else corpus.split(split, n=32 * limit, shuffled=True, seed=1))


def calibration_batches(wl, limit: int = 8, data: Optional[str] = None, split: str = "calibration") -> list:
    """Calibration batches: for a model with a tokenizer, sentences of the offline corpus's
    ``split`` (``"calibration"``: standard-library prose; ``"train"``: five sources, shuffled;
    never the evaluation source); otherwise the workload's own."""
    if data is None and wl.family == "hf" and wl.tokenizer is not None:
        from ..models import minilm

        return minilm.tokenize(wl.tokenizer, _calibration_sentences(split, limit), 32)[:limit]
    return wl.calibration(data, limit=limit)


def scoring_batches(wl, limit: int, calib_limit: int, calib_split: str, data: Optional[str] = None) -> Optional[list]:
    """Batches (32 sentences each) that score the planner's candidates: train-split sentences
    that are not among the calibration ones (``calib_limit`` batches of ``calib_split``), so
    neither the pruning nor the evaluation text chooses the plan. ``None`` (the planner then
    holds calibration batches out) for a model without a tokenizer, a causal LM (scored on its
    workload's text), or custom calibration ``data``."""
    if limit < 1 or data is not None or wl.family != "hf" or wl.tokenizer is None or wl.extra.get("causal_lm"):
        return None
    from ..data import corpus
    from ..models import minilm

    calib = set(_calibration_sentences(calib_split, calib_limit))
    sentences = [s for s in corpus.split("train", shuffled=True, seed=2) if s not in calib][:32 * limit]
    return minilm.tokenize(wl.tokenizer, sentences, 32)[:limit]


def default_importance(wl) -> str:
    """The criterion the planned path prunes with unless told: SparseGPT (masks and a
    compensating weight update, layer after layer) for Hugging Face models, whose quality
    one-shot magnitude/wanda pruning loses at the sparsities a speedup needs; magnitude
    for the small built-in examples."""
    return "sparsegpt" if wl.family == "hf" else "magnitude"


#: how a recovery run starts: ``"oneshot"`` prunes to the plan at once (SparseGPT by default), then
#: distils with the masks fixed; ``"gradual"`` raises every planned layer's sparsity to its planned
#: value on the cubic schedule while distilling (masks chosen as the model trains); ``"auto"``
#: picks gradual when the budget holds at least :data:`GRADUAL_MIN_STEPS` steps
RECOVER_STARTS = ("auto", "oneshot", "gradual")
#: MiniLM at 80% on 2 cores: the gradual start led SparseGPT one-shot + distillation at every
#: checkpoint from 1,500 steps (0.913 vs 0.897; 0.935 vs 0.914 at 3,000); runs of a few hundred
#: steps favoured the one-shot start
GRADUAL_MIN_STEPS = 1500
#: share of a gradual run's steps over which the sparsity ramps up (the rest distils at the plan)
GRADUAL_PRUNE_FRACTION = 0.5


def recovery_start(start: str, steps: int) -> str:
    """``"oneshot"`` or ``"gradual"`` for a recovery run of ``steps`` steps (see :data:`RECOVER_STARTS`)."""
    if start not in RECOVER_STARTS:
        raise ValueError(f"recover_start must be one of {RECOVER_STARTS}, not {start!r}")
    if start == "auto":
        return "gradual" if steps >= GRADUAL_MIN_STEPS else "oneshot"
    return start


def gradual_importance(importance: str) -> str:
    """The criterion that picks a gradual run's masks: SparseGPT's weight update needs each
    layer's whole mask at once, so its gradual runs choose masks with wanda (the same
    activation-weighted magnitudes, no update); other criteria serve as they are."""
    return "wanda" if importance == "sparsegpt" else importance


def recovery_steps_for(seconds: float, step_seconds: float) -> int:
    """Optimizer steps that fit ``seconds`` at ``step_seconds`` each (10% kept for the last
    checkpoint and the clock's noise), at least 1: the learning-rate schedule then decays
    to its end inside the budget instead of being cut off at its peak."""
    if step_seconds <= 0:
        raise ValueError("step_seconds must be > 0")
    return max(1, int(0.9 * seconds / step_seconds))


def _time_steps(student, teacher, batches, lr: float, probe_steps: int = 3, *, unmasked: Sequence[str] = (),
                **recipe) -> float:
    """Seconds per recovery step here: :func:`sparsert.prune.recover` run for ``probe_steps``
    on a copy of ``student`` (so the probe times exactly the recipe the real run uses,
    first-step warm-up included: a slight over-estimate, which keeps the run inside its budget).
    ``unmasked``: layers not pruned yet that the run will prune; the copy gives them all-true
    masks, so it trains what the pruned run trains through the same mask hooks."""
    from ..prune import recover
    from ..prune.masks import apply_mask

    probe = copy.deepcopy(student)
    for name in unmasked:
        module = probe.get_submodule(name)
        apply_mask(module, torch.ones_like(module.weight, dtype=torch.bool))
    result = recover(probe, teacher, batches, steps=probe_steps, pruner=None, lr=lr, **recipe)
    return result.elapsed / max(1, result.step)


def _steps_in_budget(seconds: float, minutes: float, time_step: Callable[[], float],
                     log: Callable[[str], None]) -> tuple:
    """``(steps, seconds left)``: the recovery steps that fit what is left of ``seconds`` once
    ``time_step()`` (the probe, part of the budget) has timed one; logged."""
    t_probe = time.perf_counter()
    step_s = time_step()
    left = max(0.0, seconds - (time.perf_counter() - t_probe))
    steps = recovery_steps_for(left, step_s)
    log(f"recovery: one distillation step takes {step_s:.2f} s here: {steps} steps in the "
        f"{left:.0f} s left of {minutes:g} min")
    return steps, left


def recover_pruned(model, dense, data: Sequence, minutes: float, *, steps: Optional[int] = None, lr: float = 1e-4,
                   checkpoint: "str | Path | None" = None, checkpoint_every: int = 100, progress: bool = False,
                   log: Callable[[str], None] = print, **recipe):
    """Distils ``dense`` into the pruned ``model`` (in place) on ``data`` for at most ``minutes``,
    with :func:`sparsert.prune.recover` and no pruner: the masks, hence every layer's sparsity
    and pattern, stay exactly as they are. ``steps`` (default: as many as a timed 3-step probe
    on a copy says fit the budget, the probe's time included) sets the LR schedule's length.
    ``recipe``: more options for ``recover`` (:func:`sparsert.models.catalogue.recovery_recipe`).
    Returns the :class:`~sparsert.prune.RecoveryResult`."""
    from ..prune import recover

    budget = minutes * 60.0
    if steps is None:
        steps, budget = _steps_in_budget(budget, minutes, lambda: _time_steps(model, dense, data, lr, **recipe), log)
    result = recover(model, dense, data, steps=steps, pruner=None, lr=lr, checkpoint=checkpoint,
                     checkpoint_every=checkpoint_every, time_budget=budget, progress=progress, **recipe)
    _log_recovery(result, log)
    return result


def _log_recovery(result, log: Callable[[str], None]) -> None:
    log(f"recovery: {result.step}/{result.steps} steps in {result.elapsed:.0f} s"
        + (f", distillation loss {result.losses[0]:.4g} -> {result.losses[-1]:.4g}" if result.losses else "")
        + ("" if result.done else " (time budget spent)"))


def gradual_checkpoint(checkpoint: "str | Path | None") -> Optional[Path]:
    """Where a gradual run keeps its checkpoint: beside a one-shot run's, never in its place
    (a one-shot run's weights and masks are no start for a gradual schedule, nor the reverse)."""
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}-gradual{path.suffix}")


def _recover_gradually(wl, model, dense, plan, importance: str, calib: Sequence, train: Sequence, steps: int,
                       budget: float, prune_frac: float, checkpoint, checkpoint_every: int, progress: bool,
                       log: Callable[[str], None], recipe: dict):
    """Gradual pruning to ``plan`` with distillation (``"gradual"`` in :data:`RECOVER_STARTS`):
    every planned layer goes from dense to its planned sparsity and pattern on the cubic
    schedule over the first ``prune_frac`` of ``steps`` (20 pruning steps), the masks chosen by
    :func:`gradual_importance` on ``calib``; the rest of the steps distil with the masks fixed.
    A run stopped by its ``budget`` before the schedule ends is pruned to the plan at once, so
    the model still has the planned speed (the log says so; the checkpoint continues the
    gradual run). Returns the :class:`~sparsert.prune.RecoveryResult`."""
    from ..prune import Gradual, Pruner as KernelFreePruner, recover

    end = max(1, int(steps * prune_frac))
    pruned = plan.pruned
    masks = KernelFreePruner(model, gradual_importance(importance), sparsity=0.5,
                             include=[l.name for l in pruned],
                             overrides={re.escape(l.name): {"sparsity": l.sparsity, "pattern": l.pattern}
                                        for l in pruned},
                             schedule=Gradual(begin_step=0, end_step=end, frequency=max(1, end // 20)),
                             progress=False)
    masks.calibrate(calib, wl.loss_fn())
    log(f"recovery: gradual pruning of {len(pruned)} layers to the plan over {end} of {steps} steps "
        f"({masks.criterion.name} masks), distilling all along")
    result = recover(model, dense, train, steps=steps, pruner=masks, checkpoint=gradual_checkpoint(checkpoint),
                     checkpoint_every=checkpoint_every, time_budget=budget, progress=progress, **recipe)
    _log_recovery(result, log)
    stopped_in_ramp = not masks.done
    while not masks.done:
        masks.step()
    if stopped_in_ramp:
        log(f"recovery: the time budget ended the schedule early (step {result.step} of {end}); the rest "
            "was pruned at once, without distillation")
    return result


def _embedder(wl) -> bool:
    """A sentence encoder (quality = embedding cosine); causal LMs are measured by perplexity."""
    return wl.family == "hf" and wl.tokenizer is not None and not wl.extra.get("causal_lm")


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


def _q(q: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in q.items())


def prune_to_speedup(wl, target: float, *, baseline: str = "best_dense", importance: Optional[str] = None,
                     patterns: Sequence[str] = DEFAULT_PATTERNS, example_inputs: Any = None,
                     threads: Optional[int] = None, calib_batches: int = 8, calib: Optional[str] = None,
                     calib_split: Optional[str] = None, sensitivity_method: str = "wanda",
                     exclude: Sequence[str] = (), reconstruct: bool = True, recover_minutes: float = 0.0,
                     recover_steps: Optional[int] = None, recover_lr: Optional[float] = None,
                     recover_start: str = "auto", recover_prune_frac: float = GRADUAL_PRUNE_FRACTION,
                     checkpoint: "str | Path | None" = None, checkpoint_every: int = 100,
                     output: "str | Path | None" = None,
                     plot: Optional[str] = None, repeats: int = 30, progress: bool = False,
                     log: Callable[[str], None] = print, timing: Optional[dict] = None,
                     sensitivity: Optional[dict] = None, score_candidates: int = 4,
                     calibrate_groups: bool = False, sparsities: Optional[Sequence[float]] = None,
                     measure_candidates: bool = False, score_batches: int = 8,
                     score_metric: Optional[str] = None, forward: str = "streamlined") -> dict:
    """Plans, prunes ``wl.model`` (in place), packs per plan, optionally saves and reloads it,
    and measures it against torch eager and the best dense path. Returns the numbers, with
    ``steps``: ``{step: seconds}`` in the order run (each also logged as it ends).

    ``importance``: the pruning criterion (default :func:`default_importance`: SparseGPT for
    Hugging Face models). ``calib_split``: the corpus split the calibration sentences come
    from (default ``"train"`` for SparseGPT, which profits from varied text, else
    ``"calibration"``). ``sensitivity_method``: the per-layer loss estimate the plan is solved
    with (``"wanda"``: masks alone, ~5x cheaper; ``"sparsegpt"``: the error left after
    SparseGPT's update). ``recover_minutes`` > 0: distil the dense model into the pruned one
    on the workload's training text for at most that long (:func:`sparsert.prune.recover`
    with the workload's :func:`~sparsert.models.catalogue.recovery_recipe`), starting as
    ``recover_start`` says (:data:`RECOVER_STARTS`): ``"oneshot"`` prunes to the plan first
    and keeps the masks, hence the plan's sparsity and patterns (:func:`recover_pruned`);
    ``"gradual"`` starts from the dense model and raises every planned layer to its planned
    sparsity and pattern on the cubic schedule over the first ``recover_prune_frac`` of the
    steps (masks by :func:`gradual_importance`), distilling all along; ``"auto"`` (default)
    goes gradual when the budget holds :data:`GRADUAL_MIN_STEPS` steps or more.
    ``recover_steps`` (default: as many as a timed 3-step probe says fit the budget),
    ``recover_lr`` (default: the recipe's), ``checkpoint`` (a file: a stopped run continues;
    a gradual run's is kept beside it with ``-gradual`` in its name) and ``checkpoint_every``
    are passed on.
    ``sensitivity``: ready sensitivity tables (``result["sensitivity_tables"]`` of an earlier
    run on the same model and data) instead of measuring them. ``score_candidates``: how many
    candidate plans to prune on a copy and score by the error at the model's output before
    choosing (0: the solver's plan as is; see :class:`~sparsert.planner.Pruner`);
    ``calibrate_groups``: also score the solver's plans on losses calibrated end to end per
    layer group (see there). ``sparsities``: the grid timed and scored per pattern (default
    :data:`~sparsert.planner.tables.DEFAULT_SPARSITIES`). ``measure_candidates``: pack and time
    each scored candidate end to end; one measured below 90% of the target does not win.
    ``score_batches``: batches of 32 train-split sentences, none used for calibration, that
    score the candidates (:func:`scoring_batches`; 0, or a workload without a tokenizer: a
    quarter of the calibration batches is held out instead). ``score_metric``: what the
    candidates are chosen by (:data:`~sparsert.planner.scoring.METRICS`; default
    ``"pooled_cosine"`` for a sentence encoder, whose quality is its pooled embedding's,
    else ``"cosine"``). ``forward``: how the model is timed while planning and measured at the
    end (:data:`~sparsert.convert.streamline.FORWARDS`): ``"streamlined"`` (default) through
    :func:`sparsert.streamline`'s lean forward where it takes the model, as ``sparsert serve``
    runs it; ``"hf"`` through the model's own.
    """
    from .. import io
    from ..bench import benchmark
    from ..prune import reconstruct as refit

    if recover_minutes < 0 or (recover_steps is not None and recover_steps < 1):
        raise ValueError("recover_minutes must be >= 0 and recover_steps >= 1")
    if (recover_steps is not None or checkpoint is not None) and not recover_minutes:
        raise ValueError("recover_steps and checkpoint are for a recovery run: give recover_minutes too")
    if checkpoint is not None and recover_steps is None:
        raise ValueError("a recovery checkpoint continues a run of a fixed length: give recover_steps too")
    if recover_start not in RECOVER_STARTS:
        raise ValueError(f"recover_start must be one of {RECOVER_STARTS}, not {recover_start!r}")
    if not 0.0 < recover_prune_frac <= 1.0:
        raise ValueError(f"recover_prune_frac must be in (0, 1], not {recover_prune_frac}")
    if checkpoint_every < 1:
        raise ValueError("checkpoint_every must be >= 1")
    train = None
    if recover_minutes:
        from ..models.catalogue import RECOVERY_SENTENCES

        train = wl.train_batches(RECOVERY_SENTENCES)
        if not train:
            raise ValueError(f"{wl.name}: no training data for recovery with this model")
    importance = default_importance(wl) if importance is None else importance
    if calib_split is None:
        calib_split = "train" if importance == "sparsegpt" else "calibration"

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

    score_data = scoring_batches(wl, score_batches, calib_batches, calib_split, calib) if score_candidates else None
    pruner = Pruner(model, importance, target_speedup=target, baseline=baseline, example_inputs=inputs,
                    patterns=patterns, threads=threads, exclude=list(exclude), include=wl.extra.get("include"),
                    progress=progress, timing=timing,
                    sensitivity_method=sensitivity_method, sensitivity=sensitivity,
                    score_candidates=score_candidates, score_data=score_data, calibrate_groups=calibrate_groups,
                    score_metric=score_metric or ("pooled_cosine" if _embedder(wl) else "cosine"),
                    measure_candidates=measure_candidates, forward=forward,
                    sparsities=DEFAULT_SPARSITIES if sparsities is None else sparsities)
    tables = pruner.tables
    table_s = time.perf_counter() - clock[0]
    log(f"time tables: {len(tables.layers)} layers, {table_s:.1f} s ({tables.cache_hits} from the cache, "
        f"{tables.cache_misses} measured; {tables.threads} threads)")
    lap("time tables")
    batches = calibration_batches(wl, calib_batches, calib, calib_split)
    pruner.calibrate(batches, wl.loss_fn())
    lap("calibrate")
    plan = pruner.plan
    log(plan.table())
    lap("sensitivity tables + plan")  # the candidates' end-to-end scoring, when on, is part of it
    if plot:
        plan.plot(plot)
        log(f"frontier plot: {plot}")
    start = None
    recipe: dict = {}
    recovery_budget = recover_minutes * 60.0
    if recover_minutes and plan.pruned:
        from ..models.catalogue import recovery_recipe

        if recover_steps is None:  # the start depends on the steps: time a few before pruning anything
            probe_recipe = recovery_recipe(wl, oneshot=True)  # either start's steps cost the same
            default_lr = probe_recipe.pop("lr")
            lr = default_lr if recover_lr is None else recover_lr
            planned = [l.name for l in plan.pruned]
            recover_steps, recovery_budget = _steps_in_budget(
                recovery_budget, recover_minutes,
                lambda: _time_steps(model, dense, train, lr, unmasked=planned, **probe_recipe), log)
        start = recovery_start(recover_start, recover_steps)
        recipe = recovery_recipe(wl, oneshot=start == "oneshot")
        if recover_lr is not None:
            recipe["lr"] = recover_lr
    q_oneshot = None
    recovered = None
    refit_errors = None
    if start == "gradual":
        recovered = _recover_gradually(wl, model, dense, plan, importance, batches, train, recover_steps,
                                       recovery_budget, recover_prune_frac, checkpoint, checkpoint_every,
                                       progress, log, recipe)
        lap("gradual pruning + recover")
    else:
        while True:
            pruner.step()
            if pruner.done:
                break
        lap("prune")
    if start != "gradual" and reconstruct and plan.pruned:
        from ..prune.reconstruct import mean_errors

        res = refit(model, dense, batches, progress=progress)
        n, before, after = mean_errors(res)
        refit_errors = (before, after)
        log(f"refit the kept weights of {n} layers to the dense outputs (mean output error {before:.3f} -> "
            f"{after:.3f})")
        lap("reconstruct")
    if start == "oneshot":
        q_oneshot = quality(wl, model, dense, ref_emb)
        log(f"quality after one-shot pruning: {_q(q_oneshot)}")
        lap("one-shot quality")
        recovered = recover_pruned(model, dense, train, recovery_budget / 60.0, steps=recover_steps,
                                   checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress,
                                   log=log, **recipe)
        lap("recover")
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
    # (as served: both through the lean forward where it takes the model, Q/K/V fused)
    result = benchmark(served_forward(dense, forward), served_sparse(loaded, forward, baseline, inputs), inputs,
                       threads=threads, repeats=repeats, per_layer=False, verbose=False)
    lap("benchmark")
    base = result.best_dense if baseline == "best_dense" else result.dense
    measured = base.median / result.sparse.median
    return {"model": wl.name, "target": target, "baseline": baseline, "forward": forward, "plan": plan,
            "predicted_speedup": plan.predicted_speedup, "measured_speedup": measured,
            "eager_ms": result.dense.median * 1e3,
            "best_dense_ms": None if result.best_dense is None else result.best_dense.median * 1e3,
            "sparse_ms": result.sparse.median * 1e3, "quality_dense": q_dense, "quality": q_sparse,
            "quality_oneshot": q_oneshot, "calib_split": calib_split,
            # what chose the masks: a gradual run's criterion where it differs from the one asked for
            "importance": gradual_importance(importance) if start == "gradual" else importance,
            "sensitivity_method": sensitivity_method,
            "recovery": None if recovered is None else {
                "start": start, "step": recovered.step, "steps": recovered.steps, "done": recovered.done,
                "seconds": recovered.elapsed, "resumed_from": recovered.resumed_from,
                "first_loss": recovered.losses[0] if recovered.losses else None,
                "last_loss": recovered.losses[-1] if recovered.losses else None},
            "file_bytes": file_bytes, "table_seconds": table_s, "cache_hits": tables.cache_hits,
            "cache_misses": tables.cache_misses, "threads": result.threads, "refit": refit_errors,
            "sparse_model": loaded, "seconds": time.perf_counter() - t0, "machine": result.machine,
            "steps": steps, "sensitivity_tables": pruner.sensitivity_tables}
