"""MiniLM and the planner: requested vs predicted vs measured speedup (vs the best dense path), quality
kept (embedding cosine to the dense model on held-out numpy/scipy/torch prose, another source than the
calibration and training text), and the planner against uniform sparsity with one pattern at about the
same predicted speed, both sides pruned with the same criterion and given the same recovery. One process.

    python benchmarks/planner_minilm.py THREADS 1.5,2,3                       # wanda one-shot (the first runs)
    python benchmarks/planner_minilm.py 1 1.5,2 --importance sparsegpt --recover-minutes 4 --uniform

Each plan runs the same code as ``sparsert prune --target-speedup`` and the demo
(:func:`sparsert.planner.workflow.prune_to_speedup`); the sensitivity tables are measured once and reused.
With ``--recover-minutes`` the one-shot quality is printed before recovery, so one run gives both rows.
``--score-candidates 0`` gives the solver's plan unscored (before end-to-end scoring); ``--eval-candidates``
prunes every scored candidate and prints its eval-split quality next to its calibration output error
(the solver's plan and the uniform plans that reach the same target are among them):

    python benchmarks/planner_minilm.py 2 1.5,2 --importance sparsegpt --eval-candidates --uniform --json F

``--compare-uniform 0.7,0.75,0.8,0.85,0.9`` prunes uniform models (each pattern of ``--compare-patterns``
at each sparsity; same criterion and calibration batches) and, at the end, times them and every plan's
sparse model in one interleaved loop against one best-dense baseline, so the planner and uniform sparsity
are compared at the speed *measured* in the same minute (a baseline measured minutes apart drifted by 15%
on a shared machine); for each plan it prints the uniform cosine interpolated at the plan's measured speedup.
"""
import argparse
import copy
import json
import os
import re
import time

import torch

from sparsert import models
from sparsert.models.catalogue import RECOVERY_SENTENCES, recovery_recipe
from sparsert.bench import benchmark, best_dense_model, thread_settings
from sparsert.convert.timing import call_model, call_times
from sparsert.planner import sparsify_planned, time_tables
from sparsert.planner.pruner import served_forward, served_sparse
from sparsert.planner.plan import fixed_plan
from sparsert.planner.workflow import (calibration_batches, prune_to_speedup, quality, recover_pruned,
                                       reference_embeddings)
from sparsert.prune import Pruner as KFPruner

ap = argparse.ArgumentParser()
ap.add_argument("threads", type=int)
ap.add_argument("targets")
ap.add_argument("--importance", default="wanda", choices=["wanda", "sparsegpt"])
ap.add_argument("--recover-minutes", type=float, default=0.0)
ap.add_argument("--recover-lr", type=float, default=None, help="default: the workload's recovery recipe")
ap.add_argument("--calib-batches", type=int, default=8)
ap.add_argument("--calib-split", default=None, help="default: train for sparsegpt, calibration for wanda")
ap.add_argument("--sensitivity-method", default="wanda", choices=["wanda", "sparsegpt"])
ap.add_argument("--uniform", action="store_true", help="also uniform sparsity, one pattern, nearest each plan")
ap.add_argument("--score-batches", type=int, default=8,
                help="batches of 32 train-split sentences (none calibrating) that score the candidates (0: hold "
                     "a quarter of the calibration batches out, as before)")
ap.add_argument("--score-candidates", type=int, default=4,
                help="candidate plans scored end to end before choosing (0: the solver's plan, as before)")
ap.add_argument("--eval-candidates", action="store_true",
                help="also prune every other scored candidate (all calibration batches, one-shot) and measure its "
                     "eval-split quality: does the calibration output error rank them as the eval cosine does?")
ap.add_argument("--calibrate-groups", action="store_true",
                help="also the candidates from per-layer losses calibrated end to end per layer group")
ap.add_argument("--measure-candidates", action="store_true",
                help="the planner packs and times each candidate; one measured below 90%% of the target does not win")
ap.add_argument("--sparsities", default=None, help="the planner's grid (default: DEFAULT_SPARSITIES)")
ap.add_argument("--compare-uniform", default="", help="sparsities of uniform models timed interleaved with the plans")
ap.add_argument("--compare-patterns", default="unstructured,4x1")
ap.add_argument("--forward", default="streamlined", choices=["streamlined", "hf"],
                help="plan and measure through sparsert.streamline's lean forward (as served; default) or Hugging "
                     "Face's own")
ap.add_argument("--json", help="write the numbers here")
args = ap.parse_args()
targets = [float(t) for t in args.targets.split(",")]
grid = {"sparsities": [float(v) for v in args.sparsities.split(",")]} if args.sparsities else {}
split = args.calib_split or ("train" if args.importance == "sparsegpt" else "calibration")
print(f"importance {args.importance}, calibration {args.calib_batches}x32 {split}-split sentences, recovery "
      f"{args.recover_minutes:g} min (lr {args.recover_lr or 'recipe'}), sensitivity {args.sensitivity_method}, "
      f"{args.threads} thread(s), {args.score_candidates} candidates scored; load {os.getloadavg()}", flush=True)

wl = models.build("minilm")
dense = copy.deepcopy(wl.model.eval())
x = wl.example_inputs((1, 128))
ref_emb = reference_embeddings(wl, dense)
train = wl.train_batches(RECOVERY_SENTENCES) if args.recover_minutes else None
recipe = recovery_recipe(wl)  # the same recovery as the planned path's, for the uniform models
if args.recover_lr is not None:
    recipe["lr"] = args.recover_lr
res, sens = {}, None
sparse_models = {}  # label -> (sparse model, eval quality, predicted speedup), timed together at the end
t_all = time.perf_counter()
calib = calibration_batches(wl, args.calib_batches, None, split)
pruned = {}  # ((layer, pattern, sparsity), ...) -> (one-shot pruned model, eval quality): each pruned once


def prune_fixed(choice):
    """``dense`` pruned one-shot with the criterion on all calibration batches, ``{layer: (pattern, s)}``."""
    key = tuple(sorted((n, p, round(float(sp), 6)) for n, (p, sp) in choice.items()))
    if key not in pruned:
        m = copy.deepcopy(dense)
        kp = KFPruner(m, args.importance, include=list(choice),
                      overrides={re.escape(n): {"sparsity": float(sp), "pattern": p} for n, (p, sp) in choice.items()})
        kp.calibrate(calib)
        kp.step()
        m.eval()
        pruned[key] = (m, quality(wl, m, dense, ref_emb))
    return pruned[key]



def row(name, **kw):
    res[name] = kw
    print("RESULT", name, json.dumps(kw, default=str), flush=True)


for tgt in targets:
    wl.model = copy.deepcopy(dense)
    try:
        r = prune_to_speedup(wl, tgt, importance=args.importance, example_inputs=x, threads=args.threads,
                             calib_batches=args.calib_batches, calib_split=split, exclude=["pooler"],
                             reconstruct=False, recover_minutes=args.recover_minutes, recover_lr=args.recover_lr,
                             sensitivity_method=args.sensitivity_method, sensitivity=sens, repeats=30,
                             score_candidates=args.score_candidates, score_batches=args.score_batches,
                             calibrate_groups=args.calibrate_groups,
                             sparsities=grid.get("sparsities"), measure_candidates=args.measure_candidates,
                             forward=args.forward)
    except ValueError as e:
        print(f"target {tgt}: {e}", flush=True)
        continue
    sens = r["sensitivity_tables"]
    plan = r["plan"]
    row(f"plan {tgt:g}", predicted=plan.predicted_speedup, measured=r["measured_speedup"],
        best_ms=r["best_dense_ms"], sparse_ms=r["sparse_ms"], oneshot=r["quality_oneshot"], quality=r["quality"],
        recovery=r["recovery"], steps=r["steps"], loss=plan.loss, label=plan.label,
        candidates=[c.as_dict() for c in plan.candidates], probes=[p.as_dict() for p in plan.probes],
        layers=[(lp.name, lp.pattern, lp.sparsity) for lp in plan.layers])
    sparse_models[f"plan {tgt:g}: {plan.label}"] = (r["sparse_model"], r["quality"], plan.predicted_speedup)
    done = {plan.label: r["quality_oneshot"] or r["quality"]}  # one-shot eval quality per candidate label
    if args.eval_candidates:
        for c in plan.candidates:
            if c.label in done:
                continue
            done[c.label] = prune_fixed({lp.name: (lp.pattern, lp.sparsity) for lp in c.plan.pruned})[1]
            print(f"candidate {c.label}: scoring {c.metric} error {c.error:.4f}, eval {done[c.label]}", flush=True)
        row(f"candidates {tgt:g}", **{c.label: {"predicted": c.plan.predicted_speedup, "loss": c.plan.loss,
                                                "calib_cosine_error": c.cosine_error, "calib_mse": c.mse,
                                                "calib_pooled_cosine_error": c.pooled_cosine_error,
                                                "chosen": c.chosen, "eval_oneshot": done.get(c.label)}
                                      for c in plan.candidates})
    if not args.uniform:
        continue
    # uniform: every planned layer one pattern and sparsity, the option nearest the plan's predicted speed
    label, sp, loss = min(plan.uniform, key=lambda u: abs(u[1] - plan.predicted_speedup)
                          if u[1] >= plan.predicted_speedup * 0.97 else 1e9)
    pat, s = label.split("@")
    print(f"uniform nearest the {tgt:g}x plan: {label} predicted {sp:.2f}x, estimated loss {loss:.3f} "
          f"(plan {plan.loss:.3f})", flush=True)
    t0 = time.perf_counter()
    m = copy.deepcopy(dense)
    kp = KFPruner(m, args.importance, pattern=pat, sparsity=float(s), include=[lp.name for lp in plan.layers])
    kp.calibrate(calibration_batches(wl, args.calib_batches, None, split))
    kp.step()
    prune_s = time.perf_counter() - t0
    q_one = quality(wl, m, dense, ref_emb)
    print(f"uniform one-shot ({prune_s:.0f} s): {q_one}", flush=True)
    rec = None
    if args.recover_minutes:
        rr = recover_pruned(m, dense, train, args.recover_minutes, **recipe)
        rec = {"step": rr.step, "steps": rr.steps, "seconds": rr.elapsed}
    m.eval()
    # each layer packed in the format its option was timed with (the tables come from the cache)
    tab = time_tables(served_forward(dense, args.forward, fuse_qkv=False), [lp.name for lp in plan.layers], x,
                      threads=args.threads, **grid)
    uplan = copy.deepcopy(plan)
    for lp in uplan.layers:
        lp.pattern, lp.sparsity = pat, float(s)
        lp.format = tab.layers[lp.name].options[pat][float(s)][1]
    fast = sparsify_planned(m, uplan, x)
    b = benchmark(served_forward(dense, args.forward), served_sparse(fast, args.forward, "best_dense", x), x,
                  threads=args.threads,
                  repeats=30, per_layer=False, verbose=False)
    row(f"uniform {label} (near {tgt:g})", predicted=sp, measured=b.best_dense.median / b.sparse.median,
        best_ms=b.best_dense.median * 1e3, sparse_ms=b.sparse.median * 1e3, oneshot=q_one if rec else None,
        quality=quality(wl, fast, dense, ref_emb), recovery=rec, loss=loss)
if args.compare_uniform and sens is not None:
    names = [lp.name for lp in plan.layers]
    tab = time_tables(served_forward(dense, args.forward, fuse_qkv=False), names, x, threads=args.threads,
                      **grid)  # cached: the formats the plans were timed in
    for pat in args.compare_patterns.split(","):
        for s in [float(v) for v in args.compare_uniform.split(",")]:
            if s not in tab.layers[names[0]].options.get(pat, {}):
                print(f"uniform {pat}@{s:g}: not a timed point, skipped", flush=True)
                continue
            choice = {n: (pat, s) for n in names}
            t0 = time.perf_counter()
            m, q = prune_fixed(choice)
            up = fixed_plan(tab, sens, 1.0, choice)
            sparse_models[f"uniform {pat}@{s:g}"] = (sparsify_planned(m, up, x), q, up.predicted_speedup)
            print(f"uniform {pat}@{s:g}: predicted {up.predicted_speedup:.2f}x, {q} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    # every sparse model and the best dense baseline timed in the same rounds, interleaved
    # (as served: through the lean forward unless --forward hf)
    runs = {"best dense": best_dense_model(served_forward(dense, args.forward)).eval(),
            **{k: served_sparse(v[0], args.forward, "best_dense", x) for k, v in sparse_models.items()}}
    samples = {k: [] for k in runs}
    with thread_settings(args.threads), torch.inference_mode():
        for m in runs.values():
            for _ in range(3):
                call_model(m, x)
        for _ in range(9):
            for k, m in runs.items():
                samples[k].extend(call_times(lambda: call_model(m, x), 0.15, 3))
    med = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    base = med["best dense"]
    print(f"\nmeasured interleaved ({args.threads} threads, 9 rounds, load {os.getloadavg()}): best dense "
          f"{base * 1e3:.2f} ms", flush=True)
    table = {}
    for k, (m, q, pred) in sparse_models.items():
        table[k] = {"predicted": pred, "measured": base / med[k], "ms": med[k] * 1e3, **q}
        print(f"  {k:45s} predicted {pred:.2f}x measured {base / med[k]:.2f}x ({med[k] * 1e3:.2f} ms)  "
              f"cos {q['cosine_mean']:.4f} / {q['cosine_min']:.4f}", flush=True)

    def uniform_at(pattern, speed):
        """The uniform cosine (mean, min) linearly interpolated at a measured speedup (None outside)."""
        pts = sorted((v["measured"], v["cosine_mean"], v["cosine_min"]) for k, v in table.items()
                     if k.startswith(f"uniform {pattern}@"))
        for (s0, m0, n0), (s1, m1, n1) in zip(pts, pts[1:]):
            if s0 <= speed <= s1 and s1 > s0:
                t = (speed - s0) / (s1 - s0)
                return m0 + t * (m1 - m0), n0 + t * (n1 - n0)
        return None

    for k, v in table.items():
        if k.startswith("plan"):
            v["uniform_at_measured"] = {p: uniform_at(p, v["measured"]) for p in args.compare_patterns.split(",")}
            print(f"  {k}: measured {v['measured']:.2f}x cos {v['cosine_mean']:.4f} / {v['cosine_min']:.4f}; uniform "
                  f"at that measured speed: " + ", ".join(
                      f"{p} {u[0]:.4f} / {u[1]:.4f}" if u else f"{p} out of range"
                      for p, u in v["uniform_at_measured"].items()), flush=True)
    row("interleaved", best_dense_ms=base * 1e3, models=table)
print(f"total {time.perf_counter() - t_all:.0f} s; load {os.getloadavg()}", flush=True)
if args.json:
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1, default=str)
