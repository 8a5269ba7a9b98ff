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
* ``--start sparsegpt``: SparseGPT one-shot to the target, then distillation.

The run is resumable (``--checkpoint``, every ``--checkpoint-every`` steps)
and stops after ``--time-budget`` seconds (a partial run: run the same
command again to continue).

    python benchmarks/prune_recover.py --sparsity 0.8 --steps 2000 --time-budget 600 --checkpoint /tmp/r.pt
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from sparsert.data import corpus
from sparsert.models import minilm
from sparsert.prune import Gradual, Pruner, recover


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--start", choices=["gradual", "sparsegpt"], default="sparsegpt")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--prune-frac", type=float, default=0.5, help="gradual: share of the steps that prune")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train", type=int, default=20000, help="training sentences")
    ap.add_argument("--calib", type=int, default=256)
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
    calib = minilm.tokenize(tok, corpus.split("calibration", args.calib, shuffled=True, seed=0), batch_size=32)
    train_s = corpus.split("train", min(args.train, len(corpus.split("train"))), shuffled=True, seed=1)
    train = minilm.tokenize(tok, train_s, batch_size=args.batch, max_length=64)
    held = corpus.split("eval", args.heldout, shuffled=True, seed=0)
    dense = minilm.embed(teacher, tok, held)

    def cosine(m):
        c = (minilm.embed(m, tok, held) * dense).sum(-1)
        return c.mean().item(), c.min().item()

    student = copy.deepcopy(teacher)
    names = minilm.encoder_linear_names(teacher)
    t0 = time.perf_counter()
    if args.start == "sparsegpt":
        Pruner(student, importance="sparsegpt", pattern=args.pattern, sparsity=args.sparsity, include=names,
               progress=args.progress).calibrate(calib).step()
        pruner = None
    else:
        end = max(1, int(args.steps * args.prune_frac))
        pruner = Pruner(student, importance="wanda", pattern=args.pattern, sparsity=args.sparsity, include=names,
                        schedule=Gradual(begin_step=0, end_step=end, frequency=max(1, end // 20)),
                        progress=args.progress).calibrate(calib)
    before = cosine(student) if args.start == "sparsegpt" else None
    t_prune = time.perf_counter() - t0
    result = recover(student, teacher, train, steps=args.steps, pruner=pruner, lr=args.lr,
                     checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                     time_budget=args.time_budget, progress=args.progress)
    layers = dict(student.named_modules())
    sparsity = sum(int((layers[n].weight == 0).sum()) for n in names) / sum(layers[n].weight.numel() for n in names)
    after = cosine(student)
    state = "complete" if result.done else f"PARTIAL ({result.step}/{result.steps} steps)"
    print(f"all-MiniLM-L6-v2, {args.pattern} target {args.sparsity:.0%} ({args.start}); reached encoder sparsity "
          f"{sparsity:.1%}; training: {len(train_s)} sentences of the train split, batch {args.batch}, lr {args.lr}; "
          f"evaluation: {len(held)} eval-split sentences; {args.threads} thread(s).")
    if before:
        print(f"- one-shot {args.start}: cosine {before[0]:.4f} (min {before[1]:.4f}), {t_prune:.0f} s")
    print(f"- after recovery, {state}, {result.elapsed:.0f} s (resumed from step {result.resumed_from}): "
          f"cosine {after[0]:.4f} (min {after[1]:.4f}); loss {result.losses[0]:.4g} -> {result.losses[-1]:.4g}"
          if result.losses else "- no training step was run")


if __name__ == "__main__":
    main()
