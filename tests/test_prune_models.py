"""End-to-end on real data: digits MLP/CNN and MiniLM (skips without its package)."""

import copy

import pytest
import torch

from sparsert.models import digits, minilm
from sparsert.prune import Pruner, finetune, parse_pattern, report


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: torch's thread pool only slows them down on a busy 2-core box
    with digits.single_thread():
        yield


def test_digits_data_is_the_real_dataset():
    d = digits.load_data()
    assert d.x_train.shape == (1347, 1, 8, 8) and d.x_test.shape == (450, 1, 8, 8)
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) == 1.0
    assert set(d.y_test.tolist()) == set(range(10))
    b = digits.batches(d.x_train, d.y_train, 100, seed=3)
    assert len(b) == 14 and torch.equal(b[0][0], digits.batches(d.x_train, d.y_train, 100, seed=3)[0][0])


@pytest.mark.slow
def test_digits_models_reach_97_percent_and_are_deterministic():
    d = digits.load_data()
    mlp = digits.train_mlp()
    cnn = digits.train_cnn()
    assert digits.accuracy(mlp, d.x_test, d.y_test) >= 0.97
    assert digits.accuracy(cnn, d.x_test, d.y_test) >= 0.97
    again = digits.train_mlp()
    assert again is not mlp  # a fresh copy every call, safe to prune
    for a, b in zip(mlp.parameters(), again.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_digits_mlp_taylor_4x1_90_percent_recovers_with_finetuning():
    d = digits.load_data()
    dense = digits.train_mlp()
    base = digits.accuracy(dense, d.x_test, d.y_test)
    model = copy.deepcopy(dense)
    train = digits.batches(d.x_train, d.y_train, 64)
    p = Pruner(model, importance="taylor", pattern="4x1", sparsity=0.9, scope="global",
               exclude=["classifier"], min_density=0.02)
    p.calibrate(train[:8])
    p.step()
    for name in ("fc1", "fc2"):
        w = getattr(model, name).weight.detach()
        assert parse_pattern("4x1").conforms(w != 0)
    r = report(model)
    pruned = {l.name: l for l in r.layers}
    total = pruned["fc1"].params + pruned["fc2"].params
    zeros = total - pruned["fc1"].nonzero - pruned["fc2"].nonzero
    assert zeros / total == pytest.approx(0.9, abs=1e-3)
    assert pruned["classifier"].sparsity == 0.0
    finetune(model, train, epochs=20, lr=3e-3, teacher=dense, progress=False)
    acc = digits.accuracy(model, d.x_test, d.y_test)
    assert acc >= base - 0.03, (acc, base)
    assert report(model).layers[0].sparsity == pytest.approx(pruned["fc1"].sparsity)


def test_minilm_sentences_are_real_and_disjoint():
    s = minilm.sentences()
    assert len(s) == 800 and len(set(s)) == 800
    assert not set(minilm.calibration_sentences(256)) & set(minilm.heldout_sentences(400))
    assert all(t[0].isupper() and t.endswith(".") and len(t.split()) >= 8 for t in s)


@pytest.mark.slow
def test_minilm_wanda_beats_magnitude_at_50_percent():
    reason = minilm.unavailable_reason()
    if reason:
        pytest.skip(f"MiniLM test skipped: {reason}")
    model, tok = minilm.load()
    held = minilm.heldout_sentences(48)
    dense = minilm.embed(model, tok, held)
    calib = minilm.tokenize(tok, minilm.calibration_sentences(64))
    cos = {}
    for crit in ("magnitude", "wanda"):
        m = copy.deepcopy(model)
        p = Pruner(m, importance=crit, pattern="unstructured", sparsity=0.5, include=["encoder"])
        assert len(p.layers) == 36 == len(minilm.encoder_linear_names(model))
        p.calibrate(calib)
        p.step()
        q = m.encoder.layer[0].attention.self.query.weight
        assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
        cos[crit] = (minilm.embed(m, tok, held) * dense).sum(-1).mean().item()
    assert cos["wanda"] > cos["magnitude"] + 0.05, cos
    assert cos["wanda"] > 0.8, cos
