"""The whole story on a real model, in a few minutes on 2 cores.

```
python -m sparsert.demo                          # all-MiniLM-L6-v2, 2x faster than the best dense path
python -m sparsert.demo --target-speedup 3       # ask for more
python -m sparsert.demo --recover-minutes 10     # more recovery, more quality kept
python -m sparsert.demo --model digits-cnn       # a small CNN (trained in seconds)
python -m sparsert.demo --model minilm --sparsity 0.5   # one sparsity for every layer (no planner)
```

By default the demo asks the planner (:mod:`sparsert.planner`) for a target
speedup: it times every layer of the model on this machine, plans per-layer
sparsity and pattern, prunes (MiniLM: SparseGPT, then ``--recover-minutes``
(default 2.5) of distillation from the dense model with the masks kept;
``--reconstruct``: a least-squares refit, slower), packs each layer in its
planned format, saves, reloads and measures, printing each step's seconds.
With ``--sparsity`` it runs the fixed-sparsity story instead (as with any of
``--pattern``, ``--epochs``):

1. train (digits) or load (MiniLM) the dense model and measure its quality;
2. prune it with :mod:`sparsert.prune` (importance scores on calibration data);
3. fine-tune with the masks kept (digits: labels; MiniLM: distillation from
   the dense model);
4. :func:`sparsert.sparsify`: every pruned layer gets its fastest format;
5. :func:`sparsert.save`, then :func:`sparsert.load` in place of the original;
6. print quality before/after, latency dense vs sparse (same process, same
   threads) and file size dense vs sparse.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

PRESETS = {
    "digits-cnn": dict(sparsity=0.9, pattern="4x1", importance="taylor", epochs=12, exclude=["classifier", "conv1"],
                       shape="256x1x8x8", reconstruct=False),
    "digits-mlp": dict(sparsity=0.9, pattern="4x1", importance="taylor", epochs=12, exclude=["classifier"],
                       shape="256x1x8x8", reconstruct=False),
    # One-shot wanda, then a least-squares refit of the kept weights on the
    # calibration sentences (MiniLM 50% unstructured: cosine 0.875 -> 0.961).
    "minilm": dict(sparsity=0.5, pattern="4x1", importance="wanda", epochs=2, exclude=["pooler"], shape="8x128",
                   reconstruct=True),
}


def _step(msg: str) -> float:
    print(f"\n== {msg}", flush=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


def _q(q: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in q.items())


def run(model_name: str = "digits-cnn", *, sparsity=None, pattern=None, importance=None, epochs=None,
        threads: int = 2, out_dir: str | None = None, shape: str | None = None,
        reconstruct: bool | None = None) -> dict:
    """Runs the demo; returns the numbers it printed."""
    import sparsert
    from sparsert import models
    from sparsert.models import parse_shape
    from sparsert.prune import Pruner, finetune, report
    from sparsert.prune import reconstruct as refit
    from sparsert.prune.reconstruct import mean_errors

    cfg = dict(PRESETS[model_name])
    for k, v in dict(sparsity=sparsity, pattern=pattern, importance=importance, epochs=epochs, shape=shape,
                     reconstruct=reconstruct).items():
        if v is not None:
            cfg[k] = v
    out = Path(out_dir or tempfile.mkdtemp(prefix="sparsert-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    t = _step(f"1. dense {model_name}")
    wl = models.build(model_name)
    dense = wl.model.eval()
    q_dense = wl.quality(dense, dense)
    print(f"   quality: {_q(q_dense)}")
    _done(t)

    t = _step(f"2. prune: {cfg['importance']} importance, {cfg['pattern']} blocks, sparsity {cfg['sparsity']}, "
              f"exclude {cfg['exclude']}")
    model = copy.deepcopy(dense)
    pruner = Pruner(model, importance=cfg["importance"], pattern=cfg["pattern"], sparsity=cfg["sparsity"],
                    exclude=cfg["exclude"])
    if pruner.criterion.needs_data:
        pruner.calibrate(wl.calibration(limit=8), wl.loss_fn())
    pruner.step()
    q_pruned = wl.quality(model, dense)
    print(f"   pruned weights: {report(model).sparsity:.1%}; quality right after pruning: {_q(q_pruned)}")
    if cfg["reconstruct"]:
        layers, before, after = mean_errors(refit(model, dense, wl.calibration(limit=8)))
        q_pruned = wl.quality(model, dense)
        print(f"   refit the kept weights of {layers} layers to the dense outputs (sparsert.prune.reconstruct; "
              f"mean output error {before:.3f} -> {after:.3f}); quality now: {_q(q_pruned)}")
    _done(t)

    t = _step(f"3. fine-tune {cfg['epochs']} epoch(s), masks kept")
    data = wl.train_batches()
    if wl.family == "digits":
        from sparsert.models import digits

        with digits.single_thread():
            finetune(model, data, epochs=cfg["epochs"], lr=1e-3)
    else:
        finetune(model, data, epochs=cfg["epochs"], lr=5e-5, teacher=dense, alpha=1.0,
                 distill_fn=lambda s, t_: torch.nn.functional.mse_loss(s, t_))
    model.eval()
    q_tuned = wl.quality(model, dense)
    print(f"   quality after fine-tuning: {_q(q_tuned)}")
    _done(t)

    t = _step(f"4. sparsify (each layer timed in every candidate format, {threads} threads)")
    inputs = wl.example_inputs(parse_shape(cfg["shape"]))
    sparse = sparsert.sparsify(model, example_inputs=inputs, threads=threads)
    print(sparse.sparsity_plan.table())
    _done(t)

    t = _step("5. save, then load into a fresh process-independent model")
    path = out / f"{model_name}.sparsert"
    sparsert.save(sparse, path)
    dense_st = out / f"{model_name}-dense.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(dense_st))
    dense_pt = out / f"{model_name}-dense.pt"
    torch.save(dense.state_dict(), dense_pt)
    t_load = time.perf_counter()
    loaded = sparsert.load(path)
    load_s = time.perf_counter() - t_load
    q_loaded = wl.quality(loaded, dense)
    print(f"   {path} loaded in {load_s * 1e3:.0f} ms; quality of the reloaded model: {_q(q_loaded)}")
    _done(t)

    t = _step(f"6. latency: dense vs sparse, same process, {threads} threads, input {cfg['shape']}")
    result = sparsert.benchmark(dense, loaded, inputs, threads=threads, verbose=False)
    print(result.table())
    _done(t)

    sizes = {"sparse_file": path.stat().st_size, "dense_safetensors": dense_st.stat().st_size,
             "dense_torch_save": dense_pt.stat().st_size}
    print("\n== summary")
    rows = [
        ("quality", f"{_q(q_dense)}", f"{_q(q_loaded)}"),
        ("latency (median)", f"{result.dense.median * 1e3:.3f} ms", f"{result.sparse.median * 1e3:.3f} ms "
                                                                    f"({result.speedup:.2f}x)"),
        ("file size", f"{sizes['dense_safetensors'] / 1e3:.1f} KB",
         f"{sizes['sparse_file'] / 1e3:.1f} KB ({sizes['dense_safetensors'] / sizes['sparse_file']:.2f}x smaller)"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "dense", "")])
    print(f"{'':{w0}}  {'dense':{w1}}  sparse")
    for a, b, c in rows:
        print(f"{a:{w0}}  {b:{w1}}  {c}")
    print(f"(files in {out}; total {time.perf_counter() - start:.0f} s; "
          f"inspect with: python -m sparsert inspect {path})")
    return {"quality_dense": q_dense, "quality_pruned": q_pruned, "quality_finetuned": q_tuned,
            "quality_loaded": q_loaded, "speedup": result.speedup, "dense_ms": result.dense.median * 1e3,
            "sparse_ms": result.sparse.median * 1e3, "sizes": sizes, "load_seconds": load_s, "path": str(path)}


#: minutes of recovery (distillation after planned one-shot pruning) the planned demo gives MiniLM
DEMO_RECOVER_MINUTES = 2.5


def _streamlined_latency(model_name: str, sparse, inputs, threads: int):
    """(best dense ms, sparse ms) with both models through ``sparsert.streamline``'s lean forward,
    timed interleaved; None for models it does not take (not a BERT-style encoder)."""
    import sparsert
    from sparsert import models
    from sparsert.convert.streamline import streamline

    try:
        lean_sparse = streamline(sparse)
        lean_dense = streamline(models.build(model_name).model)
    except (TypeError, ValueError):
        return None
    res = sparsert.benchmark(lean_dense, lean_sparse, inputs, threads=threads, per_layer=False, verbose=False)
    return res.best_dense.median * 1e3, res.sparse.median * 1e3


def run_planned(model_name: str = "minilm", target: float = 2.0, *, baseline: str = "best_dense", threads: int = 2,
                out_dir: str | None = None, shape: str | None = None, reconstruct: bool = False,
                calib_batches: int = 8, importance: str | None = None,
                recover_minutes: float | None = None, recover_start: str = "auto") -> dict:
    """The planner's story: ask for ``target`` x vs ``baseline``; returns the numbers it printed.

    Kept short for a first run: 8 calibration batches, no refit (``reconstruct``), and for
    MiniLM SparseGPT plus ``recover_minutes`` (default :data:`DEMO_RECOVER_MINUTES`; 0 for the
    digits examples) of recovery; quality is measured on the held-out eval split."""
    from sparsert import models
    from sparsert.models import parse_shape
    from sparsert.planner.plan import TargetUnreachable
    from sparsert.planner.workflow import prune_to_speedup

    out = Path(out_dir or tempfile.mkdtemp(prefix="sparsert-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    t = _step(f"1. dense {model_name}")
    wl = models.build(model_name)
    shape = shape or ("1x128" if wl.family == "hf" else PRESETS.get(model_name, {}).get("shape", "64x1x8x8"))
    inputs = wl.example_inputs(parse_shape(shape))
    _done(t)
    base = "the best dense path" if baseline == "best_dense" else "torch eager"
    if recover_minutes is None:
        recover_minutes = DEMO_RECOVER_MINUTES if wl.family == "hf" else 0.0
    t = _step(f"2. plan for {target:g}x faster than {base} (input {shape}, {threads} threads), prune, "
              + ("refit, " if reconstruct else "")
              + (f"recover ({recover_minutes:g} min), " if recover_minutes else "")
              + "pack per plan, save, reload, measure")
    path = out / f"{model_name}.sparsert"
    from safetensors.torch import save_file

    dense_st = out / f"{model_name}-dense.safetensors"  # before pruning (the model is pruned in place)
    save_file({k: v.contiguous() for k, v in wl.model.state_dict().items()}, str(dense_st))
    exclude = ["pooler"] if wl.family == "hf" else ["classifier"]
    def plan_prune_measure(target):
        return prune_to_speedup(wl, target, baseline=baseline, importance=importance, example_inputs=inputs,
                                threads=threads, exclude=exclude, output=path, plot=None, reconstruct=reconstruct,
                                calib_batches=calib_batches, recover_minutes=recover_minutes,
                                recover_start=recover_start)

    try:
        r = plan_prune_measure(target)
    except TargetUnreachable as err:  # raised before any pruning: the model is untouched
        # timings move from run to run (the share of the model no pruning changes most): a demo
        # asked for a bit more than this machine allows shows the closest plan instead of stopping
        target = round(0.95 * err.best, 2)
        print(f"   {err}\n   -> planning for {target:g}x instead (95% of the best reachable)")
        r = plan_prune_measure(target)
    _done(t)
    q = r["quality"]

    def qtext_of(q):
        return f"cosine mean {q['cosine_mean']:.4f}, min {q['cosine_min']:.4f}" if "cosine_mean" in q else _q(q)

    rec = r["recovery"]
    if rec and rec.get("start") == "gradual":
        how = f", pruned gradually over {rec['step']} recovery steps"
    elif rec:
        how = f", one-shot {qtext_of(r['quality_oneshot'])} before {rec['step']} recovery steps"
    else:
        how = ", one-shot"
    qtext = qtext_of(q) + f" ({r['importance']}{how})"
    print("\n== summary (quality on held-out text of another source than the calibration text)"
          if "cosine_mean" in q else "\n== summary")
    rows = [("latency, torch eager", f"{r['eager_ms']:.2f} ms"),
            ("latency, best dense path", f"{r['best_dense_ms']:.2f} ms"),
            ("latency, sparse (planned)", f"{r['sparse_ms']:.2f} ms: {r['measured_speedup']:.2f}x vs {base} "
                                          f"(asked {target:g}x, predicted {r['predicted_speedup']:.2f}x)"),
            ("quality kept", qtext),
            ("file size", f"{r['file_bytes'] / 1e6:.1f} MB sparse"
             + f" vs {dense_st.stat().st_size / 1e6:.1f} MB dense safetensors")]
    lean = _streamlined_latency(model_name, r["sparse_model"], inputs, threads) if wl.family == "hf" else None
    if lean is not None:  # both sides through the same lean forward (what `sparsert serve` runs)
        r["streamlined_ms"] = {"best_dense": lean[0], "sparse": lean[1]}
        rows.insert(3, ("latency, streamlined forward", f"best dense {lean[0]:.2f} ms, sparse {lean[1]:.2f} ms: "
                                                        f"{lean[0] / lean[1]:.2f}x (sparsert.streamline)"))
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:{w}}  {b}")
    print(f"(files in {out}; total {time.perf_counter() - start:.0f} s; inspect with: python -m sparsert inspect {path})")
    print("\nnext: python -m sparsert.demo --target-speedup 3      (more speed, less quality)\n"
          "      python -m sparsert.demo --recover-minutes 10    (longer recovery, more quality kept)\n"
          "      python -m sparsert.demo --model digits-cnn      (a CNN: conv layers planned too)\n"
          f"      sparsert prune {model_name} --target-speedup {target:g} --recover-minutes 5 -o out.sparsert")
    return {k: v for k, v in r.items() if k != "sparse_model"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsert.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(PRESETS), default="minilm")
    p.add_argument("--target-speedup", type=float, default=2.0,
                   help="the planner's target vs --baseline (default 2; ignored with --sparsity)")
    p.add_argument("--baseline", choices=["best_dense", "torch"], default="best_dense")
    p.add_argument("--sparsity", type=float)
    p.add_argument("--pattern")
    p.add_argument("--importance")
    p.add_argument("--epochs", type=int)
    p.add_argument("--shape", help="benchmark input shape (default: 256x1x8x8 digits, 8x128 MiniLM)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="directory for the files (default: a temporary directory)")
    p.add_argument("--recover-minutes", type=float, default=None,
                   help=f"planned demo: minutes of recovery (distillation from the dense model, masks kept) after "
                        f"one-shot pruning (default {DEMO_RECOVER_MINUTES:g} for minilm, 0 for digits; 0: off)")
    p.add_argument("--recover-start", choices=["auto", "oneshot", "gradual"], default="auto",
                   help="planned demo: prune one-shot then distil, or prune gradually while distilling (default "
                        "auto: gradual when the budget holds enough steps)")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="refit the kept weights after pruning (sparsert.prune.reconstruct; default: off for the "
                        "planned demo, on for minilm with --sparsity)")
    args = p.parse_args(argv)
    try:
        fixed = (args.sparsity, args.pattern, args.epochs)
        if args.recover_minutes is not None and args.recover_minutes < 0:
            raise ValueError("--recover-minutes must be >= 0")
        if all(v is None for v in fixed):  # no fixed-sparsity option given: the planner's story
            run_planned(args.model, args.target_speedup, baseline=args.baseline, threads=args.threads,
                        out_dir=args.out, shape=args.shape, reconstruct=bool(args.reconstruct),
                        importance=args.importance, recover_minutes=args.recover_minutes,
                        recover_start=args.recover_start)
            return 0
        if args.recover_minutes is not None:
            raise ValueError("--recover-minutes is for the planned demo (drop --sparsity/--pattern/--epochs)")
        run(args.model, sparsity=args.sparsity, pattern=args.pattern, importance=args.importance,
            epochs=args.epochs, threads=args.threads, out_dir=args.out, shape=args.shape,
            reconstruct=args.reconstruct)
    except (ValueError, OSError, ImportError) as e:
        if os.environ.get("SPARSERT_DEBUG"):
            raise
        print(f"sparsert.demo: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
