"""Helpers shared by the kernel tests: random pruned weights and the float64 reference."""

import torch


def random_weight(rows, cols, density, gen):
    keep = torch.rand(rows, cols, generator=gen) < density
    return torch.randn(rows, cols, generator=gen) * keep


def expected(x, w, bias, activation):
    """float64 ``x @ w.T + bias``, then ReLU if asked."""
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    return torch.relu(y) if activation == "relu" else y


def assert_close(y, ref, what, rtol=1e-4):
    # float32 sums of up to a few hundred products: the error grows with the row's magnitude.
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (y.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= rtol * max(scale, 1.0), f"{what}: max error {err:.3g} (scale {scale:.3g})"
