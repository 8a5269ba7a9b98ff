"""Which threads run the kernels: torch's OpenMP team or sparsert's own pool."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from sparsert import ops
from sparsert._ext import native
from sparsert.formats import CSR, BSR

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["openmp", "pool"] if native().openmp_available() else ["pool"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    previous = ops.threading_backend()
    ops.set_threading_backend(request.param)
    yield request.param
    ops.set_threading_backend(previous)


def sparse_weight(rows, cols, density, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return w * (torch.rand(rows, cols, generator=gen) < density)


def test_default_backend_is_openmp_where_it_shares_torchs_runtime():
    script = textwrap.dedent("""
        import os, sparsert.ops as o
        from sparsert import _ext
        torch_omp = _ext._torch_openmp_libraries()
        shared = not torch_omp or os.path.realpath(_ext.native().openmp_library()) in torch_omp
        print(o.threading_backend(), _ext.native().openmp_available(), shared)
    """)
    env = {k: v for k, v in os.environ.items() if k != "SPARSERT_THREADING"}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    backend, available, shared = out[0], out[1] == "True", out[2] == "True"
    assert backend == ("openmp" if available and shared else "pool")
    if sys.platform.startswith("linux") and "+cpu" in torch.__version__:
        assert backend == "openmp"  # torch's CPU wheel ships libgomp.so.1: shared


def test_environment_variable_picks_backend():
    script = "import sparsert.ops as o; print(o.threading_backend())"
    env = dict(os.environ, SPARSERT_THREADING="pool")
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "pool"


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="openmp"):
        ops.set_threading_backend("tbb")
    with pytest.raises(ValueError, match="unknown threading backend"):
        native().set_threading_backend("tbb")
    assert ops.threading_backend() in BACKENDS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_in_the_process():
    """The extension must share torch's libgomp, not load a second copy.
    (In a fresh process: other packages, e.g. scikit-learn, bring their own.)"""
    if not native().openmp_available():
        pytest.skip("built without OpenMP")
    script = textwrap.dedent("""
        import torch, sparsert.ops as ops
        from sparsert.formats import CSR
        torch.nn.functional.linear(torch.randn(64, 256), torch.randn(256, 256))
        ops.linear(torch.randn(64, 256), CSR.from_dense(torch.randn(256, 256)), num_threads=2)
        maps = open("/proc/self/maps").read().splitlines()
        print(len({line.split()[-1] for line in maps if "libgomp" in line}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "1"


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_backends_agree_with_reference(backend, threads):
    w = sparse_weight(203, 77, 0.2, seed=threads)
    # Token counts that split work by rows (few panels) and by whole panels.
    for tokens in (1, 37, 64, 128, 130, 700):
        x = torch.randn(tokens, 77, dtype=torch.float64)
        expected = x @ w.T
        for fmt in (CSR.from_dense(w.float()), BSR.from_dense(w.float(), block=(4, 1))):
            y = ops.linear(x.float(), fmt, num_threads=threads)
            torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    conv_w = sparse_weight(24, 8 * 9, 0.3, seed=7).float()
    conv = ops.ConvWeight(BSR.from_dense(conv_w, block=(4, 1)), (3, 3))
    x4 = torch.randn(1, 8, 13, 11)
    torch.testing.assert_close(ops.conv2d(x4, conv, padding=1, num_threads=threads),
                               torch.nn.functional.conv2d(x4, conv_w.view(24, 8, 3, 3), padding=1),
                               rtol=1e-4, atol=1e-4)


def test_concurrent_callers_get_their_own_results(backend):
    """Python threads calling kernels at once (the GIL is released) must not mix jobs."""
    weights = [CSR.from_dense(sparse_weight(150, 90, 0.3, seed=s).float()) for s in range(4)]
    inputs = [torch.randn(40, 90) for _ in range(4)]
    expected = [x @ w.to_dense().T for x, w in zip(inputs, weights)]
    errors = []

    def work(i):
        for _ in range(50):
            y = ops.linear(inputs[i], weights[i], num_threads=2)
            if not torch.allclose(y, expected[i], rtol=1e-4, atol=1e-4):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("name", BACKENDS)
def test_kernels_run_in_a_forked_child(name):
    """GNU OpenMP hangs in a child forked after a parallel region; sparsert must not."""
    script = textwrap.dedent(f"""
        import os, torch, sparsert.ops as ops
        from sparsert.formats import CSR
        torch.set_num_threads(2)
        ops.set_threading_backend({name!r})
        w = CSR.from_dense(torch.randn(300, 200) * (torch.rand(300, 200) < 0.2))
        x = torch.randn(64, 200)
        expected = ops.linear(x, w)
        pid = os.fork()
        if pid == 0:
            ok = torch.equal(ops.linear(x, w), expected)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "0"


def test_a_second_openmp_runtime_falls_back_to_the_pool(monkeypatch):
    """Where torch ships a renamed libgomp, the extension would run its own
    OpenMP team beside torch's: then sparsert's pool is used instead."""
    from sparsert import _ext

    if not native().openmp_available():
        pytest.skip("built without OpenMP")
    monkeypatch.delenv("SPARSERT_THREADING", raising=False)
    previous = ops.threading_backend()
    try:
        ops.set_threading_backend("openmp")
        ours = os.path.realpath(native().openmp_library())
        _ext._settle_threading_backend(native(), {ours})
        assert ops.threading_backend() == "openmp"  # e.g. torch's CPU wheel: one shared runtime
        _ext._settle_threading_backend(native(), {"/elsewhere/torch.libs/libgomp-0123abcd.so.1"})
        assert ops.threading_backend() == "pool"
        ops.set_threading_backend("openmp")
        monkeypatch.setenv("SPARSERT_THREADING", "openmp")  # an explicit choice is kept
        _ext._settle_threading_backend(native(), {"/elsewhere/torch.libs/libgomp-0123abcd.so.1"})
        assert ops.threading_backend() == "openmp"
    finally:
        ops.set_threading_backend(previous)
