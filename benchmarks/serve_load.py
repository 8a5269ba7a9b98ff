"""Load test: dense vs pruned all-MiniLM-L6-v2 behind the same `sparsert serve`, with locust.

Builds (once, into --workdir) the dense MiniLM and a pruned, sparsified one as sparsert files
(default: SparseGPT one-shot, 70% unstructured, which keeps quality; `format="auto"` times each
layer on --example-batch of the test's short sentences with one worker's threads: the shape the
server's workers run, as the mean batch printed for each run shows; `--target-speedup X` instead
lets the planner prune to X times the best dense path at that shape), serves each with `sparsert serve` on a free loopback port (127.0.0.1 only; one server at a
time) and drives it with locust headless (closed loop, short sentences, POST /v1/embeddings) at each
concurrency, alternating dense and pruned rounds. Reports the pruned model's embedding
cosine to the dense one on held-out sentences (what the speed costs), requests/s, p50/p95/p99
latency (ms) and failures; `--overload N` times the 503s of N simultaneous requests;
`--ray --replicas N` serves through Ray Serve (N replicas, one thread each) instead of LitServe;
`--models pruned` runs one server only (default: dense on the best dense path, the same dense file on
torch eager, and pruned; the ratio is against the faster dense server). The soak (every answer checked, RSS, overload latency)
is benchmarks/serve_soak.py.

    python benchmarks/serve_load.py [--seconds 20] [--concurrency 1 8 32] [--sparsity 0.7] [--reconstruct]
                                    [--target-speedup 2 [--recover-minutes 4]]
                                    [--importance sparsegpt] [--pattern unstructured] [--example-batch 2]
                                    [--rounds 1] [--ray [--replicas 2]] [--overload N]
                                    [--models dense eager pruned] [--json out.json]

Every run is bounded by --seconds (locust -t) and loopback only. Both servers run the same
`sparsert serve` (dense layers on sparsert's best dense path, workers niced below the HTTP process).
Numbers from a shared or busy machine are not comparable with an idle one's; on one, only the
pruned/dense ratio of interleaved rounds (--rounds 3 or more) means something.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # sparsert from this checkout; the serving tests' Server helper
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # for servers


def _files(workdir: Path, tag: str) -> tuple[Path, Path, Path]:
    """The dense file, the pruned file named by ``tag`` and the pruned file's quality JSON."""
    pruned_file = workdir / f"minilm-{tag}.sparsert"
    return workdir / "minilm-dense.sparsert", pruned_file, pruned_file.with_suffix(".quality.json")


def _served_example(workdir: Path, tokenizer, example_batch: int) -> dict:
    """``example_batch`` of the load test's short sentences as one padded batch: the server's shape."""
    from sparsert.models import minilm

    served = short_sentences(workdir / "sentences.txt").read_text(encoding="utf-8").splitlines()[:example_batch]
    return dict(minilm.tokenize(tokenizer, served, batch_size=example_batch)[0])


def _heldout_cosine(model, dense, tokenizer) -> dict:
    """Embedding cosine of ``model`` to ``dense`` on 200 held-out sentences (mean, min)."""
    import torch

    from sparsert.models import minilm

    held = minilm.heldout_sentences(200)
    with torch.no_grad():
        cos = (minilm.embed(model, tokenizer, held) * minilm.embed(dense, tokenizer, held)).sum(-1)
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(), "heldout": len(held)}


def build_files(workdir: Path, sparsity: float, pattern: str, fmt: str, refit: bool,
                importance: str = "sparsegpt", example_batch: int = 2, threads: int = 1) -> tuple[Path, Path, dict]:
    """The dense and the pruned MiniLM files, and the quality the pruning cost (embedding cosine to the
    dense model on held-out sentences, disjoint from the calibration ones).

    ``format="auto"`` times each layer's formats on what the server runs: ``example_batch`` of the
    load test's short sentences padded to the longest (e.g. 8 x 19 tokens), not long calibration text,
    with one server worker's ``threads``."""
    import torch

    import sparsert
    from sparsert.models import minilm
    from sparsert.prune import Pruner, reconstruct

    tag = (f"{importance}-{pattern.replace(':', 'of')}-{sparsity:g}{'-refit' if refit else ''}"
           f"-{fmt.replace(':', 'of')}-b{example_batch}-t{threads}")
    dense_file, pruned_file, quality_file = _files(workdir, tag)
    if dense_file.exists() and pruned_file.exists() and quality_file.exists():
        return dense_file, pruned_file, json.loads(quality_file.read_text())
    model, tok = minilm.load()
    sparsert.save(model, dense_file)
    pruned = copy.deepcopy(model)
    calib = minilm.tokenize(tok, minilm.calibration_sentences(128), batch_size=32)
    names = minilm.encoder_linear_names(model)
    # SparseGPT prunes one layer at a time with its update of the kept weights (the quality-keeping
    # one-shot method); wanda scores |w| x |x| and keeps the rest unchanged.
    extra = {"scope": "layer"} if importance == "sparsegpt" else {}
    p = Pruner(pruned, importance=importance, pattern=pattern, sparsity=sparsity, include=names, **extra)
    p.calibrate(calib)
    p.step()
    if refit:
        reconstruct(pruned, model, calib, include=names)
    example = _served_example(workdir, tok, example_batch)
    with torch.no_grad():
        sparse = sparsert.sparsify(pruned, format=fmt, example_inputs=example, threads=threads)
    sparsert.save(sparse, pruned_file)
    quality = {**_heldout_cosine(sparse, model, tok),
               "importance": importance + ("+reconstruct" if refit else ""), "pattern": pattern,
               "sparsity": sparsity, "timed_shape": list(example["input_ids"].shape), "timed_threads": threads}
    quality_file.write_text(json.dumps(quality))
    return dense_file, pruned_file, quality


def build_planned_files(workdir: Path, target: float, importance: str = "sparsegpt", example_batch: int = 2,
                        threads: int = 1, recover_minutes: float = 0.0) -> tuple[Path, Path, dict]:
    """The dense MiniLM file and one pruned by the planner to ``target`` x the best dense path,
    planned and timed at the server's shape (``example_batch`` of the load test's short sentences,
    one worker's ``threads``): :func:`sparsert.planner.workflow.prune_to_speedup`, optionally with
    ``recover_minutes`` of distillation. The quality is measured as :func:`build_files` does."""
    import sparsert
    from sparsert.models import catalogue
    from sparsert.planner.workflow import prune_to_speedup

    tag = f"plan{target:g}-{importance}-r{recover_minutes:g}-b{example_batch}-t{threads}"
    dense_file, pruned_file, quality_file = _files(workdir, tag)
    if dense_file.exists() and pruned_file.exists() and quality_file.exists():
        return dense_file, pruned_file, json.loads(quality_file.read_text())
    wl = catalogue.build("minilm")
    dense = copy.deepcopy(wl.model).eval()
    sparsert.save(dense, dense_file)
    example = _served_example(workdir, wl.tokenizer, example_batch)
    res = prune_to_speedup(wl, target, importance=importance, example_inputs=example, threads=threads,
                           recover_minutes=recover_minutes, output=pruned_file)
    plan = res["plan"]
    quality = {**_heldout_cosine(res["sparse_model"], dense, wl.tokenizer), "importance": importance,
               "target_speedup": target, "plan": plan.label, "predicted_speedup": plan.predicted_speedup,
               "measured_speedup_in_process": res["measured_speedup"],
               "recover_minutes": recover_minutes, "timed_shape": list(example["input_ids"].shape),
               "timed_threads": threads,
               "layers": dict(Counter("dense" if l.pattern is None else f"{l.pattern}@{l.sparsity:g}"
                                      for l in plan.layers))}
    quality_file.write_text(json.dumps(quality))
    return dense_file, pruned_file, quality


def build_files_for(args) -> tuple[Path, Path, dict]:
    """:func:`build_files` (or, with ``--target-speedup``, :func:`build_planned_files`) with this
    script's parsed arguments."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.target_speedup:
        return build_planned_files(workdir, args.target_speedup, args.importance, args.example_batch,
                                   worker_threads(args), args.recover_minutes)
    return build_files(workdir, args.sparsity, args.pattern, args.format, args.reconstruct, args.importance,
                       args.example_batch, worker_threads(args))


def worker_threads(args) -> int:
    """The threads of one model worker (one Ray replica) under ``args``' server arguments."""
    from sparsert.serving import plan_threads

    if args.ray:
        return 1
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--workers", type=int)
    server.add_argument("--threads-per-worker", type=int)
    known, _ = server.parse_known_args(args.server_args.split())
    return plan_threads(known.workers, known.threads_per_worker).threads_per_worker


# the servers a run can load-test: name -> extra `sparsert serve` arguments
MODELS = {"dense": [], "eager": ["--dense-path", "eager"], "pruned": []}


def short_sentences(path: Path) -> Path:
    from sparsert.models import minilm

    short = [s for s in minilm.heldout_sentences() if len(s.split()) <= 12][:200]
    path.write_text("\n".join(short) + "\n", encoding="utf-8")
    return path


def locust_run(url: str, users: int, seconds: int, sentences: Path, out: Path) -> dict:
    prefix = out / f"run{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "serve_locustfile.py"), "--headless", "-u", str(users),
           "-r", str(users), "-t", f"{seconds}s", "--host", url, "--csv", str(prefix), "--only-summary",
           "--stop-timeout", "10", "--loglevel", "WARNING"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # (the server is a child not yet waited for)
    start = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, "SERVE_LOAD_SENTENCES": str(sentences)}, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=seconds + 120)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - start
    # the load generator shares the server's cores: what it took is reported beside the server's numbers
    client_cores = ((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)) / wall
    with open(f"{prefix}_stats.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    return {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
            "rps": float(row["Requests/s"]), "p50_ms": float(row["50%"]), "p95_ms": float(row["95%"]),
            "p99_ms": float(row["99%"]), "client_cores": round(client_cores, 3)}


def server_cpu(server, args) -> dict | None:
    """CPU seconds so far of a LitServe server's model workers and of its HTTP side (Linux /proc);
    ``None`` behind Ray Serve, whose replicas are not the server's own processes, or off Linux."""
    from serving_util import server_cpu_seconds

    if args.ray or not sys.platform.startswith("linux"):
        return None
    return server_cpu_seconds(server.proc.pid)


def batch_totals(url: str) -> tuple:
    """(requests batched, batches run) so far, from the server's /metrics (Prometheus text)."""
    import urllib.request

    try:
        text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode("utf-8")
    except OSError:  # (a server without /metrics: no batch sizes reported)
        return 0.0, 0.0
    values = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(("sparsert_batch_size_sum", "sparsert_batch_size_count"))}
    return values.get("sparsert_batch_size_sum", 0.0), values.get("sparsert_batch_size_count", 0.0)


def overload_probe(server, requests: int, sentences: Path) -> dict:
    """Fires `requests` at once at a server with a small --max-queue: how fast do the refusals come?

    Every connection is opened first, then every request is sent from one thread and the answers are
    read as they come (select): all of them are in flight together, and the time is the server's, not
    that of client threads queueing for the GIL (a pool of urllib threads let some requests start
    after earlier ones were answered, so how many were refused varied from run to run)."""
    import select
    import socket
    from urllib.parse import urlsplit

    text = sentences.read_text(encoding="utf-8").splitlines()[0]
    body = json.dumps({"input": text}).encode()
    url = urlsplit(server.url)
    host, port = url.hostname, url.port
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    socks = [socket.create_connection((host, port), timeout=60) for _ in range(requests)]
    sent: dict = {}
    try:
        for sock in socks:
            sent[sock] = time.perf_counter()
            sock.sendall(head + body)
        answers: dict = {}  # socket -> (status, ms at the status line)
        buffers = {sock: b"" for sock in socks}
        open_ = set(socks)
        deadline = time.monotonic() + 60
        while open_ and time.monotonic() < deadline:
            ready, _, _ = select.select(list(open_), [], [], 1.0)
            for sock in ready:
                data = sock.recv(65536)
                buffers[sock] += data
                if sock not in answers and b"\r\n" in buffers[sock]:
                    answers[sock] = (int(buffers[sock].split(b" ", 2)[1]), (time.perf_counter() - sent[sock]) * 1e3)
                if not data:
                    open_.discard(sock)
    finally:
        for sock in socks:
            sock.close()
    results = [answers.get(sock, (0, None)) for sock in socks]  # 0: no answer within a minute
    refused = sorted(ms for status, ms in results if status in (429, 503))
    return {"requests": requests, "ok": sum(s == 200 for s, _ in results), "refused": len(refused),
            "other": sum(s not in (200, 429, 503) for s, _ in results),
            "refusal_ms_median": refused[len(refused) // 2] if refused else None,
            "refusal_ms_max": refused[-1] if refused else None}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sparsert-serve-load"))
    ap.add_argument("--seconds", type=int, default=20, help="length of each locust run")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--target-speedup", type=float, default=None,
                    help="instead of --sparsity/--pattern: let the planner prune to this speedup over the best dense "
                         "path, timed at the server's shape")
    ap.add_argument("--recover-minutes", type=float, default=0.0,
                    help="with --target-speedup: distil the dense model into the pruned one for this long")
    ap.add_argument("--importance", default="sparsegpt", help="pruning criterion (default sparsegpt; wanda, ...)")
    ap.add_argument("--example-batch", type=int, default=2,
                    help="format='auto' and the planner time layers on this many short sentences in one batch "
                         "(default 2: at concurrency 8 the two workers ran batches of 2.5 sentences on average, "
                         "and a model planned for 2.5x at 8 sentences ran 2.0-2.35x at 1-2; each run prints its "
                         "mean batch)")
    ap.add_argument("--pattern", default="unstructured", help="unstructured, 4x1, 2:4, ...")
    ap.add_argument("--reconstruct", action="store_true", help="refit the kept weights after pruning (quality)")
    ap.add_argument("--format", default="auto", help="sparsify format: auto (timed per layer) or csr, bsr4x1, ...")
    # Default: one single-threaded worker per core. A multi-threaded worker pays an OpenMP barrier per op,
    # and on a machine where the HTTP process (or anything else) competes for the cores each barrier can
    # wait a scheduler time slice; pass e.g. "--workers 1 --threads-per-worker 2" to measure that setup.
    ap.add_argument("--server-args", default=f"--workers {len(os.sched_getaffinity(0))} --threads-per-worker 1 "
                                             "--max-batch-size 8 --batch-timeout-ms 2",
                    help="extra arguments for both servers (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=1, help="dense/pruned rounds (medians are reported)")
    ap.add_argument("--ray", action="store_true", help="serve through Ray Serve instead of LitServe")
    ap.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas, one thread each (default 2)")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                    help="which servers to load-test (default all): dense = the dense file on sparsert's best "
                         "dense path, eager = the same file with --dense-path eager (torch's F.linear, faster "
                         "than the prepacked path at some small shapes), pruned = the pruned file")
    ap.add_argument("--overload", type=int, default=0, metavar="N",
                    help="also fire N requests at once at the pruned model behind --max-queue 4 and time the 503s")
    ap.add_argument("--json", help="also write the results here")
    return ap


def main() -> None:
    args = parser().parse_args()
    from serving_util import Server

    workdir = Path(args.workdir)
    dense_file, pruned_file, quality = build_files_for(args)
    what = (f"planned for {quality['target_speedup']:g}x ({quality['plan']}, predicted "
            f"{quality['predicted_speedup']:.2f}x, {quality['recover_minutes']:g} min recovery)"
            if "target_speedup" in quality else f"{quality['pattern']} {quality['sparsity']:g}")
    print(f"pruned model: {quality['importance']} {what}; embedding cosine to "
          f"dense on {quality['heldout']} held-out sentences: mean {quality['cosine_mean']:.3f}, "
          f"min {quality['cosine_min']:.3f}", flush=True)
    sentences = short_sentences(workdir / "sentences.txt")
    extra = args.server_args.split() + ["--tokenizer", "minilm"]
    if args.ray:  # (--workers does not apply to Ray: each replica is one Ray actor with its threads)
        extra += ["--ray", "--replicas", str(args.replicas), "--threads-per-worker", "1"]
    files = {m: (dense_file if m in ("dense", "eager") else pruned_file, MODELS[m]) for m in args.models}
    rows = []
    # One server at a time: an idle LitServe worker still polls its queue, which would tax the other.
    # Rounds alternate dense and pruned, so slow drifts of a shared machine hit both alike.
    for rnd in range(args.rounds):
        for name, (path, model_args) in files.items():
            server = Server(path, *extra, *model_args, "--name", name)
            try:
                server.wait_ready(600)
                for users in args.concurrency:
                    before, cpu_before = batch_totals(server.url), server_cpu(server, args)
                    r = locust_run(server.url, users, args.seconds, sentences, workdir)
                    after, cpu_after = batch_totals(server.url), server_cpu(server, args)
                    # the batches the workers really ran: the shape to plan for (--example-batch)
                    batches = after[1] - before[1]
                    r["mean_batch"] = round((after[0] - before[0]) / batches, 2) if batches else None
                    # where the cores went: the model workers against the HTTP side, per request
                    r["cpu_ms_per_request"] = {
                        role: round((cpu_after[role] - cpu_before[role]) / r["requests"] * 1e3, 3)
                        for role in cpu_after} if cpu_after and r["requests"] else None
                    rows.append({"model": name, "round": rnd, "concurrency": users, **r})
                    cpu = r["cpu_ms_per_request"]
                    print(f"{name:6s} c={users:<3d} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:6.0f} ms  "
                          f"p95 {r['p95_ms']:6.0f} ms  p99 {r['p99_ms']:6.0f} ms  "
                          f"requests {r['requests']}  failures {r['failures']}  "
                          f"load generator {r['client_cores']:.2f} cores  mean batch {r['mean_batch']}"
                          + (f"  CPU per request: workers {cpu['workers']:.2f} ms, HTTP {cpu['http']:.2f} ms"
                             if cpu else ""), flush=True)
            finally:
                server.stop()
    overload = None
    if args.overload:
        server = Server(pruned_file, *extra, "--max-queue", "4")
        try:
            server.wait_ready(600)
            overload = overload_probe(server, args.overload, sentences)
            print(f"overload: {overload}")
        finally:
            server.stop()
    import statistics

    dense_runs = [m for m in ("dense", "eager") if m in files]
    for users in args.concurrency if "pruned" in files and dense_runs else []:
        med = {m: {k: statistics.median(r[k] for r in rows if r["model"] == m and r["concurrency"] == users)
                   for k in ("rps", "p99_ms")} for m in files}
        best = max(dense_runs, key=lambda m: med[m]["rps"])  # the target is against the faster dense server
        print(f"c={users}: pruned/dense requests/s = {med['pruned']['rps'] / med[best]['rps']:.2f}x against the "
              f"faster dense server ({best}; medians of {args.rounds} round(s); p99 {best} "
              f"{med[best]['p99_ms']:.0f} ms, pruned {med['pruned']['p99_ms']:.0f} ms)"
              + "".join(f"; vs {m} {med['pruned']['rps'] / med[m]['rps']:.2f}x" for m in dense_runs if m != best))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "overload": overload, "quality": quality, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
