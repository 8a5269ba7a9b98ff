"""sparsert.benchmark and sweeps: what the result holds and prints (never speed targets)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsert
from sparsert.bench import BenchmarkResult, LatencyStats, SweepPoint, SweepResult, model_bytes, sweep

FAST = dict(min_time=0.002, rounds=2)


def pruned_mlp(sparsity=0.9):
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear) and sparsity > 0:
                w = m.weight
                w.mul_(w.abs() > w.abs().flatten().kthvalue(int(sparsity * w.numel())).values)
    return model


def test_benchmark_result_and_tables(capsys):
    model = pruned_mlp()
    x = torch.randn(8, 64)
    sparse = sparsert.sparsify(model, "csr", example_inputs=x, **FAST)
    threads_before = torch.get_num_threads()
    result = sparsert.benchmark(model, sparse, (x,), threads=1, warmup=1, repeats=6, rounds=2, layer_repeats=3)
    assert torch.get_num_threads() == threads_before
    printed = capsys.readouterr().out
    assert "speedup" in printed and "sparse ms" in printed and "csr" in printed
    assert isinstance(result, BenchmarkResult) and result.threads == 1
    assert result.dense.calls == 6 and result.sparse.calls == 6 and result.dense.batch == 8
    assert result.speedup == pytest.approx(result.dense.median / result.sparse.median)
    assert result.dense.p90 >= result.dense.median >= result.dense.min > 0
    assert result.sparse.throughput == pytest.approx(8 / result.sparse.median)
    assert result.sparse_bytes < result.dense_bytes == model_bytes(model)
    assert [t.name for t in result.layers] == ["0", "2"]
    for t in result.layers:
        assert t.format == "csr" and abs(t.density - 0.1) < 0.01
        assert t.dense_time > 0 and t.sparse_time > 0
        assert t.speedup == pytest.approx(t.dense_time / t.sparse_time)
    d = result.as_dict()
    assert d["layers"][0]["name"] == "0" and d["speedup"] == result.speedup
    assert "cpu" in result.machine
    assert result.machine["threading"] == sparsert.ops.threading_backend()
    assert f"threads=1 ({result.machine['threading']})" in result.table()


def test_benchmark_kwargs_inputs_dense_layers_and_no_print(capsys):
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32)
            self.b = nn.Linear(32, 32)

        def forward(self, x, scale=1.0):
            return self.b(self.a(x)) * scale

    model = KW().eval()
    with torch.no_grad():
        model.a.weight[:, :24] = 0
    inputs = {"x": torch.randn(3, 32), "scale": 2.0}
    sparse = sparsert.sparsify(model, "csr", example_inputs=inputs, **FAST)
    result = sparsert.benchmark(model, sparse, inputs, warmup=0, repeats=2, rounds=1, layer_repeats=1,
                                verbose=False)
    assert capsys.readouterr().out == ""
    formats = {t.name: t.format for t in result.layers}
    assert formats == {"a": "csr", "b": "dense"}
    assert result.layers[1].density == 1.0
    assert "a" in result.layer_table() and "median ms" in result.table()


def test_benchmark_errors():
    model = pruned_mlp()
    with pytest.raises(TypeError, match="sparse_model"):
        sparsert.benchmark(model, None, torch.randn(1, 64))
    with pytest.raises(ValueError, match="repeats"):
        sparsert.benchmark(model, model, torch.randn(1, 64), repeats=0)
    with pytest.raises(ValueError, match="threads"):
        sparsert.benchmark(model, model, torch.randn(1, 64), threads=0)


def test_latency_stats_percentiles():
    s = LatencyStats.of([float(v) for v in range(1, 11)], batch=4)
    assert (s.median, s.p90, s.min, s.calls) == (5.5, 9.0, 1.0, 10)
    assert s.throughput == pytest.approx(4 / 5.5)


def test_model_bytes_counts_shared_tensors_once():
    lin = nn.Linear(10, 10)
    tied = nn.Sequential(lin, lin)
    assert model_bytes(tied) == model_bytes(lin) == (100 + 10) * 4


def test_sweep_and_plot(tmp_path):
    model = pruned_mlp(0.0)

    def prune(m, sparsity):
        with torch.no_grad():
            for layer in m:
                if isinstance(layer, nn.Linear):
                    w = layer.weight
                    w.mul_(w.abs() > w.abs().flatten().kthvalue(max(1, int(sparsity * w.numel()))).values)

    result = sweep(model, torch.randn(16, 64), sparsities=(0.5, 0.9), prune=prune, format="csr", repeats=2,
                   min_time=0.002, rounds=2)
    assert [p.sparsity for p in result] == [0.5, 0.9]
    assert all(p.speedup == pytest.approx(p.dense_ms / p.sparse_ms) for p in result)
    assert all(p.formats == {"csr": 2} for p in result)
    assert "sparsity" in result.table()
    pytest.importorskip("matplotlib")
    path = result.plot(tmp_path / "sweep.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sweep_default_prunes_with_the_pruning_library():
    pytest.importorskip("sparsert.prune")
    model = pruned_mlp(0.0)
    result = sweep(model, torch.randn(4, 64), sparsities=(0.75,), pattern="4x1", format="bsr4x1", repeats=1,
                   min_time=0.001, rounds=1)
    assert result[0].formats == {"bsr4x1": 2}


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    points = SweepResult([SweepPoint(0.5, 1.2, 2.0, 1.0, {"csr": 1})], pattern="unstructured")
    with pytest.raises(ImportError, match="pip install matplotlib"):
        points.plot(tmp_path / "x.png")
