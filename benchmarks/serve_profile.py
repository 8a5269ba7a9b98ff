"""Where one serving worker's time goes: dense vs pruned MiniLM at the server's real batch shapes.

In one process (one worker's thread budget, default 1 thread), interleaved dense/pruned rounds, medians:
per request tokenisation and validation (:class:`~sparsert.serving.Frontend`, the HTTP process's share),
then per batch of B short sentences ``Engine.run`` (dense on sparsert's best dense path, the same
dense file on torch eager, and the pruned file) split into the model's Linear layers (forward hooks),
the rest of the forward pass, and the engine's own work (padding, pooling, JSON-ready answers), and
``json.dumps`` of the answers. The files are serve_load.py's (built into --workdir on first use).

    python benchmarks/serve_profile.py [--batch 1 4 8] [--threads 1] [--rounds 5] [--json FILE]

Numbers from a shared machine are only meaningful as ratios measured in this one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


class LinearClock:
    """Sums the wall time spent inside the model's Linear-like layers (forward pre/post hooks)."""

    def __init__(self, model):
        import torch

        self.total = 0.0
        self._start = {}
        self.handles = []
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) or type(m).__name__ in ("SparseLinear", "DenseLinear"):
                self.handles.append(m.register_forward_pre_hook(self._pre))
                self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, mod, args):
        self._start[id(mod)] = time.perf_counter()

    def _post(self, mod, args, out):
        self.total += time.perf_counter() - self._start.pop(id(mod))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="serve_load.py's --workdir (default: its default)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20, help="timed calls per model, batch and round")
    ap.add_argument("--layer-batch", type=int, default=4,
                    help="also time every Linear alone on the input of this many sentences (0: skip)")
    ap.add_argument("--json", help="also write the results here")
    args, rest = ap.parse_known_args()
    import torch

    import serve_load
    from sparsert.serving import Engine

    torch.set_num_threads(args.threads)
    load_args = serve_load.parser().parse_args(rest + (["--workdir", args.workdir] if args.workdir else []))
    dense_file, pruned_file, quality = serve_load.build_files_for(load_args)
    sentences = serve_load.short_sentences(Path(load_args.workdir) / "sentences.txt").read_text().splitlines()
    # "dense": what the server runs (sparsert's best dense path); "eager": the same file on torch's F.linear
    engines = {name: Engine(path, threads=args.threads, tokenizer="minilm", dense_path=how)
               for name, path, how in (("dense", dense_file, "best"), ("eager", dense_file, "eager"),
                                       ("pruned", pruned_file, "best"))}
    clocks = {name: LinearClock(e.model) for name, e in engines.items()}
    for e in engines.values():
        e.warmup()
    front = engines["dense"].frontend
    t0 = time.perf_counter()
    for s in sentences:
        front.parse("embeddings", {"input": s})
    parse_ms = (time.perf_counter() - t0) / len(sentences) * 1e3
    print(f"pruned model: {quality}")
    print(f"tokenise + validate one short sentence (HTTP process): {parse_ms:.3f} ms")
    samples = {(m, b, k): [] for m in engines for b in args.batch for k in ("run", "linear", "json")}
    for _ in range(args.rounds):
        for b in args.batch:
            for name, engine in engines.items():  # interleaved: load drift hits both alike
                clock = clocks[name]
                for c in range(args.calls):
                    batch = [front.parse("embeddings", {"input": sentences[(c * b + j) % len(sentences)]})
                             for j in range(b)]
                    clock.total = 0.0
                    t0 = time.perf_counter()
                    answers = engine.run(batch)
                    t1 = time.perf_counter()
                    for a in answers:
                        json.dumps(a)
                    t2 = time.perf_counter()
                    samples[(name, b, "run")].append(t1 - t0)
                    samples[(name, b, "linear")].append(clock.total)
                    samples[(name, b, "json")].append(t2 - t1)
    rows = []
    print(f"{'model':7s} {'batch':>5s} {'run ms':>8s} {'Linear ms':>10s} {'rest ms':>8s} {'json ms':>8s}")
    for b in args.batch:
        for name in engines:
            med = {k: statistics.median(samples[(name, b, k)]) * 1e3 for k in ("run", "linear", "json")}
            row = {"model": name, "batch": b, "run_ms": med["run"], "linear_ms": med["linear"],
                   "rest_ms": med["run"] - med["linear"], "json_ms": med["json"]}
            rows.append(row)
            print(f"{name:7s} {b:5d} {row['run_ms']:8.2f} {row['linear_ms']:10.2f} {row['rest_ms']:8.2f} "
                  f"{row['json_ms']:8.2f}")
        d, e, p = (next(r for r in rows if r["model"] == m and r["batch"] == b) for m in ("dense", "eager", "pruned"))
        print(f"batch {b}: dense/pruned run time {d['run_ms'] / p['run_ms']:.2f}x, "
              f"Linear layers {d['linear_ms'] / p['linear_ms']:.2f}x; eager/best dense run time "
              f"{e['run_ms'] / d['run_ms']:.2f}x")
    layers = layer_table(engines, front, sentences, args.layer_batch, args.rounds) if args.layer_batch else []
    if args.json:
        Path(args.json).write_text(json.dumps({"parse_ms": parse_ms, "rows": rows, "quality": quality,
                                               "threads": args.threads, "layers": layers}, indent=2))


def layer_table(engines, front, sentences, batch: int, rounds: int) -> list:
    """Each Linear of the pruned model against the same layer of the dense model on the best dense
    path and on torch eager, on the input it gets from ``batch`` short sentences (hooks capture it)."""
    import torch

    prepared = [front.parse("embeddings", {"input": s}) for s in sentences[:batch]]
    inputs: dict = {}
    modules = {name: dict(e.model.named_modules()) for name, e in engines.items()}

    def keep(name):
        def hook(mod, args, out):  # (returns None: a hook's return value would replace the output)
            inputs.setdefault(name, args[0].detach().clone())
        return hook

    handles = [m.register_forward_hook(keep(n))
               for n, m in modules["pruned"].items() if n.startswith("encoder.") and hasattr(m, "in_features")]
    engines["pruned"].run(prepared)
    for h in handles:
        h.remove()
    samples = {(n, k): [] for n in inputs for k in engines}
    with torch.inference_mode():
        for _ in range(rounds):
            for n, x in inputs.items():
                for k in engines:  # interleaved per layer
                    mod = modules[k][n]
                    mod(x)
                    for _ in range(10):
                        t0 = time.perf_counter()
                        mod(x)
                        samples[(n, k)].append(time.perf_counter() - t0)
    table = []
    print(f"\nLinear layers at the served shape ({batch} sentences: input {tuple(next(iter(inputs.values())).shape)})")
    print(f"{'layer':42s} {'format':10s} {'best ms':>8s} {'eager ms':>8s} {'sparse ms':>9s} {'best/sparse':>11s}")
    for n in inputs:
        med = {k: statistics.median(samples[(n, k)]) * 1e3 for k in engines}
        fmt = getattr(modules["pruned"][n], "format", "dense")
        table.append({"layer": n, "format": fmt, "best_ms": med["dense"], "eager_ms": med["eager"],
                      "sparse_ms": med["pruned"]})
        print(f"{n:42s} {fmt:10s} {med['dense']:8.3f} {med['eager']:8.3f} {med['pruned']:9.3f} "
              f"{med['dense'] / med['pruned']:10.2f}x")
    tot = {k: sum(r[k] for r in table) for k in ("best_ms", "eager_ms", "sparse_ms")}
    print(f"{'all':53s} {tot['best_ms']:8.3f} {tot['eager_ms']:8.3f} {tot['sparse_ms']:9.3f} "
          f"{tot['best_ms'] / tot['sparse_ms']:10.2f}x")
    return table


if __name__ == "__main__":
    main()
