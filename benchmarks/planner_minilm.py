"""MiniLM and the planner: requested vs predicted vs measured speedup (vs the best dense path), and
the planner against uniform sparsity with one pattern at about the same predicted speed. One process;
quality = embedding cosine to the dense model on held-out numpy/scipy/torch prose (calibration: stdlib).

    python benchmarks/planner_minilm.py THREADS 1.5,2,3
"""
import os, sys, time, copy, json

from sparsert import models
from sparsert.bench import benchmark, best_dense_model
from sparsert.planner import Pruner, sparsify_planned
from sparsert.planner.workflow import calibration_batches, quality
from sparsert.prune import Pruner as KFPruner

threads = int(sys.argv[1]); targets = [float(t) for t in sys.argv[2].split(",")]
wl = models.build("minilm"); dense = wl.model.eval()
x = wl.example_inputs((1, 128))
batches = calibration_batches(wl, 8)
res = {}
t = time.perf_counter()
p0 = Pruner(copy.deepcopy(dense), "wanda", target_speedup=1.1, example_inputs=x, threads=threads, exclude=["pooler"])
print(f"tables: {time.perf_counter()-t:.2f} s, hits {p0.tables.cache_hits} misses {p0.tables.cache_misses}", flush=True)
tab = p0.tables
built = {}
t = time.perf_counter()
p0.calibrate(batches); _ = p0.plan
sens = p0.sensitivity_tables
print(f"sensitivity tables: {time.perf_counter()-t:.1f} s", flush=True)
for tgt in targets:
    m = copy.deepcopy(dense)
    try:
        p = Pruner(m, "wanda", target_speedup=tgt, example_inputs=x, threads=threads, exclude=["pooler"], sensitivity=sens)
    except ValueError as e:
        print(f"target {tgt}: {e}", flush=True); continue
    p.calibrate(batches)
    plan = p.plan
    print(plan.table().splitlines()[-1], flush=True)
    p.step()
    built[f"plan{tgt:g}"] = (p.sparsify(x), plan.predicted_speedup, plan)
# uniform single pattern at the planner's predicted speed for the 2x plan
if "plan2" in built:
    plan = built["plan2"][2]
    label, sp, loss = min(plan.uniform, key=lambda u: abs(u[1] - plan.predicted_speedup) if u[1] >= plan.predicted_speedup * 0.97 else 1e9)
    pat, s = label.split("@")
    print(f"uniform nearest the 2x plan: {label} predicted {sp:.2f}x loss {loss:.3f} (plan loss {plan.loss:.3f})", flush=True)
    m = copy.deepcopy(dense)
    kp = KFPruner(m, "wanda", pattern=pat, sparsity=float(s), exclude=["pooler"]); kp.calibrate(batches); kp.step()
    uplan = copy.deepcopy(plan)
    for lp in uplan.layers:
        lp.pattern, lp.sparsity, lp.format = pat, float(s), (tab.layers[lp.name].options[pat][float(s)][1])
    built[f"uniform {label}"] = (sparsify_planned(m, uplan, x), sp, None)
base = best_dense_model(dense)
for name, (model, pred, plan) in built.items():
    r = benchmark(dense, model, x, threads=threads, repeats=30, rounds=5, per_layer=False, verbose=False)
    q = quality(wl, model, dense)
    meas = r.best_dense.median / r.sparse.median
    res[name] = dict(predicted=pred, measured=meas, eager_ms=r.dense.median*1e3, best_ms=r.best_dense.median*1e3, sparse_ms=r.sparse.median*1e3, **q)
    print(name, json.dumps(res[name]), flush=True)
print("load", os.getloadavg())
