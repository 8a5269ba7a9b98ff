"""sparsert.io: save / load / export round trips, skeletons, file size, no pickle."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sparsert
from sparsert import io
from sparsert.nn import SparseConv2d, SparseLinear

ROOT = Path(__file__).resolve().parents[1]


def prune_(module: nn.Module, sparsity: float, block=(1, 1)) -> None:
    """Zero the smallest-|w| blocks of every Linear/Conv2d (exact zeros, like sparsert.prune)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight.reshape(m.weight.shape[0], -1)
                r, c = block
                rows, cols = w.shape
                if rows % r or cols % c:
                    r, c = 1, 1
                score = w.abs().reshape(rows // r, r, cols // c, c).sum((1, 3))
                k = int(sparsity * score.numel())
                if k:
                    thr = score.flatten().kthvalue(k).values
                    keep = (score > thr).repeat_interleave(r, 0).repeat_interleave(c, 1)
                    w.mul_(keep)


class Mixed(nn.Module):
    """Every format and layer type, shapes that are not multiples of the blocks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_nb = nn.Conv2d(6, 4, (2, 3), stride=(1, 2), bias=False)
        self.norm = nn.LayerNorm(13)
        self.a = nn.Linear(13, 21)
        self.b = nn.Linear(21, 18, bias=False)
        self.c = nn.Linear(18, 10)
        self.d = nn.Linear(10, 7)

    def forward(self, x):
        y = self.conv_nb(torch.relu(self.conv(x)))  # (N, 4, 4, 3) for 5x8 images
        h = self.norm(y.flatten(1)[:, :13])
        return self.d(self.c(torch.relu(self.b(self.a(h)))))


FORMATS = {"conv": "csr", "conv_nb": "bsr2x3", "a": "bsr4x1", "b": "nm2:4", "c": "csr", "d": "dense"}


def nm_prune_(linear: nn.Linear, n=2, m=4) -> None:
    with torch.no_grad():
        w = linear.weight
        rows, cols = w.shape
        g = -(-cols // m)
        pad = torch.nn.functional.pad(w.abs(), (0, g * m - cols)).reshape(rows, g, m)
        keep = torch.zeros_like(pad, dtype=torch.bool).scatter_(-1, pad.topk(n, -1).indices, True)
        w.mul_(keep.reshape(rows, g * m)[:, :cols])


def sparsify_mixed(model: Mixed, activation_c: str | None = "relu") -> Mixed:
    model = copy.deepcopy(model)
    prune_(model, 0.6)
    nm_prune_(model.b)
    for name, kind in FORMATS.items():
        mod = getattr(model, name)
        cls = SparseConv2d if isinstance(mod, nn.Conv2d) else SparseLinear
        setattr(model, name, cls.from_dense(mod, kind, activation=activation_c if name == "c" else None))
    return model


@pytest.fixture
def mixed():
    torch.manual_seed(0)
    return sparsify_mixed(Mixed().eval())


def mixed_skeleton():
    return Mixed().eval()


def test_round_trip_every_format_is_exact(tmp_path, mixed):
    x = torch.randn(4, 3, 5, 8)
    path = tmp_path / "m.sparsert"
    info = io.save(mixed, path)
    assert info["file_bytes"] == path.stat().st_size and info["layers"] == 6
    loaded = io.load(path, mixed_skeleton())
    for name, kind in FORMATS.items():
        a, b = getattr(mixed, name), getattr(loaded, name)
        assert type(b) is type(a) and b.format == kind
        assert b.activation == a.activation
        if kind == "dense":
            assert torch.equal(a.packed, b.packed)
        else:
            for k, t in a.packed.tensors().items():
                u = b.packed.tensors()[k]
                assert t.dtype == u.dtype and torch.equal(t, u), (name, k)
    assert loaded.c.activation == "relu"
    assert torch.equal(loaded.norm.weight, mixed.norm.weight)
    with torch.no_grad():
        assert torch.equal(loaded(x), mixed(x))


def test_sixteen_bit_indices_are_stored(tmp_path, mixed):
    path = tmp_path / "m.sparsert"
    io.save(mixed, path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key.endswith("::col_indices"):
                assert f.get_tensor(key).dtype == torch.int16, key


def test_conv_hyper_parameters_and_padding_modes_survive(tmp_path):
    conv = nn.Conv2d(4, 8, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                     groups=2, padding_mode="reflect")
    prune_(conv, 0.5)
    model = nn.Sequential(SparseConv2d.from_dense(conv, "csr"))
    io.save(model, tmp_path / "c.sparsert")
    loaded = io.load(tmp_path / "c.sparsert", nn.Sequential(conv))
    got = loaded[0]
    assert (got.kernel_size, got.stride, got.padding, got.dilation, got.groups, got.padding_mode) == \
        ((3, 2), (2, 1), (1, 0), (1, 2), 2, "reflect")
    x = torch.randn(2, 4, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), conv(x), rtol=1e-5, atol=1e-5)


def test_load_without_skeleton_uses_the_recorded_example(tmp_path):
    from sparsert.models import digits

    mlp = digits.train_mlp()
    mlp.sparsert_example = "digits-mlp"
    prune_(mlp, 0.9)
    sparse = copy.deepcopy(mlp)
    for name in ("fc1", "fc2", "classifier"):
        setattr(sparse, name, SparseLinear.from_dense(getattr(sparse, name), "csr"))
    io.save(sparse, tmp_path / "mlp.sparsert")
    loaded = io.load(tmp_path / "mlp.sparsert")
    assert isinstance(loaded, digits.DigitsMLP) and isinstance(loaded.fc1, SparseLinear)
    x = digits.load_data().x_test[:50]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), mlp(x), rtol=1e-5, atol=1e-5)


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=40)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def sparsify_bert(model):
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.startswith("encoder."):
            prune_(mod, 0.8)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, SparseLinear.from_dense(mod, "bsr4x1"))
    return model


def test_hugging_face_model_into_a_skeleton_and_from_its_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    dense = tiny_bert()
    sparse = sparsify_bert(dense)
    io.save(sparse, tmp_path / "bert.sparsert")
    ids = torch.randint(0, 120, (2, 11))
    with torch.no_grad():
        want = sparse(input_ids=ids).last_hidden_state
        skeleton = transformers.BertModel(dense.config)  # random weights, replaced by the file's
        got = io.load(tmp_path / "bert.sparsert", skeleton)(input_ids=ids).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        rebuilt = io.load(tmp_path / "bert.sparsert")  # architecture from the stored config
        assert type(rebuilt).__name__ == "BertModel"
        torch.testing.assert_close(rebuilt(input_ids=ids).last_hidden_state, want, rtol=1e-5, atol=1e-5)


def test_skeleton_that_does_not_fit_is_rejected(tmp_path, mixed):
    path = tmp_path / "m.sparsert"
    io.save(mixed, path)
    wrong = mixed_skeleton()
    wrong.a = nn.Linear(13, 22)
    with pytest.raises(io.SparsertFileError, match=r"layer 'a'.*does not fit"):
        io.load(path, wrong)
    wrong = mixed_skeleton()
    wrong.c = nn.Conv2d(18, 10, 1)
    with pytest.raises(io.SparsertFileError, match=r"linear layer in the file but the model has a Conv2d"):
        io.load(path, wrong)
    wrong = mixed_skeleton()
    del wrong.d
    with pytest.raises(io.SparsertFileError, match=r"layer 'd' of the file does not exist"):
        io.load(path, wrong)
    wrong = mixed_skeleton()
    wrong.extra = nn.LayerNorm(3)
    with pytest.raises(io.SparsertFileError, match=r"missing \['extra.bias', 'extra.weight'\]"):
        io.load(path, wrong)
    wrong = mixed_skeleton()
    wrong.norm = nn.LayerNorm(12)
    with pytest.raises(io.SparsertFileError, match=r"'norm.weight' has shape \[13\] in the file but \[12\]"):
        io.load(path, wrong)


def test_no_skeleton_and_no_recorded_architecture_is_a_clear_error(tmp_path, mixed):
    io.save(mixed, tmp_path / "m.sparsert")
    with pytest.raises(io.SparsertFileError, match="pass a model skeleton"):
        io.load(tmp_path / "m.sparsert")


def test_a_model_that_stayed_dense_round_trips(tmp_path):
    # sparsify(format="auto") may keep every layer dense (tiny layers): still a valid file
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    io.save(model, tmp_path / "d.sparsert")
    assert io.read(tmp_path / "d.sparsert").layers == {}
    loaded = io.load(tmp_path / "d.sparsert", nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(TypeError):
        io.save("model", tmp_path / "x")


def test_shared_dense_tensors_are_stored_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight
            self.mid = nn.Linear(16, 16)

        def forward(self, i):
            return self.head(self.mid(self.emb(i)))

    model = Tied()
    prune_(model.mid, 0.5)
    model.mid = SparseLinear.from_dense(model.mid, "csr")
    io.save(model, tmp_path / "t.sparsert")
    f = io.read(tmp_path / "t.sparsert")
    assert f.dense["head.weight"] is f.dense["emb.weight"]
    skeleton = Tied()
    loaded = io.load(tmp_path / "t.sparsert", skeleton)
    i = torch.randint(0, 50, (3, 5))
    with torch.no_grad():
        assert torch.equal(loaded(i), model(i))
    assert (tmp_path / "t.sparsert").stat().st_size < 50 * 16 * 4 * 2


@pytest.mark.parametrize("kind, block", [("csr", (1, 1)), ("bsr4x1", (4, 1))])
def test_ninety_percent_sparse_file_is_at_most_a_fifth_of_the_dense_state_dict(tmp_path, kind, block):
    from sparsert.models import digits

    model = digits.DigitsMLP()
    prune_(model, 0.9, block)
    dense_pt, dense_st = tmp_path / "dense.pt", tmp_path / "dense.safetensors"
    torch.save(model.state_dict(), dense_pt)
    save_file(model.state_dict(), str(dense_st))
    sparse = copy.deepcopy(model)
    for name in ("fc1", "fc2", "classifier"):
        setattr(sparse, name, SparseLinear.from_dense(getattr(sparse, name), kind))
    info = io.save(sparse, tmp_path / "sparse.sparsert")
    for dense in (dense_pt, dense_st):
        assert info["file_bytes"] <= 0.20 * dense.stat().st_size, (kind, info["file_bytes"], dense.stat().st_size)
    s = io.summary(tmp_path / "sparse.sparsert")
    assert s["compression"] >= 5.0 and s["file_bytes"] == info["file_bytes"]


def test_loading_never_unpickles(tmp_path, mixed, monkeypatch):
    path = tmp_path / "m.sparsert"
    io.save(mixed, path)

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during sparsert.load")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = io.load(path, mixed_skeleton())
    assert isinstance(loaded.a, SparseLinear)


def test_a_file_that_is_not_sparsert_is_rejected_clearly(tmp_path):
    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(io.SparsertFileError, match="not a sparsert file"):
        io.read(tmp_path / "plain.safetensors")
    (tmp_path / "junk").write_bytes(b"\x00" * 3)
    with pytest.raises(io.SparsertFileError, match="truncated"):
        io.read(tmp_path / "junk")
    with pytest.raises(io.SparsertFileError, match="no such file"):
        io.read(tmp_path / "missing")
    with pytest.raises(io.SparsertFileError, match="is a directory"):
        io.read(tmp_path)
    torch.save({"w": torch.zeros(3)}, tmp_path / "pickled.pt")
    with pytest.raises(io.SparsertFileError):
        io.read(tmp_path / "pickled.pt")


def test_summary_reports_each_layer(tmp_path, mixed):
    io.save(mixed, tmp_path / "m.sparsert")
    s = io.summary(tmp_path / "m.sparsert")
    layers = {r["layer"]: r for r in s["layers"]}
    assert {k: r["kind"] for k, r in layers.items()} == FORMATS
    for name, r in layers.items():
        mod = getattr(mixed, name)
        assert r["bytes"] == mod.packed_nbytes + (0 if mod.bias is None else 4 * mod.bias.numel())
        assert r["density"] == pytest.approx(1.0 if r["kind"] == "dense" else mod.packed.density)
    assert s["sparse_layer_bytes"] < s["sparse_layer_dense_bytes"]
    json.dumps(s)  # JSON-able for --json


RUN_EXPORTED = r"""
import sys, torch
IMPORT_LINE
from safetensors.torch import load_file
program = torch.export.load(sys.argv[1])
io = load_file(sys.argv[2])
with torch.no_grad():
    y = program.module()(io["x"])
torch.testing.assert_close(y, io["y"], rtol=1e-5, atol=1e-5)
n = sum(1 for node in program.graph.nodes if node.op == "call_function" and "sparsert" in str(node.target))
print("sparsert-ops", n)
"""


@pytest.mark.parametrize("import_line", ["import sparsert.ops", "import sparsert"])
def test_exported_program_runs_in_a_fresh_process_without_model_code(tmp_path, import_line):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 8))
    prune_(model, 0.8)
    model[0] = SparseLinear.from_dense(model[0], "bsr4x1")
    model[2] = SparseLinear.from_dense(model[2], "csr")
    x = torch.randn(5, 20)
    program = io.export(model, (x,), tmp_path / "m.pt2")
    assert io.sparse_op_count(program) == 2
    with torch.no_grad():
        save_file({"x": x, "y": model(x)}, str(tmp_path / "io.safetensors"))
    script = tmp_path / "run.py"
    script.write_text(RUN_EXPORTED.replace("IMPORT_LINE", import_line))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "m.pt2"), str(tmp_path / "io.safetensors")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sparsert-ops 2" in out.stdout


def test_export_rejects_bad_inputs(tmp_path):
    with pytest.raises(TypeError):
        io.export(nn.Linear(2, 2), 3, tmp_path / "x.pt2")
    with pytest.raises(TypeError):
        io.export("model", (torch.zeros(1),), tmp_path / "x.pt2")


def test_top_level_names():
    assert sparsert.save is io.save and sparsert.load is io.load and sparsert.export is io.export


def test_batchnorm_folded_by_sparsify_loads_into_a_fresh_skeleton(tmp_path):
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        with torch.no_grad():
            m[1].running_mean.uniform_(-1, 1)
            m[1].running_var.uniform_(0.5, 2)
        return m.eval()

    model = make()
    prune_(model, 0.7)
    x = torch.randn(2, 3, 6, 6)
    sparse = sparsert.sparsify(model, format="csr", example_inputs=(x,))
    assert isinstance(sparse[1], nn.Identity)
    io.save(sparse, tmp_path / "bn.sparsert")
    loaded = io.load(tmp_path / "bn.sparsert", make())
    assert isinstance(loaded[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)
    wrong = make()
    wrong[1] = nn.LayerNorm(8)
    with pytest.raises(io.SparsertFileError, match="not a BatchNorm"):
        io.load(tmp_path / "bn.sparsert", wrong)


def test_pruned_layers_that_run_dense_are_still_stored_compressed(tmp_path):
    # sparsify keeps a layer dense when dense is faster; the file still stores its zeros for free
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
                          nn.Linear(10, 10))
    prune_(model[0], 0.9)
    prune_(model[3], 0.9)
    model[3] = SparseLinear.from_dense(model[3], "csr")
    io.save(model, tmp_path / "m.sparsert")
    f = io.read(tmp_path / "m.sparsert")
    assert f.layers["0"].meta["runtime"] == "dense" and f.layers["0"].kind == "csr"
    assert f.layers["3"].meta["runtime"] == "sparse"
    assert "4" not in f.layers and "4.weight" in f.dense  # no zeros: kept as a plain entry
    skeleton = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
                             nn.Linear(10, 10))
    loaded = io.load(tmp_path / "m.sparsert", skeleton)
    assert type(loaded[0]) is nn.Conv2d and torch.equal(loaded[0].weight, model[0].weight)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert f.layers["0"].packed.nbytes < 0.2 * model[0].weight.numel() * 4
    wrong = copy.deepcopy(skeleton)
    wrong[0] = SparseConv2d.from_dense(wrong[0], "dense")
    with pytest.raises(io.SparsertFileError, match="runs dense and needs an nn.Linear/nn.Conv2d"):
        io.load(tmp_path / "m.sparsert", wrong)


@pytest.mark.parametrize("kind", ["csr", "bsr1x4", "nm1:8"])
def test_wide_layers_with_indices_above_32767_round_trip(tmp_path, kind):
    # 16-bit indices hold uint16 bit patterns: columns >= 32768 are negative int16 values on disk
    lin = nn.Linear(40000, 3, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, 39999] = 1.5
        lin.weight[1, 32768] = -2.0
        lin.weight[2, 5] = 0.25
    model = nn.Sequential(SparseLinear.from_dense(lin, kind))
    assert model[0].packed.col_indices.dtype == torch.int16
    io.save(model, tmp_path / "wide.sparsert")
    loaded = io.load(tmp_path / "wide.sparsert", nn.Sequential(nn.Linear(40000, 3, bias=False)))
    assert torch.equal(loaded[0].packed.to_dense(), lin.weight)
    x = torch.randn(2, 40000)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), lin(x))
