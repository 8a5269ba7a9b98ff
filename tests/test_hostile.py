"""Hostile inputs (issue 17): nothing a user or a file does may crash the process
or run code. Every case runs in its own process, so a segfault fails its test
(a negative return code is a signal) instead of killing pytest.

To keep this fast, one runner process imports torch and sparsert once and
forks a child per case (a fork costs milliseconds; a fresh interpreter with
torch costs seconds). A child prints ``OK <text>`` or ``<ExceptionType>: <message>``
as its last line; the tests check the exit status and that line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import sparsert
from sparsert.formats import CSR

ROOT = Path(__file__).resolve().parents[1]

_RUNNER = r'''
import json, os, sys, traceback
import torch
import sparsert, sparsert.nn, sparsert.formats, sparsert.io  # imported once, before the forks
sparsert.ops.cpu_isa()
cases = json.loads(sys.stdin.read())
results = {}
for name, code in cases.items():
    out = os.path.join(os.environ["HOSTILE_DIR"], name + ".out")
    pid = os.fork()
    if pid == 0:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1); os.dup2(fd, 2)
        status = 0
        try:
            exec(compile(code, name, "exec"), {"__name__": "__hostile__"})
        except BaseException as e:
            print(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            status = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(status)
    _, status = os.waitpid(pid, 0)
    code_ = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    with open(out, errors="replace") as fh:
        text = fh.read()
    results[name] = [code_, text]
print(json.dumps(results))
'''

_PRELUDE = """
import numpy as np, torch, sparsert
from sparsert.formats import CSR, BSR, NM
from sparsert.nn import SparseLinear, SparseConv2d
from sparsert.ops import ConvWeight
torch.manual_seed(0)
W = torch.randn(64, 64) * (torch.rand(64, 64) < 0.3)
X = torch.randn(4, 64)
def linear_of(weight):
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0])
    lin.weight.data = weight.clone()
    return lin
def same(a, b):
    assert torch.equal(a, b), "the kernel did not compute with the validated arrays"
    print("OK same")
"""

# name -> (code, expected last line: a regex searched in it)
CASES: dict[str, tuple[str, str]] = {}


def case(name: str, expect: str, code: str) -> None:
    CASES[name] = (_PRELUDE + textwrap.dedent(code), expect)


# -- 1. index arrays changed behind the validation's back ---------------------------------------
# A write torch does not record leaves the kernel on its private, validated copies.
case("csr_data_fill", "^OK same", """
    w = CSR.from_dense(W); y = sparsert.ops.linear(X, w)
    w.col_indices.data.fill_(30000)
    same(sparsert.ops.linear(X, w), y)""")
case("csr_row_ptr_data", "^OK same", """
    w = CSR.from_dense(W); y = sparsert.ops.linear(X, w)
    w.row_ptr.data[1] = 10**6
    same(sparsert.ops.linear(X, w), y)""")
case("csr_numpy_int32_indices", "^OK same", """
    wide = torch.zeros(3, 70000); wide[0, 5] = 1; wide[2, 69999] = 2   # > 65536 columns: int32 indices
    w = CSR.from_dense(wide); x = torch.randn(2, 70000); y = sparsert.ops.linear(x, w)
    assert w.col_indices.dtype == torch.int32
    w.col_indices.numpy()[:] = 10**9
    same(sparsert.ops.linear(x, w), y)""")
case("bsr_untyped_storage_fill", "^OK same", """
    w = BSR.from_dense(W, (4, 1)); y = sparsert.ops.linear(X, w)
    w.col_indices.untyped_storage().fill_(0x7f); w.row_ptr.untyped_storage().fill_(0x7f)
    same(sparsert.ops.linear(X, w), y)""")
case("nm_data_fill", "^OK same", """
    Wn = torch.randn(64, 64); Wn.view(64, 16, 4)[..., 2:] = 0
    w = NM.from_dense(Wn, 2, 4); y = sparsert.ops.linear(X, w)
    w.col_indices.data.fill_(30000)
    same(sparsert.ops.linear(X, w), y)""")
case("data_assignment", "^OK same", """
    w = CSR.from_dense(W); y = sparsert.ops.linear(X, w)
    w.col_indices.data = torch.full_like(w.col_indices, 30000)
    same(sparsert.ops.linear(X, w), y)""")
case("inference_mode_fill", "^OK same", """
    with torch.inference_mode():
        w = CSR.from_dense(W); y = sparsert.ops.linear(X, w)
        w.col_indices.fill_(30000)        # inference tensors keep no version counter
        w.row_ptr.fill_(2**31 - 1)
        same(sparsert.ops.linear(X, w), y)""")
case("sparse_linear_buffers", "^OK same", """
    m = SparseLinear.from_dense(linear_of(W), "csr"); y = m(X)
    m.packed_col_indices.data.fill_(30000); m.packed_row_ptr.numpy()[1] = 10**6
    same(m(X), y)""")
case("sparse_linear_nm_buffers", "^OK same", """
    Wn = torch.randn(64, 64); Wn.view(64, 16, 4)[..., 2:] = 0
    m = SparseLinear.from_dense(linear_of(Wn), "nm2:4"); y = m(X)
    m.packed_col_indices.untyped_storage().fill_(0x7f); m.packed_kernel_row_ptr.data.fill_(10**6)
    same(m(X), y)""")
case("in_place_update_is_seen_and_checked", r"^ValueError: column indices must lie in \[0, 64\)", """
    w = CSR.from_dense(W); sparsert.ops.linear(X, w)
    w.col_indices.fill_(30000)            # recorded by torch: validated again, and refused
    sparsert.ops.linear(X, w)""")
case("load_state_dict_hostile_inference_mode", r"^ValueError: column indices must lie", """
    lin = linear_of(W)
    with torch.inference_mode():
        m = SparseLinear.from_dense(lin, "csr"); m(X)
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        sd["packed_col_indices"].fill_(30000)
        m.load_state_dict(sd)
        m(X)""")
case("load_state_dict_good_inference_mode_takes_effect", "^OK same", """
    lin = linear_of(W)
    other = W[:, torch.randperm(64)]      # the same nnz, other columns
    with torch.inference_mode():
        m = SparseLinear.from_dense(lin, "csr"); m(X)
        source = SparseLinear.from_dense(linear_of(other), "csr")
        m.load_state_dict(source.state_dict())
        same(m(X), source(X))""")
case("values_storage_resized", r"^ValueError: the storage of values is smaller", """
    w = CSR.from_dense(W); sparsert.ops.linear(X, w)
    w.values.untyped_storage().resize_(4)
    sparsert.ops.linear(X, w)""")
# The per-call fast path trusts a remembered validation while the objects, their version
# counters and the values' address and memory are unchanged: each way to change one of them.
case("values_storage_moved_by_share_memory", "^OK same", """
    w = CSR.from_dense(W); y = sparsert.ops.linear(X, w)
    m = SparseLinear.from_dense(linear_of(W), "csr"); ym = m(X)
    w.values.share_memory_(); m.share_memory()   # swaps the memory under the values: validated again
    same(sparsert.ops.linear(X, w), y); same(m(X), ym)""")
case("values_storage_resized_back_to_its_size", "^OK same", """
    w = CSR.from_dense(W); y = sparsert.ops.linear(X, w)
    storage = w.values.untyped_storage(); n = storage.nbytes()
    saved = w.values.clone(); storage.resize_(4); storage.resize_(n)
    w.values.copy_(saved)
    same(sparsert.ops.linear(X, w), y)""")
case("inference_values_update_takes_effect", "^OK same", """
    with torch.inference_mode():
        w = CSR.from_dense(W); sparsert.ops.linear(X, w)
        w.values.mul_(2)                  # values are shared, not copied: no counter needed
        same(sparsert.ops.linear(X, w), sparsert.ops.linear(X, CSR.from_dense(2 * W)))""")
case("bitmask_data_fill_and_inference", "^OK same", """
    from sparsert.formats.bitmask import Bitmask
    Wb = torch.randn(64, 70) * (torch.rand(64, 70) < 0.5)
    with torch.inference_mode():
        m = SparseLinear(Bitmask.from_dense(Wb)); x = torch.randn(3, 70); y = m(x)
        m.packed_masks.fill_(-1); m.packed_row_offsets.fill_(10**12)   # no counter: the private copies stay
        same(m(x), y)""")
case("bitmask_in_place_update_is_checked", r"^ValueError: row_offsets must be the running popcount", """
    from sparsert.formats.bitmask import Bitmask
    m = SparseLinear(Bitmask.from_dense(torch.randn(64, 70) * (torch.rand(64, 70) < 0.5))); x = torch.randn(3, 70)
    m(x); m.packed_row_offsets.fill_(10**12)   # recorded by torch: validated again, and refused
    m(x)""")
case("conv2d_data_fill", "^OK same", """
    cw = ConvWeight.from_dense(torch.randn(8, 4, 3, 3) * (torch.rand(8, 4, 3, 3) < 0.4))
    x = torch.randn(1, 4, 9, 9); y = sparsert.ops.conv2d(x, cw)
    cw.format.col_indices.data.fill_(30000); cw.format.row_ptr.data[1] = 10**6
    same(sparsert.ops.conv2d(x, cw), y)""")
case("sparse_conv2d_buffers", "^OK same", """
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    conv.weight.data *= (torch.rand_like(conv.weight) < 0.4)
    m = SparseConv2d.from_dense(conv, "bsr4x1"); x = torch.randn(2, 4, 7, 7); y = m(x)
    m.packed_col_indices.data.fill_(30000)
    same(m(x), y)""")
case("raw_op_linear", "^OK same", """
    rp, ci, v, r, c = CSR.from_dense(W).kernel_arrays()
    y = torch.ops.sparsert.linear_bsr(X, rp, ci, v, 64, 1, 1, None, 0, 0)
    ci.data.fill_(30000)
    same(torch.ops.sparsert.linear_bsr(X, rp, ci, v, 64, 1, 1, None, 0, 0), y)""")
case("raw_op_conv", "^OK same", """
    cw = ConvWeight.from_dense(torch.randn(8, 4, 3, 3) * (torch.rand(8, 4, 3, 3) < 0.4))
    rp, ci, v, r, c = cw.format.kernel_arrays(); x = torch.randn(1, 4, 9, 9)
    args = (8, [3, 3], r, c, None, [1, 1], [1, 1], [1, 1], 1, 0, 0)
    y = torch.ops.sparsert.conv2d_bsr(x, rp, ci, v, *args)
    ci.data.fill_(30000)
    same(torch.ops.sparsert.conv2d_bsr(x, rp, ci, v, *args), y)""")
case("raw_op_hostile_from_the_start", r"^ValueError: column indices must lie", """
    rp, ci, v, r, c = CSR.from_dense(W).kernel_arrays()
    torch.ops.sparsert.linear_bsr(X, rp, torch.full_like(ci, 30000), v, 64, 1, 1, None, 0, 0)""")

# -- 3. raw ops with bad scalars: one line naming the argument -----------------------------------
_RAW = """
    rp, ci, v, r, c = CSR.from_dense(W).kernel_arrays()
    cw = ConvWeight.from_dense(torch.randn(8, 4, 3, 3) * (torch.rand(8, 4, 3, 3) < 0.4))
    crp, cci, cv, cr, cc = cw.format.kernel_arrays(); x4 = torch.randn(1, 4, 9, 9)
    def conv(**kw):
        a = dict(out_channels=8, kernel_size=[3, 3], block_rows=cr, block_cols=cc, bias=None, stride=[1, 1],
                 padding=[1, 1], dilation=[1, 1], groups=1, activation=0, num_threads=0)
        a.update(kw)
        return torch.ops.sparsert.conv2d_bsr(kw.pop("x", x4), crp, cci, cv, *[a[k] for k in (
            "out_channels", "kernel_size", "block_rows", "block_cols", "bias", "stride", "padding", "dilation",
            "groups", "activation", "num_threads")])
"""
case("raw_activation_5", r"^ValueError: sparsert::linear_bsr: activation: unknown epilogue code 5", _RAW + """
    torch.ops.sparsert.linear_bsr(X, rp, ci, v, 64, 1, 1, None, 5, 0)""")
case("raw_zero_dim_x", r"^ValueError: sparsert::linear_bsr: x must have at least 1", _RAW + """
    torch.ops.sparsert.linear_bsr(torch.tensor(1.0), rp, ci, v, 64, 1, 1, None, 0, 0)""")
case("raw_block_side_2_31", r"^ValueError: sparsert::linear_bsr: block_rows must lie in \[1, 2147483647\]", _RAW + """
    torch.ops.sparsert.linear_bsr(X, rp, ci, v, 64, 2**31, 1, None, 0, 0)""")
case("raw_negative_threads", r"^ValueError: sparsert::linear_bsr: num_threads must lie", _RAW + """
    torch.ops.sparsert.linear_bsr(X, rp, ci, v, 64, 1, 1, None, 0, -3)""")
case("raw_conv_stride_0", r"^ValueError: sparsert::conv2d_bsr: stride\[0\] must lie in \[1,", _RAW + """
    conv(stride=[0, 1])""")
case("raw_conv_kernel_size_one", r"^ValueError: sparsert::conv2d_bsr: kernel_size must be a list of two", _RAW + """
    conv(kernel_size=[3])""")
case("raw_conv_activation_5", r"^ValueError: sparsert::conv2d_bsr: activation", _RAW + """
    conv(activation=5)""")
case("raw_conv_huge_padding", r"^ValueError: sparsert::conv2d_bsr: padding .* larger than", _RAW + """
    conv(padding=[2**31 - 1, 0], dilation=[2**31 - 1, 1])""")
case("raw_conv_3d_x", r"^ValueError: sparsert::conv2d_bsr: x must be 4-D", _RAW + """
    conv(x=torch.randn(4, 9, 9))""")
case("raw_conv_block_2_31", r"^ValueError: sparsert::conv2d_bsr: block_cols must lie", _RAW + """
    conv(block_cols=2**31)""")

# -- 4. from_arrays never corrupts silently --------------------------------------------------------
case("from_arrays_index_2_40", r"^ValueError: shape .* too large", """
    CSR.from_arrays(torch.tensor([0, 1]), torch.tensor([2**40 - 1]), torch.tensor([1.0]), (1, 2**40))""")
case("from_arrays_float64_overflow", r"^ValueError: values holds 1e\+300, beyond float32", """
    CSR.from_arrays(torch.tensor([0, 1]), torch.tensor([3]), torch.tensor([1e300], dtype=torch.float64), (1, 8))""")
case("from_arrays_float_shape", r"^ValueError: shape must be two integers", """
    CSR.from_arrays(torch.tensor([0, 0, 0, 0, 0]), torch.tensor([], dtype=torch.int32), torch.tensor([]), (4.7, 8))""")
case("from_arrays_string_shape", r"^ValueError: shape must be two integers", """
    BSR.from_arrays(torch.tensor([0, 0]), torch.tensor([], dtype=torch.int32), torch.zeros(0, 4, 1), ('4', '8'),
                    (4, 1))""")
case("from_arrays_nm_float64_overflow", r"^ValueError: values holds", """
    NM.from_arrays(torch.tensor([[1e300, 0.0]], dtype=torch.float64), torch.tensor([[0, 1]]), (1, 4), 2, 4)""")

# -- 5. files that lie -------------------------------------------------------------------------------
_TINY_BERT = """
    import json, os, time
    from transformers import BertConfig, BertModel
    from safetensors.torch import load as st_load, save as st_save
    from sparsert import io
    cfg = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     vocab_size=60, max_position_embeddings=32, type_vocab_size=2)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    lin = model.encoder.layer[0].intermediate.dense
    lin.weight.data *= (torch.rand_like(lin.weight) < 0.3)
    sparsert.nn.surgery.swap(model, "encoder.layer.0.intermediate.dense", SparseLinear.from_dense(lin, "csr"))
    path = os.environ["HOSTILE_DIR"] + "/bert.sparsert"
    io.save(model, path)
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    body = json.loads(meta["sparsert"])
    def write_lie(config_changes):
        body["model"]["hf_config"].update(config_changes)
        meta["sparsert"] = json.dumps(body, sort_keys=True)
        tensors = dict(st_load(raw))
        meta["sha256"] = io.schema.digest(meta["sparsert"], tensors)
        with open(path, "wb") as fh:
            fh.write(st_save(tensors, metadata=meta))
    def rss_mb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) / 1024
"""
case("lying_bert_config_refused_before_building", r"^OK refused in", _TINY_BERT + """
    assert body["model"]["hf_class"] == "BertModel"
    write_lie({"hidden_size": 2048, "num_hidden_layers": 8, "intermediate_size": 8192})
    before, start = rss_mb("VmRSS"), time.time()
    try:
        io.load(path)
    except io.SparsertFileError as e:
        grown = rss_mb("VmHWM") - before
        assert path in str(e), e
        assert grown < 300, f"{grown:.0f} MB allocated before refusing"
        print(f"OK refused in {time.time() - start:.1f}s, +{grown:.0f} MB: {e}")""")
case("lying_layer_count_refused_on_meta", r"^OK refused.*does not (fit|exist)", _TINY_BERT + """
    write_lie({"num_hidden_layers": 3})      # within the size bound: refused by the fit on the meta device
    try:
        io.load(path)
    except io.SparsertFileError as e:
        print(f"OK refused: {e}")""")
case("deep_json_header", r"^SparsertFileError: .*deep\.sparsert: corrupt safetensors header \(JSON nested too deeply\)",
     """
    import os
    path = os.environ["HOSTILE_DIR"] + "/deep.sparsert"
    header = ('{"a":' + "[" * 100000 + "]" * 100000 + "}").encode()
    open(path, "wb").write(len(header).to_bytes(8, "little") + header)
    sparsert.io.read(path)""")
case("deep_json_metadata_resigned", r"^SparsertFileError: .*deepmeta\.sparsert: corrupt metadata JSON \(nested too deeply\)",
     """
    import os
    from safetensors.torch import save as st_save
    path = os.environ["HOSTILE_DIR"] + "/deepmeta.sparsert"
    body = '{"layers": ' + "[" * 100000 + "]" * 100000 + "}"
    meta = {"format": "sparsert", "format_version": "1", "sparsert_version": "0", "sparsert": body,
            "sha256": sparsert.io.schema.digest(body, {})}
    open(path, "wb").write(st_save({}, metadata=meta))
    sparsert.io.read(path)""")
case("read_dev_zero", r"^SparsertFileError: /dev/zero: is not a regular file", """
    sparsert.io.summary("/dev/zero")""")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("hostile")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HOSTILE_DIR": str(folder), "OMP_NUM_THREADS": "1", "SPARSERT_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps({k: v[0] for k, v in CASES.items()}),
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, f"the runner itself failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case(outcomes, name):
    import re
    status, text = outcomes[name]
    last = text.strip().splitlines()[-1] if text.strip() else ""
    assert status >= 0, f"{name} crashed with signal {-status}; output:\n{text[-2000:]}"
    assert re.search(CASES[name][1], last), f"{name} (exit {status}) ended with:\n{text[-2000:]}"


def test_the_remembered_validation_is_reused_only_while_nothing_changed():
    """The per-call fast path (``Validated.current``): the same objects, versions and
    values memory hand back the same validated copies; any change validates again."""
    from sparsert.ops.backends import cpu

    w = CSR.from_dense(torch.randn(16, 24) * (torch.rand(16, 24) < 0.4))
    rp, ci, v, r, c = w.kernel_arrays()
    first = cpu.check_weight_arrays(rp, ci, v, 16, 24, r, c)
    assert cpu.check_weight_arrays(rp, ci, v, 16, 24, r, c) is first
    assert cpu.check_weight_arrays(rp, ci, v, 16, 32, r, c) is not first  # other sizes: checked again
    again = cpu.check_weight_arrays(rp, ci, v, 16, 24, r, c)
    ci.add_(0)  # recorded by torch
    bumped = cpu.check_weight_arrays(rp, ci, v, 16, 24, r, c)
    assert bumped is not again and cpu.check_weight_arrays(rp, ci, v, 16, 24, r, c) is bumped
    assert cpu.check_weight_arrays(rp.clone(), ci, v, 16, 24, r, c) is not bumped  # another object
    latest = cpu.check_weight_arrays(rp, ci, v, 16, 24, r, c)
    v.share_memory_()  # the values' memory moved: validated (and held) again
    moved = cpu.check_weight_arrays(rp, ci, v, 16, 24, r, c)
    assert moved is not latest and moved.native[5] == v.data_ptr()
    with torch.inference_mode():
        rp2, ci2, v2 = rp.clone(), ci.clone(), v.clone()
    inference = cpu.check_weight_arrays(rp2, ci2, v2, 16, 24, r, c)
    assert cpu.check_weight_arrays(rp2, ci2, v2, 16, 24, r, c) is inference
    # int8 reads a private copy of unaligned qblocks: still remembered by the caller's array
    from sparsert.formats.q8bsr import Q8BSR
    from sparsert.ops.quantized import check_q8_arrays

    q8 = Q8BSR.from_dense(torch.randn(16, 32) * (torch.rand(16, 32) < 0.5))
    qrp, qci, qb = q8.kernel_arrays()[:3]
    shifted = torch.zeros(qb.numel() + 1, dtype=torch.int8)
    shifted[1:] = qb.reshape(-1)
    unaligned = shifted[1:].view(qb.shape)
    assert unaligned.data_ptr() % 4
    q8_checked = check_q8_arrays(qrp, qci, unaligned, q8.scales, 16, 32)
    assert check_q8_arrays(qrp, qci, unaligned, q8.scales, 16, 32) is q8_checked


@pytest.mark.python_only
def test_cli_inspect_dev_zero_is_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "sparsert", "inspect", "/dev/zero"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode > 0, r
    assert "/dev/zero" in r.stderr + r.stdout and "Traceback" not in r.stderr and "MemoryError" not in r.stderr


# -- item 3: a .pt2 never unpickles unless trusted ------------------------------------------------------
def _evil_pt2(tmp_path: Path) -> tuple[Path, Path]:
    """A real exported program whose sample inputs are a pickle that writes a marker file."""
    import pickle
    import zipfile

    from sparsert.nn import SparseLinear
    path, marker = tmp_path / "evil.pt2", tmp_path / "PWNED"
    m = torch.nn.Sequential(SparseLinear.from_dense(torch.nn.Linear(8, 4), "csr"))
    sparsert.export(m, torch.randn(2, 8), tmp_path / "good.pt2")

    class Payload:
        def __reduce__(self):
            return (exec, (f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')",))

    with zipfile.ZipFile(tmp_path / "good.pt2") as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data/sample_inputs/model.pt"):
                data = pickle.dumps(Payload())
            dst.writestr(item, data)
    return path, marker


@pytest.mark.python_only
def test_pt2_with_pickled_parts_is_refused_unless_trusted(tmp_path):
    from sparsert.io.export import PickleRefused, load_program
    path, marker = _evil_pt2(tmp_path)
    assert load_program(tmp_path / "good.pt2") is not None  # what sparsert.export writes needs no pickle
    with pytest.raises(PickleRefused, match="refused: the archive holds a pickled part"):
        load_program(path)
    assert not marker.exists()
    import warnings
    try:  # trusting it is the user's explicit choice, and then pickle runs (this is the danger refused above)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_program(path, trust_pickle=True)
    except Exception:
        pass
    assert marker.exists()
    assert torch.load is torch.serialization.load  # the guard restored what it replaced


@pytest.mark.python_only
def test_cli_bench_refuses_pickled_pt2(tmp_path):
    path, marker = _evil_pt2(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "sparsert", "bench", str(path), "--dense", "digits-mlp"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode > 0 and "pickle" in r.stderr + r.stdout and "--trust-pickle" in r.stderr + r.stdout, r
    assert not marker.exists()


# -- item 7: the raw native functions are not part of the public API ------------------------------------
@pytest.mark.python_only
def test_raw_native_functions_are_not_reachable_from_the_public_api():
    from sparsert._ext import native
    raw = native()
    forbidden = {id(raw)} | {id(getattr(raw, n)) for n in ("spmm", "conv2d")}
    seen, todo = set(), [sparsert]
    while todo:
        module = todo.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        for name in getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")]):
            value = getattr(module, name, None)
            assert id(value) not in forbidden, f"{module.__name__}.{name} exposes sparsert._C"
            if type(value) is type(sparsert) and value.__name__.startswith("sparsert"):
                todo.append(value)


# -- hypothesis: the raw ops' scalar arguments ------------------------------------------------------------
_W = CSR.from_dense(torch.randn(12, 10) * (torch.rand(12, 10) < 0.5))
_CONV = sparsert.ops.ConvWeight.from_dense(torch.randn(6, 2, 3, 3) * (torch.rand(6, 2, 3, 3) < 0.5))
_ints = st.one_of(st.integers(-3, 5), st.integers(-2**63, 2**63 - 1), st.sampled_from([2**31 - 1, 2**31, 2**32]))
_scalars = st.one_of(_ints, st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=2))
_pairs = st.one_of(st.lists(_ints, min_size=0, max_size=3), _scalars)
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(out=_scalars, br=_scalars, bc=_scalars, act=_scalars, threads=_scalars)
def test_raw_linear_scalars_fuzz(out, br, bc, act, threads):
    """Whatever the scalars, the raw op returns or raises a clean ValueError/TypeError/RuntimeError
    (torch's schema check of argument types) - never another exception, never a crash."""
    rp, ci, v, _, _ = _W.kernel_arrays()
    try:
        torch.ops.sparsert.linear_bsr(torch.randn(3, 10), rp, ci, v, out, br, bc, None, act, threads)
    except (ValueError, TypeError, RuntimeError) as e:
        assert "\n" not in str(e).strip() or isinstance(e, RuntimeError), str(e)


@FUZZ
@given(ks=_pairs, stride=_pairs, padding=_pairs, dilation=_pairs, groups=_scalars, act=_scalars,
       shape=st.lists(st.integers(0, 6), min_size=0, max_size=5))
def test_raw_conv_scalars_fuzz(ks, stride, padding, dilation, groups, act, shape):
    rp, ci, v, r, c = _CONV.format.kernel_arrays()
    try:
        torch.ops.sparsert.conv2d_bsr(torch.randn(shape), rp, ci, v, 6, ks, r, c, None, stride, padding,
                                      dilation, groups, act, 0)
    except (ValueError, TypeError, RuntimeError) as e:
        assert "\n" not in str(e).strip() or isinstance(e, RuntimeError), str(e)
