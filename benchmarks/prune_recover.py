"""Recovery: pruning + distillation from the dense model, on unlabeled text (MiniLM or SmolLM2).

Training text: the corpus' "train" split (stdlib, sympy, networkx, sklearn,
matplotlib docstrings; ``--train-split recovery``: those and eleven more
packages' docstrings, ~37,000 sentences); calibration: its "train" split too by default
(``--calib-split calibration``: stdlib only); evaluation: the "eval" split
(numpy / scipy / torch docstrings) — a different source, never seen in
training. Quality, before and after recovery:

* ``--model minilm`` (all-MiniLM-L6-v2): cosine between the pruned and the
  dense model's mean-pooled embeddings (mean / min) on held-out sentences;
* ``--model smollm2`` (SmolLM2-135M-Instruct): perplexity on held-out token
  windows and its ratio to the dense model's, with the calibration and
  held-out windows of ``prune_quality.py`` (so the one-shot numbers match).

Two ways to reach the target:

* ``--start gradual``: wanda masks on the cubic schedule (Zhu & Gupta)
  during the first ``--prune-frac`` of the steps, distilling all along;
* ``--start sparsegpt``: SparseGPT one-shot to the target, then distillation
  with the masks fixed (the default: it won on short budgets; at 80% over
  3,000 steps ``gradual`` won, 0.935 against 0.915: see RESULTS.md).

The default recipe: the student in eval mode (no dropout), only the pruned
Linear layers trained (embeddings, norms and SmolLM2's tied lm_head stay the
teacher's). Loss: every layer's hidden-state MSE, plus for MiniLM
(1 - cosine) of the mean-pooled embeddings (training sentences batched by
length), for SmolLM2 the KL divergence of the next-token distributions
(training windows of 128 tokens). ``--oneshot-cache FILE`` keeps the one-shot
model (weights and masks) so that several runs start from the same one-shot.

The run is resumable (``--checkpoint``, every ``--checkpoint-every`` steps)
and stops after ``--time-budget`` seconds (a partial run: run the same
command again to continue). ``--eval-every N`` measures the quality every N
steps (a quality-vs-steps table).

    python benchmarks/prune_recover.py --sparsity 0.8 --steps 2000 --time-budget 600 --checkpoint /tmp/r.pt
    python benchmarks/prune_recover.py --model smollm2 --sparsity 0.5 --steps 400 --lr 1e-4 \
        --eval-every 50 --time-budget 1500 --checkpoint /tmp/s.pt --oneshot-cache /tmp/s50.pt
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

from harness import lm_quality_windows

from sparsert.data import corpus
from sparsert.models import minilm
from sparsert.prune import Gradual, Pruner, apply_mask, get_mask, recover




def _minilm(args):
    """Teacher, calibration, training batches, pruned layer names, quality(model) -> (value, worst), labels."""
    reason = minilm.unavailable_reason()
    if reason:
        raise SystemExit(reason)
    teacher, tok = minilm.load()
    calib = minilm.tokenize(tok, corpus.split(args.calib_split, args.calib, shuffled=True, seed=0), batch_size=32)
    # the first --train of the shuffled split (as split(n=...) gives, without building the split twice)
    train_s = corpus.split(args.train_split, shuffled=True, seed=1)[:args.train]
    train = minilm.length_batches(tok, train_s, args.batch, args.max_length, seed=2)
    held = corpus.split("eval", args.heldout, shuffled=True, seed=0)
    dense = minilm.embed(teacher, tok, held)

    def cosine(m):
        c = (minilm.embed(m, tok, held) * dense).sum(-1)
        return c.mean().item(), c.min().item()

    about = (f"all-MiniLM-L6-v2; training: {len(train_s)} sentences of the {args.train_split} split, "
             f"batch {args.batch}; "
             f"evaluation: {len(held)} eval-split sentences")
    return teacher, calib, train, minilm.encoder_linear_names(teacher), cosine, ("cosine", "min"), about


def _smollm2(args):
    """As :func:`_minilm` for SmolLM2-135M: quality is the held-out perplexity and its ratio to dense."""
    from sparsert.models import smollm2

    reason = smollm2.unavailable_reason()
    if reason:
        raise SystemExit(reason)
    teacher, tok = smollm2.load()
    # the calibration and held-out windows of prune_quality.py (same one-shot, same dense perplexity)
    calib, held = lm_quality_windows(smollm2, tok, args.calib_split, args.calib_tokens, args.eval_tokens)
    # training: every window of the train split, batches in a seeded random order (one docstring's
    # sentences stay together inside a window)
    train = smollm2.token_batches(tok, corpus.split(args.train_split), args.max_length, args.batch)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(2)).tolist()
    train = [train[i] for i in order]
    dense_ppl = smollm2.perplexity(teacher, held)

    def perplexity(m):
        ppl = smollm2.perplexity(m, held)
        return ppl, ppl / dense_ppl

    tokens = sum(b["input_ids"].numel() for b in train)
    about = (f"SmolLM2-135M-Instruct (Q4_1 GGUF in fp32); training: {tokens} train-split tokens in windows of "
             f"{args.max_length}, batch {args.batch}; evaluation: {sum(b['input_ids'].numel() for b in held)} "
             f"eval-split tokens, dense perplexity {dense_ppl:.2f}")
    return teacher, calib, train, smollm2.linear_names(teacher), perplexity, ("perplexity", "x dense"), about


# per-model defaults: MiniLM's were measured in RESULTS.md; SmolLM2 distils logits (KL) and hidden states,
# with the sparsegpt objective that won there one-shot (target="pruned")
DEFAULTS = {
    "minilm": {"batch": 32, "max_length": 64, "lr": 1e-4, "embedding_weight": 1.0, "target": None},
    "smollm2": {"batch": 4, "max_length": 128, "lr": 1e-4, "embedding_weight": 0.0, "target": "pruned"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(DEFAULTS), default="minilm")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--start", choices=["gradual", "sparsegpt"], default="sparsegpt")
    ap.add_argument("--allocation", choices=["uniform", "owl", "sensitivity"], default="uniform",
                    help="how the target spreads over the layers (mean = --sparsity; see sparsert.prune.allocation)")
    ap.add_argument("--max-shift", type=float, default=0.2,
                    help="sensitivity allocation: each layer within --sparsity +- this")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--prune-frac", type=float, default=0.5, help="gradual: share of the steps that prune")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: minilm 32, smollm2 4)")
    ap.add_argument("--train", type=int, default=20000, help="training sentences (minilm)")
    ap.add_argument("--calib", type=int, default=512, help="calibration sentences (minilm)")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (smollm2)")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens (smollm2)")
    ap.add_argument("--calib-split", choices=["calibration", "train"], default="train")
    ap.add_argument("--train-split", choices=["train", "recovery"], default="train",
                    help="training text: the train split, or the larger recovery split (train + 11 more packages)")
    ap.add_argument("--max-length", type=int, default=None,
                    help="training sentences cut to (minilm, default 64) / training windows of (smollm2, 128) tokens")
    ap.add_argument("--embedding-weight", type=float, default=None,
                    help="weight of the pooled-embedding cosine loss (default: minilm 1, smollm2 0)")
    ap.add_argument("--hidden-weight", type=float, default=1.0, help="weight of the hidden-state MSE")
    ap.add_argument("--logit-weight", type=float, default=1.0, help="weight of the logits' KL divergence (LMs)")
    ap.add_argument("--target", choices=["dense", "pruned"], default=None,
                    help="SparseGPT objective (default: minilm the criterion's, smollm2 pruned)")
    ap.add_argument("--dropout", action="store_true", help="train with dropout (default: eval mode)")
    ap.add_argument("--train-params", choices=["all", "pruned"], default="pruned")
    ap.add_argument("--oneshot-cache", default=None, help="sparsegpt: load the one-shot model from / save it to")
    ap.add_argument("--heldout", type=int, default=400, help="held-out sentences (minilm)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4)")
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds of training in this call")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=0,
                    help="measure the quality every N steps too (a quality-vs-steps curve; needs --checkpoint)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.train < 1:
        raise SystemExit("--train must be at least 1 sentence")
    if args.eval_every and args.checkpoint is None:
        raise SystemExit("--eval-every continues the run from its checkpoint between measurements: give --checkpoint")
    torch.set_num_threads(args.threads)
    teacher, calib, train, names, quality, labels, about = (_minilm if args.model == "minilm" else _smollm2)(args)
    sparsegpt_options = {} if args.target is None else {"target": args.target}
    allocation = {"allocation": args.allocation}
    if args.allocation == "sensitivity":
        allocation["allocation_options"] = {"max_shift": args.max_shift}

    student = copy.deepcopy(teacher)
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
                   scope="layer", progress=args.progress, **allocation, **sparsegpt_options).calibrate(calib).step()
            if cache is not None:
                modules = dict(student.named_modules())
                torch.save({"state": student.state_dict(),
                            "masks": {n: get_mask(modules[n]).clone() for n in names}}, cache)
        pruner = None
    else:
        end = max(1, int(args.steps * args.prune_frac))
        pruner = Pruner(student, importance="wanda", pattern=args.pattern, sparsity=args.sparsity, include=names,
                        schedule=Gradual(begin_step=0, end_step=end, frequency=max(1, end // 20)),
                        progress=args.progress, **allocation).calibrate(calib)
    before = quality(student) if args.start == "sparsegpt" and not resuming else None
    t_prune = time.perf_counter() - t0
    if before:
        print(f"# step 0: {labels[0]} {before[0]:.4f} ({labels[1]} {before[1]:.4f}), one-shot {t_prune:.0f} s",
              flush=True)
    options = dict(pruner=pruner, lr=args.lr, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                   progress=args.progress, embedding_weight=args.embedding_weight, hidden_weight=args.hidden_weight,
                   logit_weight=args.logit_weight, dropout=args.dropout, train=args.train_params)
    budget_end = time.perf_counter() + args.time_budget
    curve, elapsed, first = [], 0.0, None
    done_steps = int(torch.load(args.checkpoint, weights_only=True)["step"]) if resuming and args.eval_every else 0
    while True:  # one call, or one per --eval-every steps (each continues from the checkpoint)
        stop = (done_steps // args.eval_every + 1) * args.eval_every if args.eval_every else None
        result = recover(student, teacher, train, steps=args.steps, stop_after=stop,
                         time_budget=max(0.0, budget_end - time.perf_counter()), **options)
        first = result if first is None else first
        done_steps = result.step
        elapsed += result.elapsed
        if not args.eval_every or result.done or result.step < (stop or 0) or result.step == result.resumed_from:
            break
        q = quality(student)
        curve.append((result.step, elapsed, q))
        print(f"# step {result.step}: {labels[0]} {q[0]:.4f} ({labels[1]} {q[1]:.4f}), {elapsed:.0f} s of training, "
              f"loss {result.losses[-1]:.4g}", flush=True)
    layers = dict(student.named_modules())
    sparsity = sum(int((layers[n].weight == 0).sum()) for n in names) / sum(layers[n].weight.numel() for n in names)
    after = quality(student)
    if curve and curve[-1][0] != result.step:
        curve.append((result.step, elapsed, after))
    state = "complete" if result.done else f"PARTIAL ({result.step}/{result.steps} steps)"
    if pruner is not None and args.allocation != "uniform":
        print("# layer sparsities: " + ", ".join(f"{n} {s:.3f}" for n, s in pruner.layer_sparsity.items()))
    print(f"{about}; {args.pattern} target {args.sparsity:.0%} ({args.start}, {args.allocation} allocation); "
          f"reached sparsity {sparsity:.1%}; "
          f"lr {args.lr}; {args.threads} thread(s); load average {os.getloadavg()[0]:.1f}.")
    if before:
        print(f"- one-shot {args.start}: {labels[0]} {before[0]:.4f} ({labels[1]} {before[1]:.4f}), {t_prune:.0f} s")
    if curve:
        print(f"\n| step | training s | {labels[0]} | {labels[1]} |\n| ---: | ---: | ---: | ---: |")
        if before:
            print(f"| 0 | 0 | {before[0]:.4f} | {before[1]:.4f} |")
        for step, secs, q in curve:
            print(f"| {step} | {secs:.0f} | {q[0]:.4f} | {q[1]:.4f} |")
        print()
    ran = max(1, result.step - first.resumed_from)
    print(f"- after recovery, {state}, {elapsed:.0f} s = {elapsed / ran:.2f} s/step "
          f"(resumed from step {first.resumed_from}): "
          f"{labels[0]} {after[0]:.4f} ({labels[1]} {after[1]:.4f}); loss {result.losses[0]:.4g} -> {result.losses[-1]:.4g}"
          if result.losses else "- no training step was run")


if __name__ == "__main__":
    main()
