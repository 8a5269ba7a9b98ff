"""The decoder ops (sparsert.ops.decoder): every native kernel set against the same math in torch in
float64, on odd widths, one row and many, strided rows, grouped heads, positions from 0 to past
the threading threshold; and the refusals."""

import pytest
import torch
import torch.nn.functional as F

from sparsert.ops import decoder as ops

pytestmark = pytest.mark.skipif(not ops._native_available(), reason="the native extension is not built")


def kernels():
    return [k["name"] for k in ops.decoder_kernels() if k["supported"]]


def test_every_isa_has_a_kernel_set():
    names = {k["name"] for k in ops.decoder_kernels()}
    assert {"f32_decoder_reference", "f32_decoder_scalar"} <= names


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("rows,width", [(1, 1), (1, 7), (3, 33), (1, 576), (5, 1000), (130, 576)])
@pytest.mark.parametrize("with_add", [False, True])
def test_rms_norm(kernel, rows, width, with_add):
    g = torch.Generator().manual_seed(rows * 1000 + width)
    x = torch.randn(rows, width, generator=g) * 3
    add = torch.randn(rows, width, generator=g) if with_add else None
    weight = torch.randn(width, generator=g)
    x64, add64 = x.double(), None if add is None else add.double()
    want = ops.rms_norm_torch(x64.clone(), weight.double(), 1e-5, add64)
    got_x = x.clone()
    got = ops.rms_norm(got_x, weight, 1e-5, add=add, kernel=kernel)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got_x.double(), x64 + (0 if add64 is None else add64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", kernels())
def test_rms_norm_of_zeros_and_of_strided_rows(kernel):
    zeros = torch.zeros(2, 40)
    assert torch.equal(ops.rms_norm(zeros, torch.ones(40), 1e-6, kernel=kernel), zeros)
    big = torch.randn(6, 2, 48)
    x = big[:, 1]  # rows 96 floats apart
    before, other = x.clone(), big[:, 0].clone()
    add = torch.randn(6, 48)
    want = ops.rms_norm_torch(x.double().clone(), torch.ones(48, dtype=torch.float64), 1e-6, add.double())
    got = ops.rms_norm(x, torch.ones(48), 1e-6, add=add, kernel=kernel)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    assert torch.equal(big[:, 1], before + add)  # x updated in place, the rows between left alone
    assert torch.equal(big[:, 0], other)


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("rows,width", [(1, 1), (1, 5), (2, 17), (1, 1536), (7, 100), (40, 1536)])
def test_swiglu(kernel, rows, width):
    g = torch.Generator().manual_seed(width)
    gate_up = torch.randn(rows, 2 * width, generator=g) * 4
    gate_up[0, 0] = 90.0  # far tails: sigmoid 1 and 0, never inf or nan
    if width > 1:
        gate_up[0, 1] = -90.0
    want = ops.swiglu_torch(gate_up.double())
    got = ops.swiglu(gate_up, kernel=kernel)
    assert got.shape == (rows, width) and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def attention_case(batch, heads, kv_heads, d, position, capacity, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * d + 3, generator=g)[:, 3:]  # rows not contiguous
    angle = torch.rand(d // 2, generator=g) * 6
    cos, sin = torch.cat([angle.cos(), angle.cos()]), torch.cat([angle.sin(), angle.sin()])
    k_cache = torch.randn(batch, kv_heads, capacity, d, generator=g)
    v_cache = torch.randn(batch, kv_heads, capacity, d, generator=g)
    return qkv, cos, sin, k_cache, v_cache


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("batch,heads,kv_heads,d,position", [
    (1, 1, 1, 2, 0), (1, 9, 3, 64, 0), (1, 9, 3, 64, 1), (2, 4, 4, 8, 17), (1, 6, 1, 62, 40),
    (3, 8, 2, 128, 33), (1, 9, 3, 64, 300), (2, 12, 4, 64, 129)])
def test_cached_attention(kernel, batch, heads, kv_heads, d, position):
    capacity = position + 5
    qkv, cos, sin, k_cache, v_cache = attention_case(batch, heads, kv_heads, d, position, capacity)
    kw = dict(heads=heads, kv_heads=kv_heads, scale=d ** -0.5)
    k64, v64 = k_cache.double(), v_cache.double()
    want = ops.cached_attention_torch(qkv.double(), cos.double(), sin.double(), k64, v64, position, **kw)
    got = ops.cached_attention(qkv, cos, sin, k_cache, v_cache, position, kernel=kernel, **kw)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(k_cache.double(), k64, rtol=1e-6, atol=1e-6)  # the new key, rotated
    torch.testing.assert_close(v_cache.double(), v64, rtol=0, atol=0)


def test_cached_attention_equals_softmax_attention_over_the_cache():
    # an independent check of the torch reference: rotate by hand, attend with torch's sdpa (GQA)
    batch, heads, kv_heads, d, position = 2, 6, 2, 16, 9
    qkv, cos, sin, k_cache, v_cache = attention_case(batch, heads, kv_heads, d, position, 12)
    qkv, cos, sin, k_cache, v_cache = (t.double() for t in (qkv, cos, sin, k_cache, v_cache))
    half = d // 2

    def rot(x):
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    q = rot(qkv[:, : heads * d].reshape(batch, heads, 1, d))
    keys = k_cache.clone()
    keys[:, :, position] = rot(qkv[:, heads * d:(heads + kv_heads) * d].reshape(batch, kv_heads, d))
    values = v_cache.clone()
    values[:, :, position] = qkv[:, (heads + kv_heads) * d:].reshape(batch, kv_heads, d)
    want = F.scaled_dot_product_attention(q, keys[:, :, :position + 1], values[:, :, :position + 1],
                                          enable_gqa=True).reshape(batch, heads * d)
    got = ops.cached_attention_torch(qkv, cos, sin, k_cache, v_cache, position, heads, kv_heads, d ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_refusals():
    qkv, cos, sin, k_cache, v_cache = attention_case(1, 4, 2, 8, 3, 6)
    kw = dict(heads=4, kv_heads=2, scale=0.3)
    with pytest.raises(ValueError, match="capacity"):
        ops.cached_attention(qkv, cos, sin, k_cache, v_cache, 6, **kw)
    with pytest.raises(ValueError, match="multiple"):
        ops.cached_attention(qkv, cos, sin, k_cache, v_cache, 1, heads=3, kv_heads=2, scale=0.3)
    with pytest.raises(ValueError, match="qkv must be"):
        ops.cached_attention(qkv[:, :-1], cos, sin, k_cache, v_cache, 1, **kw)
    with pytest.raises(ValueError, match="cos and sin"):
        ops.cached_attention(qkv, cos[:4], sin, k_cache, v_cache, 1, **kw)
    with pytest.raises(ValueError, match="contiguous"):
        ops.cached_attention(qkv, cos, sin, k_cache.transpose(2, 1).contiguous().transpose(2, 1), v_cache, 1, **kw)
    with pytest.raises(ValueError, match="weight must be"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="add must have"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6, add=torch.randn(1, 8))
    with pytest.raises(ValueError, match="even"):
        ops.swiglu(torch.randn(2, 7))
    with pytest.raises(ValueError, match="unknown"):
        ops.swiglu(torch.randn(2, 8), kernel="f32_decoder_nonesuch")
