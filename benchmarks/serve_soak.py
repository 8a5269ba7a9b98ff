"""Soak test: one `sparsert serve` under steady load for a bounded time, every answer checked.

Serves a MiniLM file (default: the pruned one serve_load.py builds, cached in --workdir) with
`sparsert serve` on a free loopback port (127.0.0.1 only) and, for --minutes (default 10), keeps
--concurrency closed-loop clients posting one short sentence each to /v1/embeddings. Every answer
is checked against the offline model (sparsert.load of the same file, masked-mean + L2 norm,
max abs diff <= 1e-5). Every --burst-every seconds a burst of --burst simultaneous requests
overflows the server's queue (--max-queue), sent from a separate process on connections opened
beforehand: the refusals (429/503) are timed from send to answer.

Reports: requests, lost (no answer, a timeout, a 5xx other than 503, a connection error) and
wrong (a 200 whose embedding differs, or any other status) responses, refusals, the server's
RSS (all its processes) after a warm-up and at the end, and the latency of refused requests.
Targets (issue 16): 0 lost, 0 wrong, RSS growth <= 5%, refusals within 50 ms. Exit status 1
when one is missed. Stops by itself: the clients stop at the deadline, the server gets SIGTERM.

    python benchmarks/serve_soak.py [--minutes 10] [--concurrency 8] [--burst 64] [--burst-every 30]
                                    [--max-queue 16] [--file FILE --tokenizer minilm] [--json out.json]

Numbers from a shared or busy machine are not comparable with an idle one's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(HERE)]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

TOLERANCE = 1e-5
RSS_GROWTH_LIMIT = 0.05
REFUSAL_LIMIT_MS = 50.0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


class Tally:
    """Counts shared by the client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ok = self.wrong = self.lost = self.refused = 0
        self.ok_ms: list[float] = []
        self.refused_ms: list[float] = []
        self.samples: list[str] = []  # the first few wrong or lost answers, to say what went wrong

    def note(self, kind: str, ms: float, detail: str = "") -> None:
        with self.lock:
            setattr(self, kind, getattr(self, kind) + 1)
            if kind == "ok":
                self.ok_ms.append(ms)
            elif kind == "refused":
                self.refused_ms.append(ms)
            elif len(self.samples) < 10:
                self.samples.append(f"{kind}: {detail}")


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes, float]:
    t0 = time.perf_counter()
    conn.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    raw = r.read()
    return r.status, raw, (time.perf_counter() - t0) * 1e3


def judge(tally: Tally, status: int, raw: bytes, ms: float, want) -> None:
    if status == 200:
        try:
            data = json.loads(raw)["data"]
            got = data[0]["embedding"]
            diff = max(abs(a - b) for a, b in zip(got, want)) if len(data) == 1 and len(got) == len(want) else None
        except (ValueError, KeyError, IndexError, TypeError) as e:
            tally.note("wrong", ms, f"unreadable 200 answer: {e}")
            return
        if diff is None or diff > TOLERANCE:
            tally.note("wrong", ms, f"embedding differs from the offline model (max abs diff {diff})")
        else:
            tally.note("ok", ms)
    elif status in (429, 503):
        tally.note("refused", ms)
    elif status >= 500:
        tally.note("lost", ms, f"HTTP {status}: {raw[:200]!r}")
    else:
        tally.note("wrong", ms, f"HTTP {status}: {raw[:200]!r}")


def client(port: int, bodies: list[bytes], refs, start: int, stop_at: float, tally: Tally, timeout: float) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    i = start
    while time.monotonic() < stop_at:
        k = i % len(bodies)
        i += 1
        try:
            status, raw, ms = post(conn, bodies[k])
        except (OSError, http.client.HTTPException) as e:
            tally.note("lost", 0.0, f"{type(e).__name__}: {e}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            continue
        judge(tally, status, raw, ms, refs[k])
        if status in (429, 503):
            time.sleep(0.05)  # a refused client backs off a little, as a real one would
    conn.close()


def burst(port: int, n: int, bodies: list[bytes], refs, tally: Tally, timeout: float) -> None:
    """`n` requests sent at the same instant on connections opened beforehand."""
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=timeout) for _ in range(n)]
    for c in conns:
        c.connect()
    go = threading.Barrier(n)

    def one(j: int):
        go.wait()
        try:
            status, raw, ms = post(conns[j], bodies[j % len(bodies)])
        except (OSError, http.client.HTTPException) as e:
            tally.note("lost", 0.0, f"burst: {type(e).__name__}: {e}")
            return
        judge(tally, status, raw, ms, refs[j % len(bodies)])

    threads = [threading.Thread(target=one, args=(j,)) for j in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.close()


def _burst_in_process(port: int, n: int, bodies: list[bytes], refs, timeout: float, out) -> None:
    tally = Tally()
    burst(port, n, bodies, refs, tally, timeout)
    out.put({k: getattr(tally, k) for k in ("ok", "wrong", "lost", "refused", "ok_ms", "refused_ms", "samples")})


def burst_apart(port: int, n: int, bodies: list[bytes], refs, tally: Tally, timeout: float) -> None:
    """A burst from its own process, so the steady clients' threads (and their GIL) add nothing
    to the refusal times it measures."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_burst_in_process, args=(port, n, bodies[:n], refs[:n], timeout, out))
    proc.start()
    got = out.get(timeout=timeout + 60)
    proc.join(10)
    with tally.lock:
        for k in ("ok", "wrong", "lost", "refused"):
            setattr(tally, k, getattr(tally, k) + got[k])
        tally.ok_ms += got["ok_ms"]
        tally.refused_ms += got["refused_ms"]
        tally.samples += got["samples"][:max(0, 10 - len(tally.samples))]


def run_load(port, bodies, refs, seconds, concurrency, tally, timeout, burst_n=0, burst_every=0.0, rss=None):
    stop_at = time.monotonic() + seconds
    threads = [threading.Thread(target=client, args=(port, bodies, refs, 37 * c, stop_at, tally, timeout))
               for c in range(concurrency)]
    for t in threads:
        t.start()
    bursts = 0
    next_burst = time.monotonic() + burst_every / 2 if burst_n else float("inf")
    next_sample = time.monotonic()
    while time.monotonic() < stop_at:
        now = time.monotonic()
        if rss is not None and now >= next_sample:
            rss()
            next_sample = now + 10.0
        if now >= next_burst and now + 5.0 < stop_at:
            burst_apart(port, burst_n, bodies, refs, tally, timeout)
            bursts += 1
            next_burst = now + burst_every
        time.sleep(0.05)
    for t in threads:
        t.join(timeout + 5.0)
    return bursts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default 10)")
    ap.add_argument("--warmup-seconds", type=float, default=20.0,
                    help="load before the first RSS reading, so allocator pools have settled (default 20)")
    ap.add_argument("--concurrency", type=int, default=8, help="closed-loop clients (default 8)")
    ap.add_argument("--burst", type=int, default=64, help="simultaneous requests per overload burst (0: none)")
    ap.add_argument("--burst-every", type=float, default=30.0, help="seconds between bursts (default 30)")
    ap.add_argument("--max-queue", type=int, default=16, help="the server's --max-queue (default 16)")
    ap.add_argument("--timeout", type=float, default=30.0, help="client timeout per request, s (a timeout is lost)")
    ap.add_argument("--file", help="a MiniLM-style sparsert file (default: serve_load.py's pruned MiniLM)")
    ap.add_argument("--tokenizer", default="minilm", help="its tokenizer (default: minilm)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sparsert-serve-load"))
    ap.add_argument("--server-args", default=f"--workers {len(os.sched_getaffinity(0))} --threads-per-worker 1 "
                                             "--max-batch-size 8 --batch-timeout-ms 2",
                    help="extra arguments for the server (default: %(default)s)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    import psutil

    import sparsert
    from serve_load import build_files_for, parser, short_sentences
    from serving_util import Server
    from sparsert.models import minilm
    from sparsert.serving import load_tokenizer
    from sparsert.serving.engine import _resolve_tokenizer

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # (the default: serve_load.py's default pruned model, timed for this server's worker threads)
    model_file = Path(args.file) if args.file else \
        build_files_for(parser().parse_args(["--workdir", str(workdir), "--server-args", args.server_args]))[1]
    texts = short_sentences(workdir / "sentences.txt").read_text(encoding="utf-8").splitlines()
    tok = load_tokenizer(_resolve_tokenizer(args.tokenizer, model_file))
    refs = minilm.embed(sparsert.load(model_file), tok, texts).tolist()  # the offline model's answers
    bodies = [json.dumps({"input": t}).encode() for t in texts]
    print(f"soak: {model_file.name}, {len(texts)} sentences, {args.minutes:g} min at concurrency "
          f"{args.concurrency}, a burst of {args.burst} every {args.burst_every:g} s, --max-queue {args.max_queue}",
          flush=True)

    server = Server(model_file, *args.server_args.split(), "--tokenizer", args.tokenizer,
                    "--max-queue", str(args.max_queue), "--name", "soak")
    rss_samples: list[int] = []

    def tree_rss() -> int:
        proc = psutil.Process(server.proc.pid)
        total = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
        rss_samples.append(total)
        return total

    try:
        server.wait_ready(600)
        warm = Tally()
        run_load(server.port, bodies, refs, args.warmup_seconds, args.concurrency, warm, args.timeout)
        rss_before = tree_rss()
        tally = Tally()
        t0 = time.monotonic()
        bursts = run_load(server.port, bodies, refs, args.minutes * 60, args.concurrency, tally, args.timeout,
                          args.burst, args.burst_every, tree_rss)
        elapsed = time.monotonic() - t0
        rss_after = tree_rss()
    finally:
        exit_code = server.stop()
    total = tally.ok + tally.wrong + tally.lost + tally.refused
    growth = rss_after / rss_before - 1
    result = {
        "file": str(model_file), "minutes": args.minutes, "seconds": round(elapsed, 1),
        "concurrency": args.concurrency, "requests": total, "ok": tally.ok, "wrong": tally.wrong,
        "lost": tally.lost, "refused": tally.refused, "warmup_requests": warm.ok + warm.wrong + warm.lost,
        "requests_per_s": round(total / elapsed, 1),
        "ok_ms_p50": percentile(tally.ok_ms, 50), "ok_ms_p99": percentile(tally.ok_ms, 99),
        "bursts": bursts, "burst": args.burst,
        "refused_ms_median": percentile(tally.refused_ms, 50), "refused_ms_p99": percentile(tally.refused_ms, 99),
        "refused_ms_max": max(tally.refused_ms) if tally.refused_ms else None,
        "rss_before_mib": round(rss_before / 2**20, 1), "rss_after_mib": round(rss_after / 2**20, 1),
        "rss_max_mib": round(max(rss_samples) / 2**20, 1), "rss_growth": round(growth, 4),
        "server_exit": exit_code, "problems": tally.samples, "args": vars(args),
    }
    checks = {
        "no lost or wrong responses": tally.lost == 0 and tally.wrong == 0,
        f"RSS growth <= {RSS_GROWTH_LIMIT:.0%}": growth <= RSS_GROWTH_LIMIT,
        f"refusals within {REFUSAL_LIMIT_MS:g} ms": bool(tally.refused_ms) and max(tally.refused_ms) <= REFUSAL_LIMIT_MS,
        "server shut down cleanly": exit_code == 0,
    }
    if not args.burst:
        checks.pop(f"refusals within {REFUSAL_LIMIT_MS:g} ms")
    result["checks"] = checks
    ms = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    print(f"requests {total} in {elapsed:.0f} s ({result['requests_per_s']}/s): ok {tally.ok}, wrong {tally.wrong}, "
          f"lost {tally.lost}, refused {tally.refused}; ok latency p50 {ms(result['ok_ms_p50'])} ms, "
          f"p99 {ms(result['ok_ms_p99'])} ms")
    print(f"overload: {bursts} bursts of {args.burst}; refused answered in median {ms(result['refused_ms_median'])} ms, "
          f"p99 {ms(result['refused_ms_p99'])} ms, max {ms(result['refused_ms_max'])} ms")
    print(f"RSS (server, all processes): {result['rss_before_mib']} MiB after warm-up -> {result['rss_after_mib']} MiB "
          f"at the end ({growth:+.2%}; max {result['rss_max_mib']} MiB)")
    for line in tally.samples:
        print("  " + line)
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'MISS'}: {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
