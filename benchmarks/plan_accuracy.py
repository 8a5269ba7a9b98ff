"""Where a planned model's time goes: each sparse layer in the model vs alone, and the rest.

    python benchmarks/plan_accuracy.py MODEL.sparsert [--model minilm] [--shape 1x128] [--threads 2]

The planner predicts a model's time as its measured remainder (attention, norms, embeddings) plus
each layer's isolated time from its tables. When a prediction misses, this says which part moved.
One process; the sparse model and the dense model on the best dense path are called in turn
(interleaved rounds, medians) with forward hooks timing every prunable layer inside the model;
then each sparse layer is timed alone on the input it got in the model, hot (the same module over
and over: weights in the cache) and cold (cycling through copies that hold twice the last-level
cache, as the planner times layers of models larger than the cache). Columns, per sparse layer:
in-model, alone hot, alone cold (ms); last lines: the totals, the layers left dense, and each model's
remainder (its time minus all its Linear / Conv2d layers' in-model time).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sparsert  # noqa: E402
from sparsert.bench import best_dense_model  # noqa: E402
from sparsert.convert.timing import call_model, call_times  # noqa: E402
from sparsert.models import build, parse_shape  # noqa: E402
from sparsert.nn import SparseConv2d, SparseLinear  # noqa: E402
from sparsert.planner.tables import cold_copies, last_level_cache_bytes  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("file", help="a sparsert file (e.g. the demo's minilm.sparsert)")
ap.add_argument("--model", default="minilm", help="the catalogue model it was pruned from (for its dense twin and inputs)")
ap.add_argument("--shape", default="1x128", help="input shape (default 1x128, the planner's for MiniLM)")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--rounds", type=int, default=20)
args = ap.parse_args()
torch.set_num_threads(args.threads)

wl = build(args.model)
x = wl.example_inputs(parse_shape(args.shape))
sparse = sparsert.load(args.file).eval()
dense = best_dense_model(wl.model.eval(), x).eval()


def hooked(model: nn.Module, kinds: tuple) -> tuple:
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    per_layer: dict = {n: [] for n in names}
    inputs: dict = {}
    start: dict = {}
    def before(n):
        def hook(module, args):  # returns None: the call's arguments stay as they are
            inputs.setdefault(n, args[0].detach().clone())
            start[n] = time.perf_counter()
        return hook

    def after(n):
        def hook(module, args, out):
            per_layer[n].append(time.perf_counter() - start[n])
        return hook

    for n in names:
        m = model.get_submodule(n)
        m.register_forward_pre_hook(before(n))
        m.register_forward_hook(after(n))
    return names, per_layer, inputs


# every Linear / Conv2d is hooked in both models, so each remainder is what lies outside all of them
s_names, s_layers, s_inputs = hooked(sparse, (SparseLinear, SparseConv2d, nn.Linear, nn.Conv2d))
d_names, d_layers, _ = hooked(dense, (SparseLinear, SparseConv2d, nn.Linear, nn.Conv2d))
dense_left = [n for n in s_names if not isinstance(sparse.get_submodule(n), (SparseLinear, SparseConv2d))]
s_names = [n for n in s_names if n not in dense_left]
totals: dict = {"sparse": [], "dense": []}
rests: dict = {"sparse": [], "dense": []}
with torch.inference_mode():
    for _ in range(3):
        call_model(sparse, x)
        call_model(dense, x)
    for d in (*s_layers.values(), *d_layers.values()):
        d.clear()
    for _ in range(args.rounds):
        for label, model, layers in (("sparse", sparse, s_layers), ("dense", dense, d_layers)):
            t0 = time.perf_counter()
            call_model(model, x)
            total = time.perf_counter() - t0
            totals[label].append(total)
            # each hooked layer runs once per call: its last sample is this call's
            rests[label].append(total - sum(v[-1] for v in layers.values() if v))

    def alone(mods, xi, calls=30):
        for m in mods:  # warm-up
            m(xi)
        turn = itertools.cycle(mods)
        return statistics.median(call_times(lambda: next(turn)(xi), 0.0, calls))

    cold = 2 * last_level_cache_bytes()
    print(f"{args.file}: {args.model} {args.shape}, {args.threads} threads, {args.rounds} rounds; "
          f"cold = cycling copies of {cold >> 20} MiB")
    print(f"{'layer':44s} {'format':11s} {'in model':>9s} {'alone hot':>10s} {'alone cold':>11s}")
    sums = [0.0, 0.0, 0.0]
    for n in s_names:
        m = sparse.get_submodule(n)
        xi = s_inputs[n]
        row = (statistics.median(s_layers[n]), alone([m], xi), alone(cold_copies(m, cold), xi))
        sums = [a + b for a, b in zip(sums, row)]
        print(f"{n:44s} {m.format:11s} " + " ".join(f"{v * 1e3:9.3f}" for v in row) + "  ms")
ms = {k: statistics.median(v) * 1e3 for k, v in totals.items()}
rest = {k: statistics.median(v) * 1e3 for k, v in rests.items()}
print(f"sparse layers: in model {sums[0] * 1e3:.2f} ms, alone hot {sums[1] * 1e3:.2f} ms, alone cold {sums[2] * 1e3:.2f} ms")
if dense_left:
    print(f"layers left dense: {len(dense_left)}, in model {sum(statistics.median(s_layers[n]) for n in dense_left) * 1e3:.2f} ms")
print(f"sparse model {ms['sparse']:.2f} ms (remainder {rest['sparse']:.2f} ms); dense model on the best dense "
      f"path {ms['dense']:.2f} ms (remainder {rest['dense']:.2f} ms); speedup {ms['dense'] / ms['sparse']:.2f}x")
