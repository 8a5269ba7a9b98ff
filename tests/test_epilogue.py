"""One epilogue table (sparsert.ops.epilogue) for every path: each epilogue gives the
torch reference through the ops, the modules, a saved-then-loaded file, the CUDA
path (on a stub of the native module), the fake (tracing) path and the pure-torch
default that other devices run."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsert
from sparsert import ops
from sparsert.formats import pack
from sparsert.nn import SparseConv2d, SparseLinear
from sparsert.ops import epilogue
from sparsert.ops.conv import ConvWeight
from sparsert.ops.schema import conv2d_bsr_torch, linear_bitmask_torch, linear_bsr_torch

NAMES = [e.name for e in epilogue.EPILOGUES]
TORCH = {None: lambda y: y, "relu": F.relu, "gelu": F.gelu, "relu6": F.relu6}
KINDS = ["csr", "bsr4x1", "nm2:4", "dense"]
LINEAR_KINDS = KINDS + ["bitmask16"]  # bitmask16 runs Linear layers only


def test_the_table_covers_every_name_and_keeps_its_codes():
    # saved files and op schemas carry these numbers: they never change
    assert {e.name: e.code for e in epilogue.EPILOGUES} == {None: 0, "relu": 1, "gelu": 2, "relu6": 3}
    assert set(NAMES) == set(TORCH)
    assert epilogue.code_of("none") == 0 and epilogue.name_of(3) == "relu6"
    with pytest.raises(ValueError, match="relu6"):
        epilogue.code_of("tanh")
    with pytest.raises(ValueError, match="unknown epilogue code"):
        epilogue.kernel_code(7)
    y = torch.randn(50) * 10
    for e in epilogue.EPILOGUES:
        # what the kernel fuses, then what runs after, is the whole epilogue
        fused = torch.relu(y) if e.kernel == epilogue.KERNEL_RELU else y.clone()
        torch.testing.assert_close(epilogue.finish(fused, e.code), TORCH[e.name](y))
        before = y.clone()
        torch.testing.assert_close(epilogue.reference(y, e.code), TORCH[e.name](y))
        assert torch.equal(y, before)  # the reference leaves its input alone


def _pruned(rows, cols, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 4  # large enough that relu6 clips
    if kind == "nm2:4":
        keep = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1).argsort(-1) < 2
        return w * keep.reshape(rows, cols)
    if kind == "bsr4x1":
        return w * (torch.rand(rows // 4, 1, cols, generator=g) < 0.4).expand(-1, 4, -1).reshape(rows, cols)
    return w * (torch.rand(rows, cols, generator=g) < 0.4)


@pytest.mark.parametrize("kind", LINEAR_KINDS)
@pytest.mark.parametrize("act", NAMES)
def test_linear_everywhere(kind, act, tmp_path):
    w, b = _pruned(12, 16, kind), torch.randn(12)
    x = torch.randn(3, 16)
    ref = TORCH[act](F.linear(x.double(), w.double(), b.double()))
    packed = pack(w, kind)
    close = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ops.linear(x, packed, b, act).double(), ref, **close)           # op
    layer = SparseLinear(packed, b, activation=act)
    torch.testing.assert_close(layer(x).double(), ref, **close)                                 # module
    assert layer.activation == act
    model = nn.Sequential(nn.Linear(16, 12))
    model[0] = layer
    sparsert.save(model, tmp_path / "m.sparsert")
    loaded = sparsert.load(tmp_path / "m.sparsert", nn.Sequential(nn.Linear(16, 12)))
    assert loaded[0].activation == act
    torch.testing.assert_close(loaded(x).double(), ref, **close)                                # file
    if kind == "dense":
        return
    rp, ci, vals, r, c = packed.kernel_arrays()
    code = epilogue.code_of(act)
    if kind == "bitmask16":
        default = linear_bitmask_torch(x, rp, ci, vals, 12, b, code)
    else:
        default = linear_bsr_torch(x, rp, ci, vals, 12, r, c, b, code)
    torch.testing.assert_close(default.double(), ref, **close)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:                                    # fake
        fake = ops.linear(mode.from_tensor(x), packed, b, act)
    assert fake.shape == ref.shape


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", NAMES)
def test_conv2d_everywhere(kind, act, tmp_path):
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(_pruned(8, 36, kind if kind != "nm2:4" else "nm2:4").reshape(8, 4, 3, 3))
    x = torch.randn(2, 4, 7, 6)
    ref = TORCH[act](F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 1, 1))
    close = dict(rtol=1e-4, atol=1e-4)
    layer = SparseConv2d.from_dense(conv, kind, activation=act)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), ref, **close)                             # module
        assert layer.activation == act
        model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))
        model[0] = layer
        sparsert.save(model, tmp_path / "c.sparsert")
        loaded = sparsert.load(tmp_path / "c.sparsert", nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)))
        assert loaded[0].activation == act
        torch.testing.assert_close(loaded(x).double(), ref, **close)                            # file
        if kind == "dense":
            torch.testing.assert_close(ops.conv2d(x, conv.weight, conv.bias, padding=1, activation=act).double(),
                                       ref, **close)
            return
        cw = ConvWeight.from_dense(conv.weight, kind)
        torch.testing.assert_close(ops.conv2d(x, cw, conv.bias, padding=1, activation=act).double(), ref,
                                   **close)                                                    # op
        rp, ci, vals, r, c = cw.format.kernel_arrays()
        code = epilogue.code_of(act)
        y = conv2d_bsr_torch(x, rp, ci, vals, 8, [3, 3], r, c, conv.bias, [1, 1], [1, 1], [1, 1], 1, code)
        torch.testing.assert_close(y.double(), ref, **close)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:                                    # fake
        fake = ops.conv2d(mode.from_tensor(x), cw, conv.bias, padding=1, activation=act)
    assert fake.shape == ref.shape


@pytest.fixture
def cuda_stub(monkeypatch):
    """The CUDA backend on a stub of sparsert._C_cuda that computes in numpy (test_cuda.py)."""
    from test_cuda import _PointerStub

    import sparsert.ops.backends.cuda as cu
    stub = _PointerStub()
    monkeypatch.setattr(cu, "native_cuda", lambda: stub)
    monkeypatch.setattr(cu, "_launch_context", lambda x: (0, 0))
    return cu, stub


@pytest.mark.parametrize("act", NAMES)
def test_cuda_path_everywhere(cuda_stub, act):
    cu, stub = cuda_stub
    code = epilogue.code_of(act)
    w, b, x = _pruned(12, 16, "csr"), torch.randn(12), torch.randn(5, 16)
    rp, ci, vals, r, c = pack(w, "csr").kernel_arrays()
    y = cu.linear_bsr_cuda(x, rp, ci, vals, 12, r, c, b, code)
    torch.testing.assert_close(y.double(), TORCH[act](F.linear(x.double(), w.double(), b.double())),
                               rtol=1e-5, atol=1e-5)
    assert stub.calls[-1]["kernel"] == ""  # the native (stub) kernel ran, with the kernel's code
    w4 = _pruned(6, 36, "csr").reshape(6, 4, 3, 3)
    cw = ConvWeight.from_dense(w4, "csr")
    x4 = torch.randn(2, 4, 7, 7)
    rp, ci, vals, r, c = cw.format.kernel_arrays()
    y = cu.conv2d_bsr_cuda(x4, rp, ci, vals, 6, (3, 3), r, c, b[:6], (1, 1), (1, 1), (1, 1), 1, code)
    ref = TORCH[act](F.conv2d(x4.double(), w4.double(), b[:6].double(), 1, 1))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")  # torch's own
@pytest.mark.parametrize("kernel_size, dilation", [((2, 2), (1, 1)), ((4, 3), (1, 1)), ((3, 2), (1, 2)), ((3, 3), (1, 1))])
def test_same_padding_follows_torch_everywhere(kernel_size, dilation):
    """'same' with an even dilated kernel pads one more pixel at the bottom/right, as torch does,
    in the op and in the module alike."""
    conv = nn.Conv2d(3, 4, kernel_size, padding="same", dilation=dilation)
    x = torch.randn(1, 3, 6, 7)
    with torch.no_grad():
        ref = conv(x)
        cw = ConvWeight.from_dense(conv.weight, "csr")
        out_op = ops.conv2d(x, cw, conv.bias, padding="same", dilation=dilation)
        out_module = SparseConv2d.from_dense(conv, "csr")(x)
    torch.testing.assert_close(out_op, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_module, ref, rtol=1e-5, atol=1e-5)


def test_same_padding_with_stride_raises_everywhere():
    cw = ConvWeight.from_dense(torch.randn(4, 3, 3, 3), "csr")
    with pytest.raises(ValueError, match="stride 1"):
        ops.conv2d(torch.randn(1, 3, 8, 8), cw, stride=2, padding="same")
    with pytest.raises(ValueError, match="stride 1"):
        SparseConv2d(cw.format, in_channels=3, kernel_size=3, stride=2, padding="same")


@pytest.mark.parametrize("act", NAMES)
def test_densified_layers_keep_their_epilogue(act):
    """The CLI's dense baseline of a sparse model appends the epilogue as a torch layer."""
    from sparsert.cli import densify

    w, b, x = _pruned(12, 16, "csr"), torch.randn(12), torch.randn(3, 16) * 3
    model = nn.Sequential(SparseLinear(pack(w, "csr"), b, activation=act))
    dense = densify(model)
    assert not any(isinstance(m, SparseLinear) for m in dense.modules())
    torch.testing.assert_close(dense(x), model(x), rtol=1e-5, atol=1e-5)
