"""sparsert.streamline: the lean encoder forward equals Hugging Face's, fuses Q/K/V only where it
may, survives sparsify, save and load, and refuses what it does not reproduce."""

import copy

import pytest
import torch
from torch import nn

import sparsert
from sparsert.convert.streamline import KERNEL_ATTENTION_MAX_TOKENS, StreamlinedEncoder, rebuild

transformers = pytest.importorskip("transformers")


def tiny_encoder(kind="bert", layers=2, seed=0, **extra):
    torch.manual_seed(seed)
    common = dict(vocab_size=90, hidden_size=24, num_hidden_layers=layers, num_attention_heads=3,
                  intermediate_size=40, max_position_embeddings=600, **extra)
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(**common))
    else:
        model = transformers.RobertaModel(transformers.RobertaConfig(pad_token_id=1, **common))
    return model.eval().double()


def batch(rows, tokens, padded=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (rows, tokens), generator=g)
    mask = torch.ones(rows, tokens, dtype=torch.long)
    if padded and rows > 1:  # ragged rows: row r keeps a random prefix, at least one token
        for r in range(1, rows):
            keep = int(torch.randint(1, tokens + 1, (1,), generator=g))
            mask[r, keep:] = 0
            ids[r, keep:] = 1
    return ids, mask


def outputs(model, ids, mask, **kw):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **kw)
    return out.last_hidden_state, out.pooler_output


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("attention", ["auto", "kernel", "math", "sdpa"])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("rows,tokens,padded", [(1, 1, False), (1, 7, False), (4, 13, True), (3, 9, False),
                                                 (2, KERNEL_ATTENTION_MAX_TOKENS + 5, True)])
def test_equals_hugging_face_in_float64(kind, attention, fuse, rows, tokens, padded):
    model = tiny_encoder(kind)
    lean = sparsert.streamline(model, fuse_qkv=fuse, attention=attention)
    ids, mask = batch(rows, tokens, padded)
    for m in (mask, None):
        want_h, want_p = outputs(model, ids, m)
        got_h, got_p = outputs(lean, ids, m)
        torch.testing.assert_close(got_h, want_h, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_p, want_p, rtol=1e-12, atol=1e-12)
    assert lean.fused_qkv is fuse


@pytest.mark.parametrize("rows,tokens", [(1, 1), (1, 32), (5, 19), (3, 70)])
def test_float32_through_the_attention_kernel_matches_hugging_face(rows, tokens):
    model = tiny_encoder().float()
    lean = sparsert.streamline(model, attention="kernel")
    ids, mask = batch(rows, tokens)
    want_h, want_p = outputs(model, ids, mask)
    got_h, got_p = outputs(lean, ids, mask)
    torch.testing.assert_close(got_h, want_h, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got_p, want_p, rtol=2e-5, atol=2e-5)


def test_token_types_and_positions_pass_through():
    model = tiny_encoder()
    lean = sparsert.streamline(model)
    ids, mask = batch(3, 11)
    types = torch.randint(0, 2, ids.shape)
    positions = torch.arange(5, 16).expand(3, -1)
    for kw in ({"token_type_ids": types}, {"position_ids": positions}):
        torch.testing.assert_close(outputs(lean, ids, mask, **kw)[0], outputs(model, ids, mask, **kw)[0],
                                   rtol=1e-12, atol=1e-12)


def test_the_model_passed_in_is_left_as_it_was():
    model = tiny_encoder()
    before = copy.deepcopy(model.state_dict())
    sparsert.streamline(model)
    assert isinstance(model.encoder.layer[0].attention.self.query, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_streamlined_model_passed_again_is_copied_not_changed():
    lean = sparsert.streamline(tiny_encoder(), fuse_qkv=False, attention="math")
    again = sparsert.streamline(lean, attention="sdpa")
    assert again is not lean and again.fused_qkv and again.attention == "sdpa"
    assert lean.attention == "math" and lean.fused_layers == []


def test_fused_qkv_holds_the_three_weights_and_biases():
    model = tiny_encoder()
    lean = sparsert.streamline(model)
    s, fused = model.encoder.layer[1].attention.self, lean.encoder.layer[1].attention.self.qkv
    assert torch.equal(fused.weight, torch.cat([s.query.weight, s.key.weight, s.value.weight]))
    assert torch.equal(fused.bias, torch.cat([s.query.bias, s.key.bias, s.value.bias]))
    names = set(lean.state_dict())
    assert "encoder.layer.1.attention.self.qkv.weight" in names
    assert not any(".query." in n or ".key." in n or ".value." in n for n in names)


def prune_linears(model, share=0.75, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight[torch.rand(m.weight.shape, generator=g) < share] = 0


def test_sparsify_after_streamline_then_save_and_load(tmp_path):
    model = tiny_encoder().float()
    prune_linears(model)
    ids, mask = batch(4, 12)
    lean = sparsert.streamline(model)
    sparse = sparsert.sparsify(lean, "csr", example_inputs={"input_ids": ids, "attention_mask": mask})
    assert isinstance(sparse, StreamlinedEncoder)
    assert isinstance(sparse.encoder.layer[0].attention.self.qkv, sparsert.SparseLinear)
    want = outputs(model, ids, mask)[0]
    got = outputs(sparse, ids, mask)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    path = tmp_path / "lean.sparsert"
    sparsert.save(sparse, path)
    loaded = sparsert.load(path)
    assert isinstance(loaded, StreamlinedEncoder) and loaded.fused_layers == [0, 1]
    assert loaded.hf_class == "BertModel" and loaded.attention == "auto"
    assert torch.equal(outputs(loaded, ids, mask)[0], got)


@pytest.mark.parametrize("kind", ["csr", "rowgroup4", "bitmask16"])
def test_layers_packed_alike_are_packed_again_as_one(kind, tmp_path):
    model = tiny_encoder().float()
    prune_linears(model)
    ids, mask = batch(2, 6)
    sparse = sparsert.sparsify(model, kind, example_inputs={"input_ids": ids, "attention_mask": mask})
    lean = sparsert.streamline(sparse)
    assert lean.fused_layers == [0, 1]
    qkv = lean.encoder.layer[0].attention.self.qkv
    assert isinstance(qkv, sparsert.SparseLinear) and qkv.format == kind and qkv.out_features == 72
    s = sparse.encoder.layer[0].attention.self
    assert torch.equal(qkv.to_dense().weight, torch.cat([m.to_dense().weight for m in (s.query, s.key, s.value)]))
    torch.testing.assert_close(outputs(lean, ids, mask)[0], outputs(sparse, ids, mask)[0], rtol=1e-5, atol=1e-5)
    path = tmp_path / "fused.sparsert"
    sparsert.save(lean, path)
    assert torch.equal(outputs(sparsert.load(path), ids, mask)[0], outputs(lean, ids, mask)[0])


def test_layers_packed_differently_stay_three_calls():
    from sparsert.nn import surgery

    model = tiny_encoder().float()
    prune_linears(model)
    ids, mask = batch(2, 6)
    sparse = sparsert.sparsify(model, "csr", example_inputs={"input_ids": ids, "attention_mask": mask})
    key = sparse.encoder.layer[1].attention.self.key
    surgery.swap(sparse, "encoder.layer.1.attention.self.key", sparsert.SparseLinear.from_dense(key.to_dense(), "rowgroup4"))
    lean = sparsert.streamline(sparse)
    assert lean.fused_layers == [0]
    torch.testing.assert_close(outputs(lean, ids, mask)[0], outputs(sparse, ids, mask)[0], rtol=1e-5, atol=1e-5)


def test_partly_fused_model_saves_and_loads(tmp_path):
    model = tiny_encoder(layers=3).float()
    lean = sparsert.streamline(model, fuse_qkv=False)
    sparsert.streamline(lean, inplace=True)  # fuse all ...
    lean2 = sparsert.streamline(model, fuse_qkv=False)
    from sparsert.convert.streamline import _fuse_qkv

    _fuse_qkv(lean2.encoder.layer[1].attention.self)  # ... or only the middle layer
    assert lean.fused_layers == [0, 1, 2] and lean2.fused_layers == [1]
    path = tmp_path / "partly.sparsert"
    sparsert.save(lean2, path)
    loaded = sparsert.load(path)
    assert loaded.fused_layers == [1]
    ids, mask = batch(2, 5)
    torch.testing.assert_close(outputs(loaded, ids, mask)[0], outputs(model, ids, mask)[0], rtol=1e-5, atol=1e-5)


def test_refusals():
    model = tiny_encoder()
    with pytest.raises(ValueError, match="attention must be one of"):
        sparsert.streamline(model, attention="flash")
    with pytest.raises(TypeError, match="BERT-style encoder"):
        sparsert.streamline(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="decoder"):
        sparsert.streamline(transformers.BertModel(transformers.BertConfig(
            vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
            is_decoder=True)))
    lean = sparsert.streamline(model)
    ids, mask = batch(2, 4)
    with pytest.raises(RuntimeError, match="inference only"):
        lean.train()(input_ids=ids, attention_mask=mask)
    lean.eval()
    with pytest.raises(ValueError, match="attention_mask must have"):
        lean(input_ids=ids, attention_mask=mask[:, :2])
    with pytest.raises(ValueError, match="fused_layers"):
        rebuild(tiny_encoder(), {"attention": "auto", "fused_layers": [7]})
    with pytest.raises(ValueError, match="recipe"):
        rebuild(tiny_encoder(), {"attention": "auto"})


def test_a_file_with_a_bad_recipe_is_refused(tmp_path):
    import json

    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from sparsert import io

    path = tmp_path / "lean.sparsert"
    sparsert.save(sparsert.streamline(tiny_encoder().float()), path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    body = json.loads(meta["sparsert"])
    assert body["model"]["streamline"] == {"attention": "auto", "fused_layers": [0, 1]}
    for recipe in ({"attention": "auto", "fused_layers": [5]}, {"attention": "fast", "fused_layers": []},
                   "math"):
        body["model"]["streamline"] = recipe
        meta["sparsert"] = json.dumps(body, sort_keys=True)
        tensors = dict(st_load(raw))
        meta["sha256"] = io.schema.digest(meta["sparsert"], tensors)
        path.write_bytes(st_save(tensors, metadata=meta))
        with pytest.raises(io.SparsertFileError, match="cannot streamline"):
            sparsert.load(path)
