"""Fuzzing the loader on mutated valid files (bounded budget).

Two kinds of mutation:

* raw bytes: truncation, flipped bytes, inserted/deleted bytes. Every one is
  either rejected with :class:`SparsertFileError` or (when it only touched
  bytes without meaning, like header padding) loads to *exactly* the
  original content — never another exception, never different numbers;
* crafted files with a *valid* checksum (what an attacker or a buggy writer
  produces): out-of-range / unsorted indices, row pointers that lie, metadata
  that lies about shapes, nnz, density, kinds, blocks or conv parameters,
  wrong dtypes, missing or extra tensors, NaN values, other format versions.
  Every one is rejected with :class:`SparsertFileError`.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from sparsert import io
from sparsert.nn import SparseConv2d, SparseLinear

FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.csr = nn.Linear(9, 7)
        self.bsr = nn.Linear(10, 9, bias=False)  # 9 rows: a partial 4x1 edge block
        self.nm = nn.Linear(10, 6)  # 10 columns: a partial 4-group
        self.dense = nn.Linear(6, 3)
        self.norm = nn.LayerNorm(3)
        self.plain = nn.Linear(8, 8)  # pruned but left dense: stored as CSR, runs dense


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = M()
    with torch.no_grad():
        m.plain.weight.mul_(torch.rand_like(m.plain.weight) < 0.2)
        for lin in (m.conv, m.csr, m.bsr):
            w = lin.weight
            w.mul_(torch.rand_like(w) < 0.4)
        w = m.nm.weight
        pad = torch.nn.functional.pad(w.abs(), (0, 2)).reshape(6, 3, 4)
        keep = torch.zeros_like(pad, dtype=torch.bool).scatter_(-1, pad.topk(2, -1).indices, True)
        w.mul_(keep.reshape(6, 12)[:, :10])
    m.conv = SparseConv2d.from_dense(m.conv, "csr")
    m.csr = SparseLinear.from_dense(m.csr, "csr", activation="relu")
    m.bsr = SparseLinear.from_dense(m.bsr, "bsr4x1")
    m.nm = SparseLinear.from_dense(m.nm, "nm2:4")
    m.dense = SparseLinear.from_dense(m.dense, "dense")
    return m


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[bytes, io.SparseFile]:
    path = tmp_path_factory.mktemp("fuzz") / "valid.sparsert"
    io.save(_model(), path)
    f = io.read(path)
    assert f.layers["plain"].meta["runtime"] == "dense" and f.layers["csr"].meta["runtime"] == "sparse"
    return path.read_bytes(), f


def _same(a: io.SparseFile, b: io.SparseFile) -> bool:
    if a.layers.keys() != b.layers.keys() or a.dense.keys() != b.dense.keys():
        return False
    for k, ra in a.layers.items():
        rb = b.layers[k]
        if ra.meta != rb.meta or (ra.bias is None) != (rb.bias is None):
            return False
        if ra.bias is not None and not torch.equal(ra.bias, rb.bias):
            return False
        ta = {"w": ra.packed} if isinstance(ra.packed, torch.Tensor) else ra.packed.tensors()
        tb = {"w": rb.packed} if isinstance(rb.packed, torch.Tensor) else rb.packed.tensors()
        if ta.keys() != tb.keys() or any(ta[n].dtype != tb[n].dtype or not torch.equal(ta[n], tb[n]) for n in ta):
            return False
    return all(torch.equal(a.dense[k], b.dense[k]) for k in a.dense)


def _check_bytes(tmp_path, data: bytes, original: io.SparseFile) -> None:
    path = tmp_path / "mutated.sparsert"
    path.write_bytes(data)
    try:
        got = io.read(path)
    except io.SparsertFileError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e).strip()
        return
    assert _same(got, original), "a mutated file loaded with different content"


@FUZZ
@given(data=st.data())
def test_truncated_files_are_rejected(tmp_path, valid, data):
    raw, original = valid
    n = data.draw(st.integers(0, len(raw) - 1))
    path = tmp_path / "t.sparsert"
    path.write_bytes(raw[:n])
    with pytest.raises(io.SparsertFileError):
        io.read(path)


@FUZZ
@given(data=st.data())
def test_flipped_bytes_are_rejected_or_harmless(tmp_path, valid, data):
    raw, original = valid
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        # half the flips land in the header (metadata, tensor table), half anywhere
        hi = min(len(buf), 8 + int.from_bytes(raw[:8], "little")) if data.draw(st.booleans()) else len(buf)
        i = data.draw(st.integers(0, hi - 1))
        buf[i] ^= data.draw(st.integers(1, 255))
    _check_bytes(tmp_path, bytes(buf), original)


@FUZZ
@given(data=st.data())
def test_inserted_or_deleted_bytes_are_rejected_or_harmless(tmp_path, valid, data):
    raw, original = valid
    i = data.draw(st.integers(0, len(raw) - 1))
    if data.draw(st.booleans()):
        mutated = raw[:i] + data.draw(st.binary(min_size=1, max_size=8)) + raw[i:]
    else:
        mutated = raw[:i] + raw[i + data.draw(st.integers(1, 8)):]
    _check_bytes(tmp_path, mutated, original)


# ---------------------------------------------------------------------------
# Crafted files: semantically wrong, correctly checksummed


def _unpack(raw: bytes) -> tuple[dict, dict, dict]:
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    return dict(st_load(raw)), json.loads(meta["sparsert"]), dict(meta)


def _repack(tensors: dict, body: dict, meta: dict, *, resign: bool = True) -> bytes:
    meta = dict(meta)
    meta["sparsert"] = json.dumps(body, sort_keys=True)
    if resign:
        meta["sha256"] = io.schema.digest(meta["sparsert"], tensors)
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def _reject(tmp_path, data: bytes, match: str | None = None, skeleton: bool = False) -> str:
    """The crafted file is rejected by read() (or, with ``skeleton``, at the latest by load into M())."""
    path = tmp_path / "crafted.sparsert"
    path.write_bytes(data)
    with pytest.raises(io.SparsertFileError, match=match) as e:
        io.read(path)
        if skeleton:
            io.load(path, M())
    return str(e.value)


def test_the_crafting_helpers_round_trip(tmp_path, valid):
    raw, original = valid
    path = tmp_path / "same.sparsert"
    path.write_bytes(_repack(*_unpack(raw)))
    assert _same(io.read(path), original)


INDEX_TENSORS = ["conv::col_indices", "csr::col_indices", "bsr::col_indices", "nm::col_indices", "plain::col_indices"]
POINTER_TENSORS = ["conv::row_ptr", "csr::row_ptr", "bsr::row_ptr", "plain::row_ptr"]


@FUZZ
@given(data=st.data())
def test_out_of_range_indices_are_rejected(tmp_path, valid, data):
    tensors, body, meta = _unpack(valid[0])
    name = data.draw(st.sampled_from(INDEX_TENSORS))
    t = tensors[name].to(torch.int64)
    flat = t.reshape(-1)
    layer = name.split("::")[0]
    limit = body["layers"][layer]["shape"][1]  # (the BSR layer has 4x1 blocks: block columns = columns)
    i = data.draw(st.integers(0, flat.numel() - 1))
    flat[i] = data.draw(st.one_of(st.integers(limit, 32767), st.integers(-32768, -1)))
    tensors[name] = t.to(tensors[name].dtype)
    _reject(tmp_path, _repack(tensors, body, meta))


@FUZZ
@given(data=st.data())
def test_lying_row_pointers_are_rejected(tmp_path, valid, data):
    tensors, body, meta = _unpack(valid[0])
    name = data.draw(st.sampled_from(POINTER_TENSORS))
    rp = tensors[name].clone()
    i = data.draw(st.integers(0, rp.numel() - 1))
    delta = data.draw(st.integers(-1000, 1000).filter(lambda d: d != 0))
    rp[i] += delta
    tensors[name] = rp
    # a change that keeps it non-decreasing with the right ends is a different but valid matrix
    # only if the counts still add up, which moving one inner pointer can do: exclude that case
    ok = rp[0] == 0 and rp[-1] == tensors[name.replace("row_ptr", "col_indices")].numel() and bool(
        (rp[1:] >= rp[:-1]).all())
    if ok:
        return
    _reject(tmp_path, _repack(tensors, body, meta))


LYING_FIELDS = [
    ("shape", 0), ("shape", 1), ("nnz", None), ("density", None), ("in_features", None),
    ("out_features", None), ("block", 0), ("block", 1), ("n", None), ("m", None),
]


@FUZZ
@given(data=st.data())
def test_metadata_that_lies_about_layers_is_rejected(tmp_path, valid, data):
    tensors, body, meta = _unpack(valid[0])
    layer = data.draw(st.sampled_from(sorted(body["layers"])))
    d = body["layers"][layer]
    field, idx = data.draw(st.sampled_from([f for f in LYING_FIELDS if f[0] in d]))
    if field == "density":
        d[field] = d[field] + data.draw(st.sampled_from([1e-6, -1e-3, 0.5, -1.0, 2.0]))
    elif idx is None:
        d[field] = d[field] + data.draw(st.integers(-5, 5).filter(lambda v: v != 0))
    else:
        d[field] = list(d[field])
        d[field][idx] = d[field][idx] + data.draw(st.integers(-3, 3).filter(lambda v: v != 0))
    _reject(tmp_path, _repack(tensors, body, meta))


@FUZZ
@given(data=st.data())
def test_metadata_with_wrong_types_or_values_is_rejected(tmp_path, valid, data):
    tensors, body, meta = _unpack(valid[0])
    layer = data.draw(st.sampled_from(sorted(body["layers"])))
    d = body["layers"][layer]
    field = data.draw(st.sampled_from(sorted(d)))
    bad = data.draw(st.sampled_from([None, "x", -1, 1.5, [1], {"a": 1}, True, 10 ** 12, float("nan")]))
    if d[field] == bad or (field == "activation" and bad is None):
        return
    if field == "density" and isinstance(bad, float) and bad == bad and abs(bad - d[field]) < 1e-12:
        return
    d[field] = bad
    _reject(tmp_path, _repack(tensors, body, meta))


@FUZZ
@given(data=st.data())
def test_wrong_kinds_and_conv_parameters_are_rejected(tmp_path, valid, data):
    tensors, body, meta = _unpack(valid[0])
    choice = data.draw(st.integers(0, 3))
    if choice == 0:
        layer = data.draw(st.sampled_from(sorted(body["layers"])))
        kinds = ["csr", "bsr4x1", "bsr1x4", "bsr2x2", "nm2:4", "nm1:4", "dense", "bsr0x1", "coo", "nm5:4"]
        new = data.draw(st.sampled_from([k for k in kinds if k != body["layers"][layer]["kind"]]))
        body["layers"][layer]["kind"] = new
    elif choice == 1:
        conv = body["layers"]["conv"]["conv"]
        key = data.draw(st.sampled_from(["in_channels", "out_channels", "groups", "kernel_size"]))
        conv[key] = [4, 3] if key == "kernel_size" else conv[key] * 2
    elif choice == 2:
        layer = data.draw(st.sampled_from(["csr", "bsr", "nm", "dense"]))
        body["layers"][layer]["type"] = data.draw(st.sampled_from(["conv2d", "embedding", None]))
    else:
        name = data.draw(st.sampled_from(sorted(body["layers"])))
        body["layers"][name + ".inner"] = copy.deepcopy(body["layers"][name])
    _reject(tmp_path, _repack(tensors, body, meta))


@FUZZ
@given(data=st.data())
def test_wrong_dtypes_missing_and_extra_tensors_are_rejected(tmp_path, valid, data):
    tensors, body, meta = _unpack(valid[0])
    name = data.draw(st.sampled_from(sorted(tensors)))
    action = data.draw(st.sampled_from(["dtype", "drop", "extra", "nan", "reshape"]))
    t = tensors[name]
    if action == "dtype":
        new = data.draw(st.sampled_from([torch.int64, torch.float64, torch.uint8, torch.int8, torch.bool]))
        if new == t.dtype:
            return
        if t.dtype.is_floating_point and new == torch.float64 and "::" not in name:
            return  # plain state_dict entries may be any float dtype (load_state_dict casts)
        tensors[name] = t.to(new)
    elif action == "drop":
        del tensors[name]
    elif action == "extra":
        tensors[name + "_extra"] = torch.zeros(2)
    elif action == "nan":
        if not t.dtype.is_floating_point or t.numel() == 0 or "::" not in name:
            return
        tensors[name] = t.clone().reshape(-1).index_fill_(0, torch.tensor([0]), float("nan")).reshape(t.shape)
    else:
        if t.numel() < 2:
            return
        tensors[name] = t.reshape(-1)[:-1] if t.dim() == 1 else t.reshape(-1)
    _reject(tmp_path, _repack(tensors, body, meta), skeleton="::" not in name)


@pytest.mark.parametrize("version", ["0", "2", "1.0", "", None])
def test_other_format_versions_are_rejected_clearly(tmp_path, valid, version):
    tensors, body, meta = _unpack(valid[0])
    if version is None:
        del meta["format_version"]
    else:
        meta["format_version"] = version
    msg = _reject(tmp_path, _repack(tensors, body, meta), match="format version")
    assert "this sparsert reads version 1" in msg


def test_altered_content_without_a_new_checksum_is_rejected(tmp_path, valid):
    tensors, body, meta = _unpack(valid[0])
    tensors["csr::values"] = tensors["csr::values"] * 1.01
    _reject(tmp_path, _repack(tensors, body, meta, resign=False), match="checksum mismatch")
    tensors, body, meta = _unpack(valid[0])
    body["layers"]["csr"]["activation"] = None
    _reject(tmp_path, _repack(tensors, body, meta, resign=False), match="checksum mismatch")


# Lying model descriptions and hostile JSON (issue 17): refused before anything is built


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(hidden=st.sampled_from([8, 16, 2048, 8192, 10**9]), layers=st.sampled_from([1, 2, 8, 48, 10**6]),
       vocab=st.sampled_from([30, 60, 30522, 2**40]), example=st.sampled_from([None, "bert-base", "digits-mlp"]))
def test_lying_model_descriptions_are_refused_before_building(tmp_path, valid, hidden, layers, vocab, example):
    """The file holds M's arrays; any recorded architecture that is not M is refused,
    however large it claims to be, with a SparsertFileError and without building it."""
    tensors, body, meta = _unpack(valid[0])
    if example is None:
        body["model"] = {"hf_class": "BertModel", "hf_config": {
            "model_type": "bert", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 2,
            "intermediate_size": 4 * hidden, "vocab_size": vocab, "max_position_embeddings": 16}}
    else:
        body["model"] = {"example": example}
    path = tmp_path / "lying.sparsert"
    path.write_bytes(_repack(tensors, body, meta))
    with pytest.raises(io.SparsertFileError, match="lying.sparsert"):
        io.load(path)


def test_deep_json_is_a_file_error(tmp_path, valid):
    deep = "[" * 100000 + "]" * 100000
    header = ('{"a":' + deep + "}").encode()
    _reject(tmp_path, len(header).to_bytes(8, "little") + header, match="nested too deeply")
    tensors, body, meta = _unpack(valid[0])
    meta["sparsert"] = '{"layers": ' + deep + "}"
    meta["sha256"] = io.schema.digest(meta["sparsert"], tensors)
    _reject(tmp_path, st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta),
            match="nested too deeply")


def test_allowed_sha256_refuses_unlisted_files_before_parsing(tmp_path, valid):
    """The checksum inside a file detects corruption, not authorship: a crafted file
    whose checksum was recomputed reads; an allow-list of whole-file hashes refuses it."""
    raw, original = valid
    good = tmp_path / "good.sparsert"
    good.write_bytes(raw)
    good_hash = io.file_sha256(good)
    assert _same(io.read(good, allowed_sha256=[good_hash.upper()]), original)
    assert isinstance(io.load(good, M(), allowed_sha256=good_hash), M)
    tensors, body, meta = _unpack(raw)
    tensors["csr::values"] = tensors["csr::values"] * 2  # a plausible, re-signed forgery
    forged = tmp_path / "forged.sparsert"
    forged.write_bytes(_repack(tensors, body, meta))
    io.read(forged)  # reads: its checksum is self-consistent
    with pytest.raises(io.SparsertFileError, match="forged.sparsert: refused: its SHA-256 is not in allowed_sha256"):
        io.load(forged, M(), allowed_sha256={good_hash})
    junk = tmp_path / "junk.sparsert"
    junk.write_bytes(b"\xff" * 100)  # refused by the list, before any parsing
    with pytest.raises(io.SparsertFileError, match="refused"):
        io.read(junk, allowed_sha256=[good_hash])
    for bad in ([], ["abc"], [good_hash + "0"]):
        with pytest.raises(ValueError, match="allowed_sha256"):
            io.read(good, allowed_sha256=bad)
    with pytest.raises(TypeError, match="allowed_sha256"):
        io.read(good, allowed_sha256=5)
