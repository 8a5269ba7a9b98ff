"""sparsify(): the sparse model matches the pruned dense model; plans, BatchNorm folding, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsert
from sparsert.convert import SparsityPlan, candidate_formats, fold_batchnorm, timing
from sparsert.convert.plan import MAX_SPARSE_DENSITY
from sparsert.nn import DenseLinear, SparseConv2d, SparseLinear

FAST = dict(min_time=0.002, rounds=2)  # timing budget per candidate: enough to decide, fast tests


def magnitude_prune(model, sparsity=0.9, block=(1, 1), types=(nn.Linear, nn.Conv2d), only=None):
    """Zeroes the smallest-magnitude R x C blocks of every layer (a test helper, not the pruning library)."""
    r, c = block
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, types) or (only is not None and not only(name)):
                continue
            w = m.weight.reshape(m.weight.shape[0], -1)
            rows, cols = w.shape
            nbr, nbc = -(-rows // r), -(-cols // c)
            padded = F.pad(w.abs(), (0, nbc * c - cols, 0, nbr * r - rows))
            score = padded.reshape(nbr, r, nbc, c).sum((1, 3))
            k = int(sparsity * score.numel())
            if k == 0:
                continue
            thresh = score.flatten().kthvalue(k).values
            keep = (score > thresh).repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
            w.mul_(keep)
    return model


def assert_outputs_close(a, b, rtol=1e-4):
    if isinstance(a, torch.Tensor):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= rtol * scale + 1e-6
        return
    if hasattr(a, "to_tuple"):
        a, b = a.to_tuple(), b.to_tuple()
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert_outputs_close(x, y, rtol)


def mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10)).eval()


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(48, 96)
        self.fc2 = nn.Linear(96, 96)
        self.head = nn.Linear(96, 5)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = Block(16, 16, 1)
        self.layer2 = Block(16, 32, 2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def resnet():
    model = ResNet()
    with torch.no_grad():  # non-trivial running statistics so folding is really tested
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return model, inputs


def encoder_only(name):
    return name.startswith("encoder.")


# --------------------------------------------------------------------------- models
def test_mlp_auto_matches_pruned_dense_and_leaves_original():
    model = magnitude_prune(mlp(), 0.9)
    x = torch.randn(16, 64)
    sparse = sparsert.sparsify(model, example_inputs=(x,), **FAST)
    assert sparse is not model
    assert all(type(m) is not SparseLinear for m in model.modules())
    assert_outputs_close(sparse(x), model(x))
    plan = sparse.sparsity_plan
    assert isinstance(plan, SparsityPlan) and [d.name for d in plan] == ["0", "2", "4"]
    for d in plan:
        assert d.input_shape == (16, d.shape[1])
        assert set(d.candidates) >= {"dense", "csr"}
        assert all(t is not None and t > 0 for t in d.candidates.values())
        assert abs(d.density - 0.1) < 0.02
        chosen = sparse.get_submodule(d.name)
        if d.chosen == "dense":
            assert type(chosen) is DenseLinear  # the best dense path it was timed on
        else:
            assert isinstance(chosen, SparseLinear) and chosen.format == d.chosen
            best = min(d.candidates, key=d.candidates.get)
            assert d.chosen == best
            assert d.speedup == pytest.approx(d.candidates["dense"] / d.candidates[d.chosen])
    text = str(plan)
    assert "chosen" in text and "dense ms" in text and "csr ms" in text


def test_min_speedup_keeps_dense_when_not_beaten():
    model = magnitude_prune(mlp(), 0.5)
    x = torch.randn(4, 64)
    sparse = sparsert.sparsify(model, example_inputs=x, min_speedup=1e9, **FAST)
    assert all(d.chosen == "dense" and "only" in d.reason for d in sparse.sparsity_plan)
    assert not any(isinstance(m, SparseLinear) for m in sparse.modules())


def test_nearly_dense_layer_stays_dense_untimed_but_named_format_still_converts():
    # one zero per layer: "auto" used to convert such layers on timing noise
    model = mlp()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight[0, 0] = 0.0
    x = torch.randn(4, 64)
    sparse = sparsert.sparsify(model, example_inputs=x, min_speedup=1e-9, **FAST)  # any win would convert
    for d in sparse.sparsity_plan:
        assert d.chosen == "dense" and d.candidates == {} and "nearly dense" in d.reason
        assert d.density > MAX_SPARSE_DENSITY
        assert type(sparse.get_submodule(d.name)) is DenseLinear
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x))
    # a named format is the user's call: no density guard
    forced = sparsert.sparsify(model, format="csr", example_inputs=x, **FAST)
    assert all(d.chosen == "csr" for d in forced.sparsity_plan)


@pytest.mark.parametrize("kind", ["csr", "bsr4x1"])
def test_named_format_on_custom_module(kind):
    model = magnitude_prune(MLP().eval(), 0.8, block=(4, 1))
    x = torch.randn(3, 7, 48)
    sparse = sparsert.sparsify(model, kind, example_inputs=(x,), **FAST)
    for name in ("fc1", "fc2", "head"):
        mod = sparse.get_submodule(name)
        assert isinstance(mod, SparseLinear) and mod.format == kind
        assert sparse.sparsity_plan[name].candidates.keys() == {"dense", kind}
    assert_outputs_close(sparse(x), model(x))
    # without example inputs nothing is timed, everything is packed as asked
    untimed = sparsert.sparsify(model, kind)
    assert all(d.chosen == kind and d.speedup is None for d in untimed.sparsity_plan)
    assert_outputs_close(untimed(x), model(x))


def test_auto_without_example_inputs_times_default_rows():
    model = magnitude_prune(mlp(), 0.9)
    sparse = sparsert.sparsify(model, **FAST)
    for d in sparse.sparsity_plan:
        assert d.input_shape == (sparsert.convert.DEFAULT_TOKENS, d.shape[1])
        assert "random rows" in d.reason
    x = torch.randn(5, 64)
    assert_outputs_close(sparse(x), model(x))


def test_the_cold_rule_counts_rows_and_bytes(monkeypatch):
    # rows = every dimension but the last; the cold rule, only when the weights exceed the cache: twice
    # the cache, or the weights' own bytes where those are less (what the model streams between calls)
    assert timing.streams_its_weight((576,)) and timing.streams_its_weight((1, 16, 576))
    assert not timing.streams_its_weight((2, 9, 576)) and not timing.streams_its_weight((17, 8))
    weights = [torch.zeros(32, 32), torch.zeros(16, 32)]  # 6,144 bytes
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 6144)
    assert timing.cold_bytes_for(weights) == 0
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 6143)
    assert timing.cold_bytes_for(iter(weights)) == 6144
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 2000)
    assert timing.cold_bytes_for(iter(weights)) == 2 * 2000


def test_in_model_call_cycles_weights_inputs_and_outputs_out_of_the_cores_caches(monkeypatch):
    # a layer in a model finds neither its weights, nor its input, nor its output buffer in the core's
    # own caches: the timed call cycles copies of all three, each spread over twice the private caches
    monkeypatch.setattr(timing, "private_cache_bytes", lambda: 20_000)  # 2 threads: 80,000 bytes
    asked = []
    real = timing.cold_copies
    monkeypatch.setattr(timing, "cold_copies", lambda m, b, limit=4096: asked.append((b, limit)) or real(m, b, limit))
    lin = nn.Linear(32, 16)  # 2,112 bytes of parameters: 38 copies hold 80,000
    layers, inputs, outputs = [], [], []

    def seen(m, a):
        layers.append(id(m))
        inputs.append(a[0].data_ptr())

    lin.register_forward_pre_hook(seen)
    lin.register_forward_hook(lambda m, a, o: outputs.append(o.data_ptr()))
    x = torch.randn(8, 32)  # 1,024 bytes: 79 copies would hold 80,000, capped at 64; outputs 512 bytes
    n = timing.IN_MODEL_COPIES
    with torch.no_grad():
        call = timing.in_model_call(lin, x, threads=2)
        assert asked == [(80_000, n)]
        layers.clear(), inputs.clear(), outputs.clear()
        for _ in range(3 * n):
            call()
    assert len(set(layers)) == 38 and len(set(inputs)) == n
    assert len(set(outputs[-n:])) == n  # the last 64 outputs are alive: each call wrote new memory
    with torch.no_grad():  # cold: the copies hold the bytes asked, beyond IN_MODEL_COPIES
        timing.in_model_call(lin, x, cold_bytes=500_000)
    assert asked[-1] == (500_000, 4096)


def test_auto_times_layers_cold_when_the_models_weights_exceed_the_cache(monkeypatch):
    # a decode step reads every weight from memory: "auto" must time the candidates that way, not hot
    model = magnitude_prune(mlp(), 0.5)
    x = torch.randn(1, 64)
    hot = sparsert.sparsify(model, example_inputs=x, **FAST)
    assert not hot.sparsity_plan.cold and "out of the cache" not in str(hot.sparsity_plan)

    asked = []
    real = timing.cold_copies

    def counted(module, cold_bytes, limit=4096):
        out = real(module, cold_bytes, limit)
        held = sum(t.numel() * t.element_size() for c in out for t in [*c.parameters(), *c.buffers()])
        asked.append((cold_bytes, held))
        return out

    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 4096)  # the MLP's weights no longer fit
    monkeypatch.setattr(timing, "cold_copies", counted)  # (in_model_call's, which times every candidate)
    cold = sparsert.sparsify(model, example_inputs=x, **FAST)
    plan = cold.sparsity_plan
    assert plan.cold and "out of the cache" in str(plan)
    timed = [d for d in plan if d.candidates]
    assert timed and all(len(d.candidates) >= 2 for d in timed)
    # every candidate of every timed layer cycled through copies holding (at least) 2 x the cache
    cold_asked = [(b, held) for b, held in asked if b == 2 * 4096]
    assert len(cold_asked) == sum(len(d.candidates) for d in timed)
    assert all(held >= cold_bytes for cold_bytes, held in cold_asked)
    assert_outputs_close(cold(x), model(x))
    # many rows per call: each weight serves them all, timed in the cache (the last level) as before
    asked.clear()
    many = sparsert.sparsify(model, example_inputs=torch.randn(64, 64), **FAST)
    assert not many.sparsity_plan.cold and asked and all(b != 2 * 4096 for b, _ in asked)


def test_inplace_converts_the_model_itself():
    model = magnitude_prune(mlp(), 0.9)
    x = torch.randn(4, 64)
    ref = model(x)
    out = sparsert.sparsify(model, "csr", example_inputs=x, inplace=True, **FAST)
    assert out is model and isinstance(model[0], SparseLinear)
    assert_outputs_close(model(x), ref)


def test_cnn_with_residual_blocks_and_batchnorm():
    model = magnitude_prune(resnet(), 0.8)
    x = torch.randn(2, 3, 16, 16)
    sparse = sparsert.sparsify(model, example_inputs=(x,), **FAST)
    plan = sparse.sparsity_plan
    folded = dict(plan.folded)
    assert folded == {"stem.0": "stem.1", "layer1.conv1": "layer1.bn1", "layer1.conv2": "layer1.bn2",
                      "layer2.conv1": "layer2.bn1", "layer2.conv2": "layer2.bn2", "layer2.down.0": "layer2.down.1"}
    assert isinstance(sparse.layer1.bn1, nn.Identity)
    assert isinstance(model.layer1.bn1, nn.BatchNorm2d)  # the original keeps its BatchNorm
    assert_outputs_close(sparse(x), model(x))
    convs = [d for d in plan if d.type == "Conv2d"]
    assert len(convs) == 6
    forced = sparsert.sparsify(model, "csr", example_inputs=(x,), **FAST)
    n_sparse_convs = sum(isinstance(m, SparseConv2d) for m in forced.modules())
    assert n_sparse_convs == 6
    assert_outputs_close(forced(x), model(x))


def test_fold_batchnorm_off_and_in_train_mode():
    model = magnitude_prune(resnet(), 0.8)
    x = torch.randn(2, 3, 16, 16)
    kept = sparsert.sparsify(model, "csr", example_inputs=x, fold_bn=False, **FAST)
    assert kept.sparsity_plan.folded == [] and isinstance(kept.layer1.bn1, nn.BatchNorm2d)
    assert_outputs_close(kept(x), model(x))
    train = sparsert.sparsify(model.train(), "csr", example_inputs=x, **FAST)
    assert train.sparsity_plan.folded == []


def test_fold_batchnorm_in_sequential_without_inputs():
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        seq[1].running_mean.normal_()
        seq[1].running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 8, 8)
    ref = seq(x)
    folded = copy.deepcopy(seq)
    assert fold_batchnorm(folded) == [("0", "1")]
    assert isinstance(folded[1], nn.Identity)
    assert_outputs_close(folded(x), ref)


def test_bert_from_tiny_config():
    model, inputs = tiny_bert()
    magnitude_prune(model, 0.9, block=(4, 1), types=(nn.Linear,), only=encoder_only)
    sparse = sparsert.sparsify(model, example_inputs=inputs, **FAST)
    names = [d.name for d in sparse.sparsity_plan]
    assert len(names) == 12 and all(n.startswith("encoder.") for n in names)
    assert all("bsr4x1" in d.candidates for d in sparse.sparsity_plan)
    assert_outputs_close(sparse(**inputs).last_hidden_state, model(**inputs).last_hidden_state)
    forced = sparsert.sparsify(model, "bsr4x1", example_inputs=inputs, **FAST)
    assert sum(isinstance(m, SparseLinear) for m in forced.modules()) == 12
    assert_outputs_close(forced(**inputs), model(**inputs))


def test_minilm_80_percent_unstructured():
    minilm = pytest.importorskip("sparsert.models.minilm")
    if not minilm.available():
        pytest.skip(minilm.unavailable_reason())
    model, tok = minilm.load()
    magnitude_prune(model, 0.8, types=(nn.Linear,), only=encoder_only)
    sparse = sparsert.sparsify(model, "csr")  # no timing: the auto path is covered on tiny BERT
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == 36
    sentences = minilm.heldout_sentences(6)
    emb_dense = minilm.embed(model, tok, sentences)
    emb_sparse = minilm.embed(sparse, tok, sentences)
    assert (emb_dense * emb_sparse).sum(-1).min() > 0.9999


# --------------------------------------------------------------------------- formats
def test_candidate_formats_follow_the_mask():
    w = torch.randn(64, 64)
    unstructured = magnitude_prune(nn.Sequential(nn.Linear(64, 64)), 0.9)[0].weight
    blocky = magnitude_prune(nn.Sequential(nn.Linear(64, 64)), 0.9, block=(4, 1))[0].weight
    assert "bsr4x1" not in candidate_formats(unstructured)
    assert candidate_formats(unstructured)[:2] == ["dense", "csr"]
    kinds = candidate_formats(blocky)
    assert "bsr4x1" in kinds and "bsr1x4" not in kinds
    two_four = w.clone().reshape(64, 16, 4)
    two_four[..., :2] = 0
    assert "nm2:4" in candidate_formats(two_four.reshape(64, 64))
    assert not any(k.startswith("nm") for k in candidate_formats(unstructured))


# --------------------------------------------------------------------------- compile / export
def _sparse_mlp(kind="csr"):
    model = magnitude_prune(mlp(), 0.9)
    x = torch.randn(8, 64)
    return model, sparsert.sparsify(model, kind, example_inputs=x, **FAST), x


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside inductor
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    model, sparse, x = _sparse_mlp()
    compiled = torch.compile(sparse, fullgraph=True, backend=backend)
    with torch.no_grad():
        assert_outputs_close(compiled(x), model(x))
    explanation = torch._dynamo.explain(sparse)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_torch_compile_cnn_and_bert_have_no_breaks_at_our_ops():
    torch._dynamo.reset()
    cnn = magnitude_prune(resnet(), 0.8)
    x = torch.randn(1, 3, 16, 16)
    sparse = sparsert.sparsify(cnn, "csr", example_inputs=x, **FAST)
    compiled = torch.compile(sparse, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_outputs_close(compiled(x), cnn(x))
    model, inputs = tiny_bert()
    magnitude_prune(model, 0.9, block=(4, 1), types=(nn.Linear,), only=encoder_only)
    sparse_bert = sparsert.sparsify(model, "bsr4x1", example_inputs=inputs, **FAST)
    explanation = torch._dynamo.explain(sparse_bert)(**inputs)
    assert not [r for r in explanation.break_reasons if "sparsert" in str(r)]
    with torch.no_grad():
        out = torch.compile(sparse_bert, backend="aot_eager")(**inputs).last_hidden_state
    assert_outputs_close(out, model(**inputs).last_hidden_state)


def test_torch_export():
    model, sparse, x = _sparse_mlp("bsr4x1")
    exported = torch.export.export(sparse, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "sparsert.linear_bsr.default" in targets
    assert_outputs_close(exported.module()(x), model(x))
    cnn = magnitude_prune(resnet(), 0.8)
    xc = torch.randn(1, 3, 16, 16)
    sparse_cnn = sparsert.sparsify(cnn, "csr", example_inputs=xc, **FAST)
    exported_cnn = torch.export.export(sparse_cnn, (xc,))
    assert_outputs_close(exported_cnn.module()(xc), cnn(xc))


def test_torch_export_bert():
    model, inputs = tiny_bert()
    magnitude_prune(model, 0.9, types=(nn.Linear,), only=encoder_only)
    sparse = sparsert.sparsify(model, "csr", example_inputs=inputs, **FAST)
    exported = torch.export.export(sparse, (), kwargs=inputs)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count("sparsert.linear_bsr.default") == 12
    assert_outputs_close(exported.module()(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


# --------------------------------------------------------------------------- errors
def test_no_prunable_layer():
    with pytest.raises(ValueError, match="none of its 3 Linear/Conv2d layers has zero weights"):
        sparsert.sparsify(mlp())
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        sparsert.sparsify(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="nn.Module"):
        sparsert.sparsify("model")
    with pytest.raises(ValueError, match="unknown format"):
        sparsert.sparsify(magnitude_prune(mlp()), "coo")


def test_example_inputs_that_do_not_run_the_model():
    model = magnitude_prune(mlp(), 0.9)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="example_inputs do not run the model.*RuntimeError"):
        sparsert.sparsify(model, example_inputs=torch.randn(2, 63), inplace=True)
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU, nn.GELU) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unpackable_layer_rolls_back_inplace():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)).eval()
    with torch.no_grad():
        model[0].weight.view(16, 4, 4)[..., 2:] = 0   # 2:4
        model[1].weight[:, :8] = 0                    # not 2:4
    layers = list(model)
    with pytest.raises(ValueError, match="layer '1': cannot pack its weight as 'nm2:4'"):
        sparsert.sparsify(model, "nm2:4", example_inputs=torch.randn(2, 16), inplace=True)
    assert list(model) == layers  # the first swap was rolled back


class ReadsWeight(nn.Module):
    """A model whose forward reads a Linear's weight directly (it cannot be swapped)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        return F.linear(self.a(x), self.b.weight)


def test_model_that_reads_weights_directly_rolls_back_and_exclude_works():
    model = magnitude_prune(ReadsWeight().eval(), 0.5)
    a, b = model.a, model.b
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="no longer runs on example_inputs.*exclude"):
        sparsert.sparsify(model, "csr", example_inputs=x, inplace=True)
    assert model.a is a and model.b is b
    sparse = sparsert.sparsify(model, "csr", example_inputs=x, exclude=["b"])
    assert isinstance(sparse.a, SparseLinear) and type(sparse.b) is nn.Linear
    assert_outputs_close(sparse(x), model(x))


def test_layer_not_run_by_example_inputs_stays_dense():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    model = magnitude_prune(Branchy().eval(), 0.9)
    sparse = sparsert.sparsify(model, example_inputs=torch.randn(64, 8), min_speedup=1e-9, **FAST)
    assert sparse.sparsity_plan["unused"].chosen == "dense"
    assert sparse.sparsity_plan["unused"].reason == "not run by example_inputs"
    assert sparse.sparsity_plan["used"].chosen != "dense"


def test_threads_are_restored_and_verbose_prints(capsys):
    model = magnitude_prune(mlp(), 0.9)
    before = torch.get_num_threads()
    sparse = sparsert.sparsify(model, example_inputs=torch.randn(4, 64), threads=1, verbose=True, **FAST)
    assert torch.get_num_threads() == before
    assert sparse.sparsity_plan.threads == 1
    out = capsys.readouterr().out
    assert all(f"[sparsify] {d.name}: {d.chosen}" in out for d in sparse.sparsity_plan)
