"""sparsert.export: dynamic shapes by default (batch, sequence), pinned on request, the user's own spec."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

from sparsert import io
from sparsert.io.export import input_shapes
from sparsert.nn import SparseLinear


def _prune(linear: nn.Linear, keep: float = 0.3) -> nn.Linear:
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < keep)
    return linear


@pytest.fixture(scope="module")
def sparse_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=40)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.startswith("encoder."):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, SparseLinear.from_dense(_prune(m), "csr"))
    return model


def _tokens(batch, seq):
    ids = torch.randint(0, 100, (batch, seq))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _hidden(out):
    return out["last_hidden_state"] if isinstance(out, dict) else out.last_hidden_state


@pytest.mark.parametrize("example_batch", [5, 1])
def test_bert_exported_with_one_batch_runs_with_others(tmp_path, sparse_bert, example_batch):
    """The issue's case: exported with batch 5, run with batch 3 (and other sequence lengths), also
    after saving and loading; an example of batch 1 does not pin the batch either."""
    program = io.export(sparse_bert, _tokens(example_batch, 16), tmp_path / "bert.pt2")
    assert io.sparse_op_count(program) == 6  # Q, K, V, attention output, FFN in and out
    assert input_shapes(program) == {"input_ids": "any x up to 40", "attention_mask": "any x up to 40"}
    loaded = torch.export.load(str(tmp_path / "bert.pt2"))
    for batch, seq in [(3, 16), (1, 7), (4, 40), (example_batch, 16)]:
        inputs = _tokens(batch, seq)
        with torch.no_grad():
            want = sparse_bert(**inputs).last_hidden_state
            for runner in (program.module(), loaded.module()):
                got = _hidden(runner(**inputs))
                assert got.shape == (batch, seq, 32)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="<= 40"):  # more tokens than the model's positions: refused
        loaded.module()(**_tokens(2, 41))


def test_dynamic_shapes_none_pins_every_size(tmp_path, sparse_bert):
    program = io.export(sparse_bert, _tokens(5, 16), tmp_path / "bert.pt2", dynamic_shapes=None)
    assert input_shapes(program) == {"input_ids": "5 x 16", "attention_mask": "5 x 16"}
    with pytest.raises(Exception, match="== 5"):
        program.module()(**_tokens(3, 16))


def test_the_users_own_dynamic_shapes(tmp_path, sparse_bert):
    batch = Dim("batch", max=8)
    spec = {"input_ids": {0: batch}, "attention_mask": {0: batch}}
    program = io.export(sparse_bert, _tokens(5, 16), tmp_path / "bert.pt2", dynamic_shapes=spec)
    assert input_shapes(program)["input_ids"] == "up to 8 x 16"
    with torch.no_grad():
        assert _hidden(program.module()(**_tokens(3, 16))).shape == (3, 16, 32)
    with pytest.raises(Exception):
        program.module()(**_tokens(3, 17))  # the sequence stayed fixed


def test_positional_inputs_and_a_fixed_feature_size(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear.from_dense(_prune(nn.Linear(20, 32)), "bsr4x1"), nn.ReLU(),
                          SparseLinear.from_dense(_prune(nn.Linear(32, 8)), "csr")).eval()
    program = io.export(model, (torch.randn(5, 20),), tmp_path / "mlp.pt2")
    assert input_shapes(program) == {"input": "any x 20"}
    x = torch.randn(3, 20)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
    # a bare tensor example takes a bare tensor's spec
    program = io.export(model, torch.randn(2, 20), tmp_path / "mlp1.pt2", dynamic_shapes={0: Dim("n")})
    with torch.no_grad():
        assert program.module()(x).shape == (3, 8)


def test_bad_dynamic_shapes(tmp_path):
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="dynamic_shapes must be 'auto', None"):
        io.export(model, torch.randn(2, 4), tmp_path / "x.pt2", dynamic_shapes="dynamic")
    with pytest.raises(TypeError, match="must be a dict by input name"):
        io.export(model, {"input": torch.randn(2, 4)}, tmp_path / "x.pt2", dynamic_shapes=({0: Dim("n")},))
