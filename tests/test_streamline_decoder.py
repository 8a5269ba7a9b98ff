"""sparsert.streamline on LLaMA-style causal LMs: the lean decoder's logits equal Hugging Face's
(prefill, step by step through the KV cache, in chunks), greedy generation gives Hugging Face's
tokens, fused layers stay exact (plain, sparse, int8), save/load keep it, bad input is refused."""

import pytest
import torch
from torch import nn

import sparsert
from sparsert.convert.streamline_decoder import KVCache, StreamlinedDecoder, rebuild_decoder

transformers = pytest.importorskip("transformers")

VOCAB = 97


def tiny_lm(kind="llama", heads=6, kv_heads=2, layers=2, seed=0, tie=True, **extra):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                  tie_word_embeddings=tie, **extra)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "qwen2":  # q/k/v with biases
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **common))
    with torch.no_grad():  # nonzero biases and norm weights, so that they are checked
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval().double()


def token_ids(rows, tokens, seed=1):
    return torch.randint(0, VOCAB, (rows, tokens), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("kind,heads,kv_heads", [("llama", 6, 2), ("llama", 4, 4), ("llama", 6, 1),
                                                 ("qwen2", 6, 3), ("mistral", 6, 2)])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("rows,tokens", [(1, 1), (1, 9), (3, 17)])
def test_equals_hugging_face_in_float64(kind, heads, kv_heads, fuse, rows, tokens):
    model = tiny_lm(kind, heads, kv_heads)
    lean = sparsert.streamline(model, fuse_qkv=fuse)
    assert isinstance(lean, StreamlinedDecoder)
    assert lean.fused_qkv_layers == ([0, 1] if fuse else []) == lean.fused_gate_up_layers
    ids = token_ids(rows, tokens)
    want = logits(model, ids)
    torch.testing.assert_close(logits(lean, ids), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits(lean, ids, logits_to_keep=1), want[:, -1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("first", [1, 5, 12])
def test_the_cache_step_by_step_and_in_chunks(first):
    model = tiny_lm()
    lean = sparsert.streamline(model)
    ids = token_ids(2, 40)
    want = logits(model, ids)
    cache = lean.new_cache(2, capacity=2)  # small: it must grow (several times) and keep what it held
    got = [logits(lean, ids[:, :first], cache=cache, use_cache=True)]
    at = first
    for size in (1, 1, 3, 1, 7, 1):  # decode steps and chunks of new tokens after a cached prefix
        got.append(logits(lean, ids[:, at:at + size], cache=cache, use_cache=True))
        at += size
    assert cache.length == at and cache.capacity >= at
    torch.testing.assert_close(torch.cat(got, 1), want[:, :at], rtol=1e-11, atol=1e-11)


def test_use_cache_returns_a_cache_that_continues():
    model = tiny_lm()
    lean = sparsert.streamline(model)
    ids = token_ids(1, 10)
    with torch.no_grad():
        out = lean(input_ids=ids[:, :6], use_cache=True)
        assert isinstance(out.cache, KVCache) and out.cache.get_seq_length() == 6
        more = lean(input_ids=ids[:, 6:], cache=out.cache, use_cache=True, attention_mask=torch.ones(1, 10))
        assert lean(input_ids=ids).cache is None
    torch.testing.assert_close(more.logits, logits(model, ids)[:, 6:], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_generation_gives_hugging_faces_tokens(rows):
    model = tiny_lm()
    lean = sparsert.streamline(model)
    ids = token_ids(rows, 7)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, pad_token_id=0)
    got = lean.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                        do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(got, want)


def test_generation_stops_at_an_end_token_and_pads_finished_rows():
    model = tiny_lm()
    lean = sparsert.streamline(model)
    ids = token_ids(3, 5)
    free = lean.generate(ids, max_new_tokens=10, eos_token_id=[])  # no end token: all 10
    assert free.shape == (3, 15)
    end = int(free[0, 7])  # the token row 0 gives third (or earlier): an end token from there on
    got = lean.generate(ids, max_new_tokens=10, eos_token_id=end, pad_token_id=-1)
    for r in range(3):
        row = got[r, 5:].tolist()
        if end in row:
            cut = row.index(end)
            assert row[:cut + 1] == free[r, 5:5 + cut + 1].tolist() and set(row[cut + 1:]) <= {-1}
        else:
            assert row == free[r, 5:5 + len(row)].tolist()
    assert end in got[0, 5:8].tolist()
    forced = lean.generate(ids, max_new_tokens=4, min_new_tokens=4, eos_token_id=int(free[0, 5]))
    assert forced.shape == (3, 9) and int(free[0, 5]) not in forced[:, 5:].tolist()[0]
    assert lean.generate(ids, max_new_tokens=0).shape == (3, 5)


def test_float32_matches_hugging_face():
    model = tiny_lm().float()
    lean = sparsert.streamline(model)
    ids = token_ids(2, 21)
    torch.testing.assert_close(logits(lean, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
def test_float32_decode_steps_match_hugging_face_and_the_torch_path(heads, kv_heads, monkeypatch):
    # float32 on the CPU runs the native norms, SwiGLU and cached attention: step by step against
    # Hugging Face's whole-sequence logits, and against the same model on the torch path
    model = tiny_lm(heads=heads, kv_heads=kv_heads).float()
    lean = sparsert.streamline(model)
    ids = token_ids(2, 30)

    def steps():
        cache = lean.new_cache(2, capacity=4)
        got = [logits(lean, ids[:, :3], cache=cache, use_cache=True)]
        got += [logits(lean, ids[:, t:t + 1], cache=cache, use_cache=True) for t in range(3, 30)]
        return torch.cat(got, 1)

    native = steps()
    torch.testing.assert_close(native, logits(model, ids), rtol=1e-4, atol=1e-4)
    import sparsert.convert.streamline_decoder as sd

    monkeypatch.setattr(sd, "native_decoder_ops", lambda t: False)
    torch.testing.assert_close(native, steps(), rtol=1e-5, atol=1e-5)
    want = model.generate(ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=10,
                          do_sample=False, pad_token_id=0)
    monkeypatch.undo()
    assert torch.equal(lean.generate(ids[:, :5], max_new_tokens=10, eos_token_id=[]), want)


def prune(model, fraction=0.6, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name != "lm_head":
                m.weight.mul_((torch.rand(m.weight.shape, generator=g) > fraction).to(m.weight.dtype))
    return model


@pytest.mark.parametrize("precision,kind", [("fp32", "csr"), ("fp32", "rowgroup4"), ("int8", "q8bsr1x4")])
def test_sparse_layers_packed_alike_fuse_exactly_and_save(precision, kind, tmp_path):
    model = prune(tiny_lm().float())
    ids = token_ids(2, 6)
    example = {"input_ids": ids}
    sparse = sparsert.sparsify(model, kind, precision=precision, example_inputs=example, exclude=["lm_head"])
    lean = sparsert.streamline(sparse)
    assert lean.fused_qkv_layers == [0, 1] == lean.fused_gate_up_layers
    qkv = lean.model.layers[0].self_attn.qkv
    assert isinstance(qkv, sparsert.SparseLinear) and qkv.format == kind and qkv.out_features == 48 + 2 * 16
    a = sparse.model.layers[0].self_attn
    assert torch.equal(qkv.to_dense().weight, torch.cat([m.to_dense().weight for m in (a.q_proj, a.k_proj, a.v_proj)]))
    tol = 1e-5 if precision == "fp32" else 1e-4
    torch.testing.assert_close(logits(lean, ids), logits(sparse, ids), rtol=tol, atol=tol)
    path = tmp_path / "lean.sparsert"
    sparsert.save(lean, path)
    loaded = sparsert.load(path)
    assert isinstance(loaded, StreamlinedDecoder) and loaded.recipe() == lean.recipe()
    assert loaded.hf_class == "LlamaForCausalLM"
    assert loaded.model.embed_tokens.weight.data_ptr() == loaded.lm_head.weight.data_ptr()  # still tied
    assert torch.equal(logits(loaded, ids), logits(lean, ids))


def test_streamline_before_sparsify_packs_the_fused_layers(tmp_path):
    model = prune(tiny_lm().float())
    ids = token_ids(2, 6)
    lean = sparsert.streamline(model)
    names = [n for n, m in lean.named_modules() if isinstance(m, nn.Linear)]
    assert "model.layers.0.self_attn.qkv" in names and "model.layers.0.mlp.gate_up" in names
    sparse = sparsert.sparsify(lean, "csr", example_inputs={"input_ids": ids}, exclude=["lm_head"])
    assert isinstance(sparse.model.layers[0].mlp.gate_up, sparsert.SparseLinear)
    assert isinstance(sparse, StreamlinedDecoder)
    torch.testing.assert_close(logits(sparse, ids), logits(model, ids), rtol=1e-4, atol=1e-4)
    assert sparse.generate(ids, max_new_tokens=5, eos_token_id=[]).shape == (2, 11)


def test_partly_fused_model_saves_and_loads(tmp_path):
    model = tiny_lm(layers=3).float()
    lean = sparsert.streamline(model, fuse_qkv=False)
    from sparsert.convert.streamline import fuse_linears
    from sparsert.convert.streamline_decoder import _fuse_attention

    _fuse_attention(lean.model.layers[1].self_attn, fuse_linears)
    assert lean.recipe() == {"decoder": "llama", "fused_qkv": [1], "fused_gate_up": []}
    path = tmp_path / "partly.sparsert"
    sparsert.save(lean, path)
    loaded = sparsert.load(path)
    assert loaded.recipe() == lean.recipe()
    ids = token_ids(2, 5)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_the_model_passed_in_is_left_as_it_was():
    model = tiny_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparsert.streamline(model)
    assert hasattr(model.model.layers[0].self_attn, "q_proj")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_refusals():
    lean = sparsert.streamline(tiny_lm())
    ids = token_ids(2, 4)
    with pytest.raises(ValueError, match="unpadded"):
        lean(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="unpadded"):
        lean.generate(ids, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="input_ids must be"):
        lean(input_ids=ids[0])
    with pytest.raises(ValueError, match="input_ids must be"):
        lean(input_ids=ids[:, :0])
    with pytest.raises(ValueError, match="numbers positions"):
        lean(input_ids=ids, position_ids=torch.arange(4)[None])
    with pytest.raises(ValueError, match="cache holds"):
        lean(input_ids=ids, cache=lean.new_cache(3), use_cache=True)
    with pytest.raises(TypeError, match="KVCache"):
        lean(input_ids=ids, cache=transformers.DynamicCache(), use_cache=True)
    with pytest.raises(ValueError, match="greedily"):
        lean.generate(ids, do_sample=True)
    with pytest.raises(TypeError, match="unexpected"):
        lean.generate(ids, num_beams=4)
    with pytest.raises(ValueError, match="attention="):
        sparsert.streamline(tiny_lm(), attention="sdpa")
    with pytest.raises(RuntimeError, match="inference only"):
        lean.train()(input_ids=ids)
    with pytest.raises(ValueError, match="sliding-window"):
        sparsert.streamline(tiny_lm("qwen2", use_sliding_window=True, sliding_window=8))
    with pytest.raises(ValueError, match="silu"):
        sparsert.streamline(tiny_lm(hidden_act="gelu"))
    with pytest.raises(ValueError, match="recipe"):
        rebuild_decoder(tiny_lm(), {"decoder": "llama", "fused_qkv": []})
    with pytest.raises(ValueError, match="fused_qkv"):
        rebuild_decoder(tiny_lm(), {"decoder": "llama", "fused_qkv": [9], "fused_gate_up": []})
