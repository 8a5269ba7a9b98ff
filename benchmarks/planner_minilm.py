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
"""
import argparse
import copy
import json
import os
import re
import time

from sparsert import models
from sparsert.models.catalogue import RECOVERY_SENTENCES, recovery_recipe
from sparsert.bench import benchmark
from sparsert.planner import sparsify_planned, time_tables
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
ap.add_argument("--score-candidates", type=int, default=4,
                help="candidate plans scored end to end before choosing (0: the solver's plan, as before)")
ap.add_argument("--eval-candidates", action="store_true",
                help="also prune every other scored candidate (all calibration batches, one-shot) and measure its "
                     "eval-split quality: does the calibration output error rank them as the eval cosine does?")
ap.add_argument("--json", help="write the numbers here")
args = ap.parse_args()
targets = [float(t) for t in args.targets.split(",")]
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
t_all = time.perf_counter()


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
                             score_candidates=args.score_candidates)
    except ValueError as e:
        print(f"target {tgt}: {e}", flush=True)
        continue
    sens = r["sensitivity_tables"]
    plan = r["plan"]
    row(f"plan {tgt:g}", predicted=plan.predicted_speedup, measured=r["measured_speedup"],
        best_ms=r["best_dense_ms"], sparse_ms=r["sparse_ms"], oneshot=r["quality_oneshot"], quality=r["quality"],
        recovery=r["recovery"], steps=r["steps"], loss=plan.loss, label=plan.label,
        candidates=[c.as_dict() for c in plan.candidates])
    done = {plan.label: r["quality_oneshot"] or r["quality"]}  # one-shot eval quality per candidate label
    if args.eval_candidates:
        for c in plan.candidates:
            if c.label in done:
                continue
            m = copy.deepcopy(dense)
            kp = KFPruner(m, args.importance, include=[lp.name for lp in c.plan.pruned],
                          overrides={re.escape(lp.name): {"sparsity": lp.sparsity, "pattern": lp.pattern}
                                     for lp in c.plan.pruned})
            kp.calibrate(calibration_batches(wl, args.calib_batches, None, split))
            kp.step()
            done[c.label] = quality(wl, m, dense, ref_emb)
            print(f"candidate {c.label}: calibration 1-cos {c.cosine_error:.4f}, eval {done[c.label]}", flush=True)
        row(f"candidates {tgt:g}", **{c.label: {"predicted": c.plan.predicted_speedup, "loss": c.plan.loss,
                                                "calib_cosine_error": c.cosine_error, "calib_mse": c.mse,
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
    tab = time_tables(dense, [lp.name for lp in plan.layers], x, threads=args.threads)
    uplan = copy.deepcopy(plan)
    for lp in uplan.layers:
        lp.pattern, lp.sparsity = pat, float(s)
        lp.format = tab.layers[lp.name].options[pat][float(s)][1]
    fast = sparsify_planned(m, uplan, x)
    b = benchmark(dense, fast, x, threads=args.threads, repeats=30, per_layer=False, verbose=False)
    row(f"uniform {label} (near {tgt:g})", predicted=sp, measured=b.best_dense.median / b.sparse.median,
        best_ms=b.best_dense.median * 1e3, sparse_ms=b.sparse.median * 1e3, oneshot=q_one if rec else None,
        quality=quality(wl, fast, dense, ref_emb), recovery=rec, loss=loss)
print(f"total {time.perf_counter() - t_all:.0f} s; load {os.getloadavg()}", flush=True)
if args.json:
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1, default=str)
