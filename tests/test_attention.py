"""sparsert.ops.attention: every native kernel against the float64 reference in torch, on odd
shapes, padding masks (all keys of a sentence masked included), strided q/k/v and 1 token to many."""

import pytest
import torch

import sparsert  # noqa: F401  (registers torch.ops.sparsert.*)
from sparsert.ops.attention import attention, attention_cpu, attention_kernels, attention_torch

pytestmark = pytest.mark.skipif(not sparsert.ops.cpu_available(), reason="native CPU kernels not built")

LOWEST = torch.finfo(torch.float32).min


def kernels():
    return [k["name"] for k in attention_kernels() if k["supported"]]


def fused_qkv(batch, tokens, heads, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, generator=g) * 2
    return qkv.split(heads * head_dim, dim=-1)


def padding_bias(batch, tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    bias = torch.zeros(batch, tokens)
    for b in range(batch):
        keep = int(torch.randint(0, tokens + 1, (1,), generator=g))  # 0: every key masked
        bias[b, keep:] = LOWEST
    return bias


def reference(q, k, v, bias, heads, scale):
    return attention_torch(q.double(), k.double(), v.double(), bias, heads, scale)


def test_the_registry_has_a_reference_and_every_isa():
    names = [k["name"] for k in attention_kernels()]
    assert "f32_attention_reference" in names and "f32_attention_scalar" in names


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("batch,tokens,heads,head_dim", [
    (1, 1, 1, 1), (1, 1, 12, 32), (2, 3, 2, 5), (3, 16, 4, 8), (2, 17, 3, 32), (1, 33, 2, 48),
    (4, 64, 12, 32), (2, 65, 1, 20), (1, 130, 2, 40), (2, 7, 6, 33)])
@pytest.mark.parametrize("masked", [False, True])
def test_kernels_match_the_float64_reference(kernel, batch, tokens, heads, head_dim, masked):
    q, k, v = fused_qkv(batch, tokens, heads, head_dim)
    bias = padding_bias(batch, tokens) if masked else None
    scale = head_dim ** -0.5
    got = attention_cpu(q, k, v, bias, heads, scale, kernel=kernel)
    torch.testing.assert_close(got.double(), reference(q, k, v, bias, heads, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", kernels())
def test_constant_scores_and_large_ones(kernel):
    q, k, v = fused_qkv(2, 24, 2, 16, seed=3)
    # uniform weights; then scores in the hundreds (no overflow: the row's max is subtracted first;
    # a float32 score of ~500 is only good to ~3e-5, hence the looser tolerance there)
    for qq, kk, tol in ((torch.zeros_like(q), k, 1e-5), (q * 30, k * 30, 1e-4)):
        want = reference(qq, kk, v, None, 2, 0.25)
        torch.testing.assert_close(attention_cpu(qq, kk, v, None, 2, 0.25, kernel=kernel).double(), want,
                                   rtol=tol, atol=tol)


def test_separate_and_strided_tensors_are_read_in_place_or_copied():
    q, k, v = fused_qkv(3, 21, 3, 8, seed=4)
    want = reference(q, k, v, None, 3, 0.3)
    cases = [(q, k, v), (q.contiguous(), k.contiguous(), v.contiguous()),  # same strides, separate storage
             (q.contiguous(), k, v),  # different strides: copied
             (q.transpose(0, 1).contiguous().transpose(0, 1), k, v)]  # sentence stride below a sentence
    for qq, kk, vv in cases:
        torch.testing.assert_close(attention(qq, kk, vv, heads=3, scale=0.3).double(), want, rtol=1e-5, atol=1e-5)


def test_threads_split_sentences_and_heads_alike():
    q, k, v = fused_qkv(3, 40, 5, 16, seed=5)
    bias = padding_bias(3, 40, seed=6)
    one = attention(q, k, v, bias, heads=5, num_threads=1)
    for n in (2, 3, 16):
        assert torch.equal(attention(q, k, v, bias, heads=5, num_threads=n), one)


def test_empty_batch_and_other_dtypes():
    q, k, v = fused_qkv(0, 5, 2, 4)
    assert attention(q, k, v, heads=2).shape == (0, 5, 8)
    q, k, v = (t.double() for t in fused_qkv(2, 6, 2, 4))
    torch.testing.assert_close(attention(q, k, v, heads=2), attention_torch(q, k, v, None, 2, 0.5))


def test_bad_arguments_are_value_errors():
    q, k, v = fused_qkv(2, 5, 2, 4)
    with pytest.raises(ValueError, match="one shape"):
        attention(q, k[:, :4], v, heads=2)
    with pytest.raises(ValueError, match="divide"):
        attention(q, k, v, heads=3)
    with pytest.raises(ValueError, match="key_bias"):
        attention(q, k, v, torch.zeros(2, 4), heads=2)
    with pytest.raises(ValueError, match="unknown sparsert attention kernel"):
        attention_cpu(q, k, v, None, 2, 0.5, kernel="f32_attention_nope")


def test_the_op_traces_under_torch_compile():
    q, k, v = fused_qkv(2, 9, 3, 8, seed=7)
    bias = padding_bias(2, 9, seed=8)

    def f(q, k, v, bias):
        return attention(q, k, v, bias, heads=3) * 2

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, bias), f(q, k, v, bias), rtol=1e-5, atol=1e-5)


def test_the_raw_binding_refuses_inconsistent_sizes_and_strides():
    from sparsert._ext import native

    q, k, v = fused_qkv(2, 4, 2, 4)
    out = torch.empty(2, 4, 8)
    args = dict(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), batch_stride=4 * 24, row_stride=24,
                out=out.data_ptr(), out_batch_stride=32, out_row_stride=8, key_bias=0, batch=2, tokens=4, heads=2,
                head_dim=4, scale=0.5, num_threads=2)
    assert native().attention(**args).startswith("f32_attention_")
    for bad, match in (({"tokens": -1}, "non-negative"), ({"row_stride": 7}, "row strides"),
                       ({"out_row_stride": 7}, "row strides"), ({"batch_stride": 24}, "batch strides"),
                       ({"out_batch_stride": 8}, "batch strides"), ({"q": 0}, "null")):
        with pytest.raises(ValueError, match=match):
            native().attention(**{**args, **bad})
