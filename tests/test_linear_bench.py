"""pytest-benchmark suite for the sparse Linear (the table script is benchmarks/bench_linear.py).

    SPARSERT_BENCH_FULL=1 python -m pytest tests/test_linear_bench.py --benchmark-enable \
        --benchmark-group-by=param:case

Each case times torch dense, torch.sparse CSR, scipy CSR and every sparsert
format on the same weight and input; compare within a group. In the default
test run (``--benchmark-disable``) every method runs once on a small grid, so
the suite stays cheap and its code stays working; ``SPARSERT_BENCH_FULL=1``
times the BERT-sized grid.
"""

from __future__ import annotations

import os

import pytest
import scipy.sparse
import torch
import torch.nn.functional as F

from sparsert import ops
from sparsert.bench import random_pruned_weight
from sparsert.formats import kind_name, pack

FULL = os.environ.get("SPARSERT_BENCH_FULL") == "1"
SHAPES = [(768, 3072), (3072, 768), (4096, 4096)] if FULL else [(256, 384)]
TOKENS = (1, 16, 128) if FULL else (1, 16)
CASES = [(in_f, out_f, tokens, label, sparsity, block)
         for in_f, out_f in SHAPES
         for tokens in TOKENS
         for label, sparsity, block in [("90%", 0.9, None), ("95%", 0.95, None), ("90% 4x1", 0.9, (4, 1))]]


def sparsert_kinds(block):
    return ["csr"] if block is None else [kind_name("bsr", *block), "csr"]


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _methods(in_f, out_f, tokens, sparsity, block):
    gen = torch.Generator().manual_seed(0)
    w = random_pruned_weight(out_f, in_f, sparsity, block, gen)
    x = torch.randn(tokens, in_f, generator=gen)
    w_csr, w_scipy, xt = w.to_sparse_csr(), scipy.sparse.csr_matrix(w.numpy()), x.t().contiguous()
    methods = {"torch_dense": lambda: F.linear(x, w), "torch_sparse_csr": lambda: torch.sparse.mm(w_csr, xt),
               "scipy_csr": lambda: w_scipy @ x.numpy().T}
    for kind in sparsert_kinds(block):
        fmt = pack(w, kind)
        methods[f"sparsert_{kind}"] = (lambda f=fmt: ops.linear(x, f))
    return methods


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state:UserWarning")
@pytest.mark.parametrize("method", ["torch_dense", "torch_sparse_csr", "scipy_csr", "sparsert_csr",
                                    "sparsert_bsr4x1"])
@pytest.mark.parametrize("in_f, out_f, tokens, case, sparsity, block", CASES,
                         ids=[f"{c[0]}->{c[1]}-T{c[2]}-{c[3]}" for c in CASES])
def test_linear(benchmark, method, in_f, out_f, tokens, case, sparsity, block):
    methods = _methods(in_f, out_f, tokens, sparsity, block)
    if method not in methods:
        pytest.skip(f"{method} does not apply to {case}")
    benchmark.group = f"{in_f}->{out_f} T={tokens} {case}"
    expected = methods["torch_dense"]()
    result = benchmark(methods[method])
    result = torch.as_tensor(result.T if method in ("torch_sparse_csr", "scipy_csr") else result).float()
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-3)  # every method computes the same
