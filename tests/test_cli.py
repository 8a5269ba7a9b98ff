"""The command line, driven as users drive it: ``python -m sparsert`` in a subprocess."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsert import io
from sparsert.nn import SparseLinear

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    env.pop("SPARSERT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "sparsert", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess, code: int, prefix: str, match: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(prefix) and match in lines[0], lines[0]
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.mul_(torch.rand_like(m.weight) < 0.2)
    model[0] = SparseLinear.from_dense(model[0], "csr")
    model[2] = SparseLinear.from_dense(model[2], "bsr4x1")
    path = tmp_path_factory.mktemp("cli") / "small.sparsert"
    io.save(model, path)
    return path


def test_help_and_version():
    r = cli("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("prune", "sparsify", "bench", "inspect"))
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("sparsert ")


@pytest.mark.parametrize("args, match", [
    ((), "the following arguments are required: COMMAND"),
    (("frobnicate",), "invalid choice: 'frobnicate'"),
    (("prune", "digits-mlp", "--sparsity", "1.5", "-o", "x"), "--sparsity: must be in [0, 1), got 1.5"),
    (("prune", "digits-mlp"), "the following arguments are required: -o/--output"),
    (("bench", "x", "--threads", "0"), "--threads: must be a positive integer, got 0"),
    (("inspect",), "the following arguments are required: FILE"),
])
def test_bad_arguments_exit_2_with_one_line(args, match):
    one_line_error(cli(*args), 2, "sparsert", match)


def test_inspect_text_and_json(small_file):
    r = cli("inspect", small_file)
    assert r.returncode == 0, r.stderr
    assert "csr" in r.stdout and "bsr4x1" in r.stdout and "smaller" in r.stdout
    r = cli("inspect", small_file, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    want = io.summary(small_file)
    assert data["file_bytes"] == want["file_bytes"] == small_file.stat().st_size
    assert [(l["layer"], l["kind"], l["bytes"]) for l in data["layers"]] == \
        [(l["layer"], l["kind"], l["bytes"]) for l in want["layers"]]


def test_bad_files_exit_1_with_one_line(tmp_path, small_file):
    raw = small_file.read_bytes()
    (tmp_path / "trunc.sparsert").write_bytes(raw[: len(raw) // 2])
    one_line_error(cli("inspect", tmp_path / "trunc.sparsert"), 1, "sparsert inspect: error:", "truncated")
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF
    (tmp_path / "flip.sparsert").write_bytes(bytes(flipped))
    one_line_error(cli("inspect", tmp_path / "flip.sparsert"), 1, "sparsert inspect: error:", "checksum mismatch")
    one_line_error(cli("inspect", tmp_path / "missing.sparsert"), 1, "sparsert inspect: error:", "no such file")
    one_line_error(cli("sparsify", "no-such-model", "-o", tmp_path / "o.sparsert"), 1,
                   "sparsert sparsify: error:", "is not a built-in example")
    one_line_error(cli("bench", small_file), 1, "sparsert bench: error:", "does not say how to build the model")
    one_line_error(cli("prune", "digits-mlp", "--pattern", "3:2", "-o", tmp_path / "x.sparsert"), 1,
                   "sparsert prune: error:", "--pattern '3:2'")
    one_line_error(cli("prune", "digits-mlp", "-o", tmp_path / "nodir" / "x.sparsert"), 1,
                   "sparsert prune: error:", "does not exist")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "tiny-bert"
    transformers.BertModel(cfg).save_pretrained(path, safe_serialization=True)
    return path


def test_prune_sparsify_bench_export_on_a_hugging_face_directory(tmp_path, hf_dir):
    pruned, fast, program = tmp_path / "p.sparsert", tmp_path / "f.sparsert", tmp_path / "f.pt2"
    r = cli("prune", hf_dir, "--sparsity", "0.8", "--pattern", "4x1", "--exclude", "pooler", "-o", pruned, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(r.stdout)
    assert data["format"] == "bsr4x1"
    layers = {l["layer"]: l["sparsity"] for l in data["layers"]}
    assert layers["pooler.dense"] == 0.0
    assert all(0.79 <= v <= 0.81 for k, v in layers.items() if k.startswith("encoder.")), layers
    assert 0.0 < data["quality_after"]["cosine"] <= 1.0 + 1e-6
    assert data["file_bytes"] == pruned.stat().st_size
    loaded = io.load(pruned)  # the architecture comes from the stored config
    assert sum(isinstance(m, SparseLinear) for m in loaded.modules()) == 6  # Q, K, V, attention output, FFN in, FFN out

    # --min-speedup 0.01: take the fastest sparse format even where tiny layers gain nothing
    r = cli("sparsify", pruned, "--example-shape", "2x16", "--threads", "1", "--min-speedup", "0.01", "-o", fast,
            "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(r.stdout)["plan"]
    assert len(plan) == 6 and all(d["chosen"] != "dense" for d in plan)
    assert len(io.read(fast).layers) == 6

    r = cli("bench", pruned, "--example-shape", "2x16", "--threads", "1", "--repeats", "3", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    bench = json.loads(r.stdout)
    assert bench["threads"] == 1 and bench["dense"]["calls"] >= 3 and bench["speedup"] > 0
    assert any(l["format"] == "bsr4x1" for l in bench["layers"])

    r = cli("sparsify", pruned, "--example-shape", "2x16", "--format", "csr", "-o", program, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["output"]["sparsert_ops"] == 6
    r = cli("bench", program, "--dense", hf_dir, "--threads", "1", "--repeats", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "speedup" in r.stdout
    one_line_error(cli("prune", program, "-o", tmp_path / "x.sparsert"), 1, "sparsert prune: error:",
                   "can only be benchmarked")


def test_prune_with_reconstruct_keeps_more_of_the_dense_model(tmp_path, hf_dir):
    cosines = {}
    for extra in ([], ["--reconstruct"]):
        r = cli("prune", hf_dir, "--sparsity", "0.7", "--importance", "wanda", "--exclude", "pooler",
                "-o", tmp_path / f"p{len(extra)}.sparsert", "--json", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        data = json.loads(r.stdout)
        cosines[bool(extra)] = data["quality_after"]["cosine"]
        layers = {l["layer"]: l["sparsity"] for l in data["layers"]}
        # wanda ranks per row: 22 of 32 (or 45 of 64) weights per row
        assert all(0.68 <= v <= 0.71 for k, v in layers.items() if k.startswith("encoder.")), layers
    refit = data["reconstruct"]
    assert len(refit) == 6 and all(e["error_after"] < e["error_before"] for e in refit.values())
    assert cosines[True] > cosines[False], cosines
    r = cli("prune", hf_dir, "--sparsity", "0.7", "--exclude", "pooler", "--reconstruct", "-o", tmp_path / "t.sparsert")
    assert r.returncode == 0 and "reconstructed 6 layer(s)" in r.stdout, r.stderr[-3000:]


def test_prune_a_built_in_example_with_fine_tuning_and_calibration_file(tmp_path):
    from sparsert.models import digits

    d = digits.load_data()
    import numpy as np

    np.savez(tmp_path / "calib.npz", x=d.x_train[:128].numpy(), y=d.y_train[:128].numpy())
    out = tmp_path / "mlp.sparsert"
    r = cli("prune", "digits-mlp", "--sparsity", "0.9", "--importance", "taylor", "--calib", tmp_path / "calib.npz",
            "--exclude", "classifier", "--finetune-epochs", "2", "-o", out, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(r.stdout)
    assert data["quality_before"]["accuracy"] > 0.9
    assert data["quality_after"]["accuracy"] > 0.8  # 2 epochs of mask-preserving fine-tuning recover most of it
    assert data["file_bytes"] <= 0.2 * data["dense_equivalent_bytes"] + 10_000
    layers = {l["layer"]: l["sparsity"] for l in data["layers"]}
    assert layers["classifier"] == 0.0 and layers["fc1"] == pytest.approx(0.9, abs=0.01)
    r = cli("inspect", out)
    assert r.returncode == 0 and "fc1" in r.stdout and "digits-mlp" in r.stdout


def test_the_readme_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "sparsert.demo", "--model", "digits-mlp", "--epochs", "1",
                        "--shape", "64x1x8x8", "--threads", "1", "--out", str(tmp_path), "--reconstruct"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "refit the kept weights of 2 layers" in r.stdout  # fc1, fc2 (the classifier is not pruned)
    for step in ("1. dense", "2. prune", "3. fine-tune", "4. sparsify", "5. save", "6. latency", "summary"):
        assert f"== {step}" in r.stdout, step
    saved = tmp_path / "digits-mlp.sparsert"
    dense = tmp_path / "digits-mlp-dense.safetensors"
    assert saved.stat().st_size < 0.25 * dense.stat().st_size  # 90% of fc1/fc2 pruned, stored sparse
    loaded = io.load(saved)  # no skeleton needed: the file names its example
    from sparsert.models import digits

    d = digits.load_data()
    assert digits.accuracy(loaded, d.x_test, d.y_test) > 0.8


# --------------------------------------------------------------------------- first-hour rough edges
def test_json_errors_are_one_json_object(tmp_path, small_file):
    r = cli("inspect", tmp_path / "missing.sparsert", "--json")
    assert r.returncode == 1
    err = json.loads(r.stdout)
    assert "no such file" in err["error"] and err["type"] == "SparsertFileError" and err["exit_status"] == 1
    r = cli("prune", "digits-mlp", "--sparsity", "1.5", "-o", "x.sparsert", "--json")
    assert r.returncode == 2
    err = json.loads(r.stdout)
    assert err["type"] == "usage" and "--sparsity: must be in [0, 1)" in err["error"]
    one_line_error(r, 2, "sparsert prune: error:", "--sparsity")  # and still one line for people


@pytest.mark.parametrize("args, code, match", [
    (("bench", "SMALL", "--plot", "/nonexistent/p.png"), 1, "--plot /nonexistent/p.png: directory '/nonexistent' does not exist"),
    (("bench", "SMALL", "--plot", "TMP/p.txt"), 1, "expected an image file name ending in"),
    (("sparsify", "SMALL", "--min-speedup", "-1", "-o", "TMP/y.sparsert"), 2, "--min-speedup: must be a positive number, got -1"),
    (("prune", "digits-mlp", "--lr", "0", "-o", "TMP/y.sparsert"), 2, "--lr: must be a positive number, got 0"),
    (("sparsify", "SMALL", "-o", "TMP/y.txt"), 1, "-o TMP/y.txt: expected a sparsert file name ending in .sparsert"),
    (("prune", "digits-mlp", "-o", "TMP/y.pt2"), 1, "expected a sparsert file name ending in .sparsert (or .safetensors)"),
    (("sparsify", "digits-mlp", "--example-shape", "2x64", "-o", "TMP/y.sparsert"), 1,
     "--example-shape 2x64: digits-mlp takes images of shape Nx1x8x8, got 2x64"),
    (("sparsify", "digits-mlp", "--example-shape", "1xabc", "-o", "TMP/y.sparsert"), 1,
     "--example-shape 1xabc: shape must look like 1x128"),
])
def test_each_rough_edge_is_one_line_in_the_clis_terms(tmp_path, small_file, args, code, match):
    fill = lambda a: str(a).replace("SMALL", str(small_file)).replace("TMP", str(tmp_path))
    r = cli(*map(fill, args))
    one_line_error(r, code, "sparsert", fill(match))
    assert "min_speedup" not in r.stderr and "Guard failed" not in r.stderr


def test_example_shapes_a_model_cannot_take(tmp_path, hf_dir):
    r = cli("sparsify", hf_dir, "--example-shape", "1x100000", "-o", tmp_path / "f.sparsert")
    one_line_error(r, 1, "sparsert sparsify: error:", "--example-shape 1x100000: tiny-bert takes at most 64 tokens")
    pruned, program = tmp_path / "p.sparsert", tmp_path / "f.pt2"
    assert cli("prune", hf_dir, "--sparsity", "0.5", "--exclude", "pooler", "-o", pruned).returncode == 0
    r = cli("sparsify", pruned, "--example-shape", "5x16", "--format", "csr", "-o", program)
    assert r.returncode == 0, r.stderr[-3000:]
    # exported with 5x16: other batches and lengths run (dynamic shapes), too many tokens do not
    r = cli("bench", program, "--dense", hf_dir, "--example-shape", "2x64", "--threads", "1", "--repeats", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("bench", program, "--dense", hf_dir, "--example-shape", "2x65", "--repeats", "2")
    one_line_error(r, 1, "sparsert bench: error:", "--example-shape 2x65: f.pt2 does not run on inputs of this "
                   "shape; it takes input_ids any x up to 64")


def test_prune_and_sparsify_say_why_the_file_is_not_smaller(tmp_path, hf_dir):
    pruned = tmp_path / "p.sparsert"
    r = cli("prune", hf_dir, "--sparsity", "0.5", "--exclude", "pooler", "-o", pruned, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(r.stdout)
    sizes = data["sizes"]
    # the tiny BERT's embeddings (200 + 64 + 2 rows of 32) are stored dense, as they are
    assert sizes["embedding_bytes"] == 4 * 32 * (200 + 64 + 2)
    assert sizes["index_bits"] == [16] and sizes["density"] == pytest.approx(0.5, abs=0.01)
    assert sizes["file_bytes"] == pruned.stat().st_size
    assert "embeddings are not pruned" in data["size_note"] and "16-bit indices cost" in data["size_note"]
    r = cli("sparsify", pruned, "--example-shape", "1x16", "--threads", "1", "--min-speedup", "1000",
            "-o", tmp_path / "f.sparsert")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "6 of 6 pruned layers kept dense: no sparse format was 1000x faster" in r.stdout
    assert "size: " in r.stdout and "embeddings are not pruned" in r.stdout


def _run_on_a_terminal(*args) -> tuple[int, str, str]:
    """The CLI with stderr on a pseudo-terminal (as a person runs it): (status, stdout, stderr)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a terminal 160 columns wide
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sparsert", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    out, _ = proc.communicate(timeout=600)  # (closes the pipe)
    os.close(master)
    return proc.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


def test_progress_on_a_terminal_only_and_never_under_json(tmp_path):
    out = tmp_path / "m.sparsert"
    code, _, err = _run_on_a_terminal("prune", "digits-mlp", "--importance", "taylor", "-o", out)
    assert code == 0, err[-3000:]
    assert "calibrating (taylor)" in err and "taylor scores" in err and "measuring" in err
    code, _, err = _run_on_a_terminal("sparsify", out, "--threads", "1", "-o", tmp_path / "f.sparsert")
    assert code == 0, err[-3000:]
    assert "sparsify" in err and "layer" in err
    code, stdout, err = _run_on_a_terminal("prune", "digits-mlp", "--importance", "taylor", "-o", out, "--json")
    assert code == 0 and json.loads(stdout)["output"] == str(out)
    assert err.strip() == "", err  # nothing on the terminal under --json
    r = cli("prune", "digits-mlp", "--importance", "taylor", "-o", out)  # not a terminal: no bars in logs
    assert r.returncode == 0 and "\r" not in r.stderr and "calibrating" not in r.stderr, r.stderr
