"""The best-dense backend matches F.linear (checked against float64) on every path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsert.ops.backends.best_dense import PackedDenseLinear, gemv_available, onednn_available, path_for

ONE_TOKEN = "gemv" if gemv_available() else "torch"  # the default path of a 1-token call

BACKENDS = ["torch"] + (["onednn"] if onednn_available() else [])


def reference(x, w, b, activation):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return torch.relu(y) if activation == "relu" else y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_f, in_f", [(1, 1), (7, 5), (33, 17), (129, 65), (300, 768)])
@pytest.mark.parametrize("tokens", [1, 3, 16, 130])
def test_matches_linear(backend, out_f, in_f, tokens):
    gen = torch.Generator().manual_seed(out_f * 100 + in_f + tokens)
    w = torch.randn(out_f, in_f, generator=gen)
    b = torch.randn(out_f, generator=gen)
    x = torch.randn(tokens, in_f, generator=gen)
    for bias in (None, b):
        layer = PackedDenseLinear(w, bias, backend=backend)
        assert layer.backend == backend
        for activation in (None, "relu"):
            y = layer(x, activation)
            ref = reference(x, w, bias, activation)
            assert y.dtype == torch.float32 and y.shape == (tokens, out_f)
            tol = 1e-5 * (1 + ref.abs().max().item()) * (1 + in_f ** 0.5)
            assert (y.double() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_strided_and_empty_inputs(backend):
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(9, 20, generator=gen), torch.randn(9, generator=gen)
    layer = PackedDenseLinear(w, b, backend=backend)
    x3 = torch.randn(2, 3, 20, generator=gen)
    assert torch.allclose(layer(x3), F.linear(x3, w, b), atol=1e-5)
    xs = torch.randn(4, 30, generator=gen)[:, 5:25]
    assert torch.allclose(layer(xs), F.linear(xs, w, b), atol=1e-5)
    assert layer(torch.zeros(0, 20)).shape == (0, 9)
    assert torch.equal(layer.weight, w)


def test_other_dtypes_and_gradients_take_the_plain_path():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 10, generator=gen)
    layer = PackedDenseLinear(w)
    x64 = torch.randn(3, 10, dtype=torch.float64, generator=gen)
    assert layer(x64).dtype == torch.float64
    assert torch.allclose(layer(x64), F.linear(x64, w.double()))
    xg = torch.randn(3, 10, generator=gen, requires_grad=True)
    layer(xg).sum().backward()
    assert torch.allclose(xg.grad, w.sum(0).expand(3, 10))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        PackedDenseLinear(torch.zeros(3))
    with pytest.raises(ValueError, match="bias"):
        PackedDenseLinear(torch.zeros(3, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="backend"):
        PackedDenseLinear(torch.zeros(3, 4), backend="mkl")
    layer = PackedDenseLinear(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="features"):
        layer(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="activation"):
        layer(torch.zeros(2, 4), "gelu")


def test_dense_linear_is_an_nn_linear_on_the_best_dense_path(tmp_path):
    import sparsert
    from torch import nn

    from sparsert.nn import DenseLinear
    gen = torch.Generator().manual_seed(8)
    lin = nn.Linear(24, 10)
    layer = DenseLinear.from_linear(lin)
    assert isinstance(layer, nn.Linear) and not layer.weight.requires_grad
    assert layer.weight.data_ptr() == lin.weight.data_ptr()  # shares the storage, no copy
    for tokens in (1, 2, 9):
        x = torch.randn(tokens, 24, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(layer(x).double(), F.linear(x.double(), lin.weight.double(),
                                                                   lin.bias.double()), rtol=1e-5, atol=1e-5)
    # an in-place edit of the weight re-packs it
    with torch.no_grad():
        layer.weight.mul_(2)
        x = torch.randn(4, 24, generator=gen)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    # files hold it as a plain dense weight
    model = nn.Sequential(layer)
    sparsert.save(model, tmp_path / "d.sparsert")
    loaded = sparsert.load(tmp_path / "d.sparsert", nn.Sequential(nn.Linear(24, 10)))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), layer(x), rtol=1e-5, atol=1e-5)


def test_sparsify_leaves_dense_linears_on_the_best_dense_path():
    from torch import nn

    import sparsert
    from sparsert.nn import DenseLinear
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        model[0].weight[:, :2] = 0  # pruned a little: sparse formats cannot win by 5%
    x = torch.randn(16, 32)
    out = sparsert.sparsify(model, example_inputs=x, min_speedup=1e9, min_time=0.002, rounds=1)
    assert isinstance(out[0], DenseLinear) and out.sparsity_plan[0].chosen == "dense"
    assert type(out[2]) is nn.Linear  # no zeros: not a candidate, left alone
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)


# Inductor itself (torch 2.13) still calls torch.jit.script_method somewhere inside.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_sparsified_model_with_dense_and_sparse_layers_under_torch_compile():
    # DenseLinear traces as F.linear under torch.compile (Inductor lowers the
    # prepacked oneDNN op only for frozen constant weights); the sparse layer
    # stays sparsert's custom op with its fake. Same result as eager.
    from torch import nn

    from sparsert.nn import DenseLinear, SparseLinear
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    with torch.no_grad():
        model[0].weight[:, :2] = 0
        model[2].weight.mul_(torch.rand_like(model[2].weight) > 0.8)
    x = torch.randn(2, 7, 32)
    out = nn.Sequential(DenseLinear.from_linear(model[0]), nn.ReLU(), SparseLinear.from_dense(model[2], "csr"))
    compiled = torch.compile(out, fullgraph=True)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(out(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


# -- tuned paths: the faster of oneDNN prepacked and eager F.linear per token count --------

def test_path_for_follows_the_nearest_measured_token_count():
    assert (path_for({}, 1), path_for({}, 2), path_for({}, 512)) == (ONE_TOKEN, "onednn", "onednn")  # the default
    tuned = {16: "torch", 256: "onednn"}
    # below the first and above the last measured count: theirs; between: the nearer in ratio
    assert [path_for(tuned, r) for r in (2, 16, 63, 65, 256, 4096)] == ["torch", "torch", "torch", "onednn",
                                                                        "onednn", "onednn"]
    tuned[16] = "onednn"  # measured again: replaced
    assert (path_for(tuned, 1), path_for(tuned, 2)) == (ONE_TOKEN, "onednn")  # one token: a GEMV unless measured
    tuned[1] = "onednn"
    assert path_for(tuned, 1) == "onednn"
    with pytest.raises(ValueError, match="path"):
        path_for({4: "mkl"}, 8)
    with pytest.raises(ValueError, match="rows"):
        path_for({0: "torch"}, 8)
    with pytest.raises(ValueError, match="path"):
        PackedDenseLinear(torch.randn(8, 16))(torch.randn(2, 16), path="fast")


def test_the_chosen_path_is_the_one_that_runs():
    from torch import nn

    from sparsert.nn import DenseLinear
    gen = torch.Generator().manual_seed(3)
    w, b = torch.randn(5, 12, generator=gen), torch.randn(5, generator=gen)
    x = torch.randn(8, 12, generator=gen)
    ref = F.linear(x.double(), w.double(), b.double())
    # no packed weight: the oneDNN path, even forced, runs F.linear
    plain = PackedDenseLinear(w, b, backend="torch")
    assert (plain(x, path="onednn").double() - ref).abs().max() < 1e-4
    if not onednn_available():
        pytest.skip("needs oneDNN")
    # a packed weight that cannot run: any call that takes the oneDNN path fails
    layer = PackedDenseLinear(w, b)
    layer._packed = torch.zeros(1)
    with pytest.raises(RuntimeError):
        layer(x)  # default rule: 8 tokens take oneDNN
    with pytest.raises(RuntimeError):
        layer(x, path="onednn")  # forced
    assert (layer(x, path="torch").double() - ref).abs().max() < 1e-4
    assert (layer(torch.randn(1, 12), path="torch")).shape == (1, 5)
    # DenseLinear takes the path its measurement chose for the token count
    lin = nn.Linear(12, 5)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    dense = DenseLinear.from_linear(lin)
    dense._packed_layer()._packed = torch.zeros(1)
    with torch.no_grad(), pytest.raises(RuntimeError):
        dense(x)
    dense.__dict__["_tuned_paths"] = {8: "torch"}
    dense.__dict__["_path_memo"] = {}
    with torch.no_grad():
        assert (dense(x).double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("tokens", [1, 6, 40])
def test_dense_linear_tune_keeps_the_faster_path_and_the_same_answer(tokens):
    import copy

    from torch import nn

    from sparsert.nn import DenseLinear
    gen = torch.Generator().manual_seed(tokens)
    lin = nn.Linear(48, 20)
    layer = DenseLinear.from_linear(lin)
    x = torch.randn(2, tokens, 48, generator=gen)
    with torch.no_grad():
        layer(x)  # memoises the default rule's path for this token count
    assert layer.__dict__["_path_memo"] == {2 * tokens: path_for({}, 2 * tokens) if onednn_available() else "torch"}
    times = layer.tune(x, min_time=0.002, rounds=2)
    assert layer.__dict__["_path_memo"] == {}  # a new measurement: the memo starts over
    chosen = layer.tuned_paths[2 * tokens]
    fastest = min(times, key=times.get)
    # the faster path, or the default one where the other is not 5% faster
    assert chosen == fastest or (chosen == path_for({}, 2 * tokens) and times[chosen] * 0.95 <= times[fastest])
    with torch.no_grad():
        layer(x)
    assert layer.__dict__["_path_memo"] == {2 * tokens: chosen}
    assert set(times) == ({"onednn", "torch"} if onednn_available() else {"torch"}) | (
        {"gemv"} if gemv_available() and 2 * tokens <= 4 else set())
    assert all(t > 0 for t in times.values())
    assert layer.tuned_paths == {2 * tokens: chosen}
    assert "tuned_paths" in repr(layer)
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    with torch.no_grad():
        assert (layer(x).double() - ref).abs().max() < 1e-4
        layer.weight.mul_(-1)  # re-packed: the measured choice stays
        layer(x)
        assert layer.tuned_paths == {2 * tokens: chosen}
        assert layer.__dict__["_path_memo"] == {2 * tokens: chosen}
        twin = copy.deepcopy(layer)
        assert twin.tuned_paths == layer.tuned_paths
        flipped = F.linear(x.double(), layer.weight.double(), layer.bias.double())  # shared with lin: flipped too
        assert (twin(x).double() - flipped).abs().max() < 1e-4
    with pytest.raises(ValueError, match="features"):
        layer.tune(torch.randn(3, 47))
    with pytest.raises(ValueError, match="no tokens"):
        layer.tune(torch.randn(0, 48))


@pytest.mark.skipif(not onednn_available(), reason="needs the oneDNN packed path to choose between two paths")
@pytest.mark.parametrize("tokens, onednn_s, torch_s, margin, chosen", [
    (16, 1.00, 0.97, 0.05, "onednn"),   # eager 3% faster: within the margin, the default (packed) stays
    (16, 1.00, 0.90, 0.05, "torch"),    # eager 10% faster: beyond it
    (16, 1.00, 0.97, 0.0, "torch"),     # no margin: the faster one, however slight
    (1, 0.97, 1.00, 0.05, ONE_TOKEN),   # one token's default is the GEMV; packed 3% faster does not move it
    (1, 0.90, 1.00, 0.05, "onednn"),
])
def test_dense_linear_tune_keeps_the_default_path_unless_the_other_beats_the_margin(
        monkeypatch, tokens, onednn_s, torch_s, margin, chosen):
    from torch import nn

    import sparsert.convert.timing as timing
    from sparsert.nn import DenseLinear
    seconds = {"onednn": onednn_s, "torch": torch_s}
    if tokens <= 4 and gemv_available():
        seconds["gemv"] = torch_s  # sparsert's GEMV, timed beside them at a few tokens
    last = {}
    real_call = PackedDenseLinear.__call__

    def recording_call(self, x, activation=None, path=None):
        last["path"] = path
        return real_call(self, x, activation, path)

    def fake_call_times(fn, budget, n):  # each sample says the set time of the path fn ran
        fn()
        return [seconds[last["path"]]] * n

    monkeypatch.setattr(PackedDenseLinear, "__call__", recording_call)
    monkeypatch.setattr(timing, "call_times", fake_call_times)
    layer = DenseLinear.from_linear(nn.Linear(24, 8))
    times = layer.tune(torch.randn(tokens, 24), rounds=2, margin=margin)
    assert times == seconds
    assert layer.tuned_paths == {tokens: chosen}
    with pytest.raises(ValueError, match="margin"):
        layer.tune(torch.randn(tokens, 24), margin=1.0)


def test_best_dense_model_tunes_every_layer_on_its_own_input():
    from torch import nn

    from sparsert.bench import best_dense_model
    from sparsert.nn import DenseLinear
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(3, 5, 16)
    untuned = best_dense_model(model)
    assert all(m.tuned_paths == {} for m in untuned if isinstance(m, DenseLinear))
    tuned = best_dense_model(model, x, min_time=0.002, rounds=1)
    assert [sorted(m.tuned_paths) for m in tuned if isinstance(m, DenseLinear)] == [[15], [15]]
    assert type(model[0]) is nn.Linear  # the caller's model is untouched
    with torch.no_grad():
        torch.testing.assert_close(tuned(x), model(x), rtol=1e-5, atol=1e-5)


def test_sparsify_times_a_dense_layer_on_its_faster_path(monkeypatch):
    from torch import nn

    import sparsert
    from sparsert.nn import DenseLinear
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        model[0].weight[:, :16] = 0
        model[2].weight[:, :1] = 0  # nearly dense: left dense untimed, still tuned
    x = torch.randn(16, 32)
    out = sparsert.sparsify(model, example_inputs=x, min_speedup=1e9, min_time=0.002, rounds=1)
    plan = out.sparsity_plan
    for i, d in ((0, plan[0]), (2, plan[1])):
        assert isinstance(out[i], DenseLinear) and d.chosen == "dense"
        assert d.dense_path in ("onednn", "torch") and out[i].tuned_paths == {16: d.dense_path}

    # a layer where eager measures faster says so in the plan
    def eager_faster(self, x, min_time=0.02, rounds=5):
        self.__dict__.setdefault("_tuned_paths", {})[x.numel() // self.in_features] = "torch"
        return {"onednn": 2e-3, "torch": 1e-3}
    monkeypatch.setattr(DenseLinear, "tune", eager_faster)
    out = sparsert.sparsify(model, example_inputs=x, min_speedup=1e9, min_time=0.002, rounds=1)
    d = out.sparsity_plan[0]
    assert d.dense_path == "torch" and "eager F.linear (2.00x faster than prepacked)" in d.reason
    assert out[0].tuned_paths == {16: "torch"}
