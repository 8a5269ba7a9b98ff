"""Every importance criterion x pattern on the digits MLP and CNN, with fine-tuning.

For each model (trained to >= 97% test accuracy on scikit-learn's digits) and
each criterion, prune every Linear/Conv2d except the classifier to 90% sparsity
(unstructured, and 4x1 blocks) with one global ranking (each layer keeps at
least 2% of its weights), then fine-tune for a few epochs with knowledge
distillation from the dense model. Prints a markdown table.

    python benchmarks/prune_digits.py [--epochs 30] [--models mlp cnn]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from sparsert.models import digits
from sparsert.prune import CRITERIA, Pruner, finetune, parse_pattern, report

PATTERNS = ["unstructured", "4x1"]


def run(model_name: str, criterion: str, pattern: str, args, dense, data, train) -> dict:
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    pruner = Pruner(
        model, importance=criterion, pattern=pattern, sparsity=args.sparsity, scope="global",
        exclude=["classifier"], min_density=0.02, progress=False,
    )
    pruner.calibrate(train[: args.calib_batches])
    pruner.step()
    t_prune = time.perf_counter() - t0
    acc_pruned = digits.accuracy(model, data.x_test, data.y_test)
    rep = report(model)
    layers = [l for l in rep.layers if l.name != "classifier"]
    sparsity = 1 - sum(l.nonzero for l in layers) / sum(l.params for l in layers)
    structured = all(
        parse_pattern(pattern).conforms(dict(model.named_modules())[l.name].weight.detach() != 0)
        for l in layers
    )
    t1 = time.perf_counter()
    finetune(model, train, epochs=args.epochs, lr=args.lr, teacher=dense, progress=args.progress)
    t_ft = time.perf_counter() - t1
    rep_after = report(model)
    kept_zeros = all(a.nonzero == b.nonzero for a, b in zip(rep.layers, rep_after.layers))
    return dict(
        model=model_name, criterion=criterion, pattern=pattern, sparsity=sparsity,
        acc_pruned=acc_pruned, acc_ft=digits.accuracy(model, data.x_test, data.y_test),
        structured=structured, kept_zeros=kept_zeros, t_prune=t_prune, t_ft=t_ft,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--calib-batches", type=int, default=8, help="64-image calibration batches")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny models: threads only add overhead

    data = digits.load_data()
    train = digits.batches(data.x_train, data.y_train, 64)
    rows, base = [], {}
    for name in args.models:
        dense = digits.train_mlp() if name == "mlp" else digits.train_cnn()
        base[name] = digits.accuracy(dense, data.x_test, data.y_test)
        for crit in args.criteria:
            for pat in PATTERNS:
                r = run(name, crit, pat, args, dense, data, train)
                r["dense"] = base[name]
                rows.append(r)
                print(
                    f"# {name} {crit:9s} {pat:12s} sparsity {r['sparsity']:.3f} pruned {r['acc_pruned']:.4f} "
                    f"finetuned {r['acc_ft']:.4f} (dense {base[name]:.4f})",
                    flush=True,
                )

    print()
    print(f"Dense test accuracy: " + ", ".join(f"{k.upper()} {v:.2%}" for k, v in base.items())
          + f" (450 test images). Target sparsity {args.sparsity:.0%} over all layers but the "
          f"classifier, global ranking, min density 2%; fine-tuning {args.epochs} epochs Adam "
          f"lr {args.lr} with distillation from the dense model (alpha 0.5, T 2).\n")
    print("| model | criterion | pattern | sparsity | acc. after pruning | acc. after fine-tuning "
          "| Δ vs dense (points) | pattern ok | zeros kept | prune s | fine-tune s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | :---: | :---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['model'].upper()} | {r['criterion']} | {r['pattern']} | {r['sparsity']:.1%} "
            f"| {r['acc_pruned']:.2%} | {r['acc_ft']:.2%} | {100 * (r['acc_ft'] - r['dense']):+.2f} "
            f"| {'yes' if r['structured'] else 'NO'} | {'yes' if r['kept_zeros'] else 'NO'} "
            f"| {r['t_prune']:.2f} | {r['t_ft']:.1f} |"
        )
    print("\nBest criterion per model and pattern (target: within 1.5 points of dense):\n")
    print("| model | pattern | best criterion | acc. after fine-tuning | Δ (points) | target met |")
    print("| --- | --- | --- | ---: | ---: | :---: |")
    for name in args.models:
        for pat in PATTERNS:
            cand = [r for r in rows if r["model"] == name and r["pattern"] == pat]
            best = max(cand, key=lambda r: r["acc_ft"])
            delta = 100 * (best["acc_ft"] - best["dense"])
            print(f"| {name.upper()} | {pat} | {best['criterion']} | {best['acc_ft']:.2%} | {delta:+.2f} "
                  f"| {'yes' if delta >= -1.5 else 'NO'} |")


if __name__ == "__main__":
    main()
