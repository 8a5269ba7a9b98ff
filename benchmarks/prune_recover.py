"""Recovery on all-MiniLM-L6-v2: pruning + distillation from the dense model, on unlabeled text.

Training text: the corpus' "train" split (stdlib, sympy, networkx, sklearn,
matplotlib docstrings); calibration: its "calibration" split (stdlib);
evaluation: the "eval" split (numpy / scipy / torch docstrings) — a
different source, never seen in training. Quality: cosine between the pruned
and the dense model's mean-pooled embeddings (mean / min) on held-out
sentences, before and after recovery.

Two ways to reach the target:

* ``--start gradual``: wanda masks on the cubic schedule (Zhu & Gupta)
  during the first ``--prune-frac`` of the steps, distilling all along;
* ``--start sparsegpt``: SparseGPT one-shot to the target, then distillation
  with the masks fixed (the default: it won on short budgets, see RESULTS.md).

The default recipe: the student in eval mode (no dropout), only the pruned
Linear layers trained (embeddings and norms stay the teacher's), loss = every
layer's hidden-state MSE + (1 - cosine) of the mean-pooled embeddings, training
sentences batched by length. ``--oneshot-cache FILE`` keeps the one-shot model
(weights and masks) so that several runs start from the same one-shot.

The run is resumable (``--checkpoint``, every ``--checkpoint-every`` steps)
and stops after ``--time-budget`` seconds (a partial run: run the same
command again to continue).

    python benchmarks/prune_recover.py --sparsity 0.8 --steps 2000 --time-budget 600 --checkpoint /tmp/r.pt
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

from sparsert.data import corpus
from sparsert.models import minilm
from sparsert.prune import Gradual, Pruner, apply_mask, get_mask, recover


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--start", choices=["gradual", "sparsegpt"], default="sparsegpt")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--prune-frac", type=float, default=0.5, help="gradual: share of the steps that prune")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train", type=int, default=20000, help="training sentences")
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--calib-split", choices=["calibration", "train"], default="train")
    ap.add_argument("--max-length", type=int, default=64, help="training sentences cut to this many tokens")
    ap.add_argument("--embedding-weight", type=float, default=1.0, help="weight of the pooled-embedding cosine loss")
    ap.add_argument("--hidden-weight", type=float, default=1.0, help="weight of the hidden-state MSE")
    ap.add_argument("--dropout", action="store_true", help="train with dropout (default: eval mode)")
    ap.add_argument("--train-params", choices=["all", "pruned"], default="pruned")
    ap.add_argument("--oneshot-cache", default=None, help="sparsegpt: load the one-shot model from / save it to")
    ap.add_argument("--heldout", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds of training in this call")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reason = minilm.unavailable_reason()
    if reason:
        raise SystemExit(reason)
    teacher, tok = minilm.load()
    calib = minilm.tokenize(tok, corpus.split(args.calib_split, args.calib, shuffled=True, seed=0), batch_size=32)
    train_s = corpus.split("train", min(args.train, len(corpus.split("train"))), shuffled=True, seed=1)
    train = minilm.length_batches(tok, train_s, args.batch, args.max_length, seed=2)
    held = corpus.split("eval", args.heldout, shuffled=True, seed=0)
    dense = minilm.embed(teacher, tok, held)

    def cosine(m):
        c = (minilm.embed(m, tok, held) * dense).sum(-1)
        return c.mean().item(), c.min().item()

    student = copy.deepcopy(teacher)
    names = minilm.encoder_linear_names(teacher)
    t0 = time.perf_counter()
    resuming = args.checkpoint is not None and Path(args.checkpoint).is_file()  # weights and masks are in it
    if args.start == "sparsegpt":
        cache = Path(args.oneshot_cache) if args.oneshot_cache else None
        if cache is not None and cache.is_file():
            saved = torch.load(cache, weights_only=True)
            student.load_state_dict(saved["state"])
            modules = dict(student.named_modules())
            for name, keep in saved["masks"].items():
                apply_mask(modules[name], keep)
        elif not resuming:
            Pruner(student, importance="sparsegpt", pattern=args.pattern, sparsity=args.sparsity, include=names,
                   scope="layer", progress=args.progress).calibrate(calib).step()
            if cache is not None:
                modules = dict(student.named_modules())
                torch.save({"state": student.state_dict(),
                            "masks": {n: get_mask(modules[n]).clone() for n in names}}, cache)
        pruner = None
    else:
        end = max(1, int(args.steps * args.prune_frac))
        pruner = Pruner(student, importance="wanda", pattern=args.pattern, sparsity=args.sparsity, include=names,
                        schedule=Gradual(begin_step=0, end_step=end, frequency=max(1, end // 20)),
                        progress=args.progress).calibrate(calib)
    before = cosine(student) if args.start == "sparsegpt" and not resuming else None
    t_prune = time.perf_counter() - t0
    result = recover(student, teacher, train, steps=args.steps, pruner=pruner, lr=args.lr,
                     checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                     time_budget=args.time_budget, progress=args.progress, embedding_weight=args.embedding_weight,
                     hidden_weight=args.hidden_weight, dropout=args.dropout, train=args.train_params)
    layers = dict(student.named_modules())
    sparsity = sum(int((layers[n].weight == 0).sum()) for n in names) / sum(layers[n].weight.numel() for n in names)
    after = cosine(student)
    state = "complete" if result.done else f"PARTIAL ({result.step}/{result.steps} steps)"
    print(f"all-MiniLM-L6-v2, {args.pattern} target {args.sparsity:.0%} ({args.start}); reached encoder sparsity "
          f"{sparsity:.1%}; training: {len(train_s)} sentences of the train split, batch {args.batch}, lr {args.lr}; "
          f"evaluation: {len(held)} eval-split sentences; {args.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.1f}.")
    if before:
        print(f"- one-shot {args.start}: cosine {before[0]:.4f} (min {before[1]:.4f}), {t_prune:.0f} s")
    ran = max(1, result.step - result.resumed_from)
    print(f"- after recovery, {state}, {result.elapsed:.0f} s = {result.elapsed / ran:.2f} s/step "
          f"(resumed from step {result.resumed_from}): "
          f"cosine {after[0]:.4f} (min {after[1]:.4f}); loss {result.losses[0]:.4g} -> {result.losses[-1]:.4g}"
          if result.losses else "- no training step was run")


if __name__ == "__main__":
    main()
