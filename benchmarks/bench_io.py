"""File size and load time of sparsert files vs the dense ``state_dict`` files.

For each model: magnitude-prune its Linear/Conv2d layers (the classifier / the
embeddings stay dense) to the given sparsity with the given pattern, pack the
pruned layers in the pattern's format (``sparsify(format=...)``: no timing,
so the numbers do not depend on machine load), save, and compare with the
dense model saved by ``torch.save(state_dict)`` and by safetensors. Load times
are medians of repeated loads in this process (file in the page cache).

    python benchmarks/bench_io.py                    # digits MLP/CNN, MiniLM, BERT-base
    python benchmarks/bench_io.py --models digits-mlp --sparsity 0.9
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import sparsert
from sparsert import io
from sparsert import models
from sparsert.prune import Pruner


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, sparsity: float, pattern: str, kind: str, repeats: int, tmp: Path) -> dict:
    wl = models.build(name)
    dense = wl.model.eval()
    exclude = ["classifier"] if name.startswith("digits") else ["pooler"]
    model = copy.deepcopy(dense)
    Pruner(model, importance="magnitude", pattern=pattern, sparsity=sparsity, exclude=exclude).step()
    sparse = sparsert.sparsify(model, format=kind, check=False)
    f_sparse, f_pt, f_st = tmp / f"{name}.sparsert", tmp / f"{name}.pt", tmp / f"{name}.safetensors"
    io.save(sparse, f_sparse)
    state = {k: v.contiguous() for k, v in dense.state_dict().items()}
    torch.save(state, f_pt)
    save_file(state, str(f_st))
    summary = io.summary(f_sparse)
    skeleton = models.skeleton(name)
    t_load = _median_time(lambda: io.load(f_sparse, skeleton), repeats)
    t_read = _median_time(lambda: io.read(f_sparse), repeats)
    t_pt = _median_time(lambda: torch.load(f_pt, weights_only=True), repeats)
    t_st = _median_time(lambda: load_file(str(f_st)), repeats)
    prunable = sum(r["dense_bytes"] for r in summary["layers"])
    return {
        "model": name, "pattern": pattern, "kind": kind, "sparsity": sparsity,
        "sparse_file": f_sparse.stat().st_size, "dense_pt": f_pt.stat().st_size, "dense_st": f_st.stat().st_size,
        "ratio_pt": f_sparse.stat().st_size / f_pt.stat().st_size,
        "pruned_share": prunable / summary["dense_equivalent_bytes"],
        "layer_ratio": summary["sparse_layer_bytes"] / summary["sparse_layer_dense_bytes"],
        "load_ms": t_load * 1e3, "read_ms": t_read * 1e3, "torch_load_ms": t_pt * 1e3, "st_load_ms": t_st * 1e3,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["digits-mlp", "digits-cnn", "minilm", "bert-base"])
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            for pattern, kind in (("unstructured", "csr"), ("4x1", "bsr4x1")):
                rows.append(measure(name, args.sparsity, pattern, kind, args.repeats, Path(d)))
                print(rows[-1], flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"\n{datetime.date.today()}, {cpu}, commit {commit}, torch {torch.__version__}, sparsity {args.sparsity}")
    print("| model | pattern -> format | pruned share of dense bytes | sparse file | dense torch.save | dense safetensors "
          "| file / dense | pruned layers / dense | sparsert.load | read only | torch.load (dense) | safetensors load (dense) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['pattern']} -> {r['kind']} | {r['pruned_share']:.0%} | {r['sparse_file'] / 1e6:.3f} MB "
              f"| {r['dense_pt'] / 1e6:.3f} MB | {r['dense_st'] / 1e6:.3f} MB | **{r['ratio_pt']:.1%}** "
              f"| {r['layer_ratio']:.1%} | {r['load_ms']:.1f} ms | {r['read_ms']:.1f} ms | {r['torch_load_ms']:.1f} ms "
              f"| {r['st_load_ms']:.1f} ms |")


if __name__ == "__main__":
    main()
