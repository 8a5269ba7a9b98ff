"""sparsert.serving: the engine in-process, and real LitServe servers on free loopback ports.

Two servers start once per module (a tiny sparse BERT with its tokenizer, and the digits MLP
pruned 4x1 with two workers); every bad-input case is a real HTTP request checked for its
status code and message.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
import threading
import time

import pytest
import torch

import sparsert
from sparsert.serving import Engine, RequestError, plan_threads
from serving_util import (Server, process_tree_stats, sentences, server_cpu_seconds, server_processes,
                          tiny_bert_file)

litserve = pytest.importorskip("litserve", reason="LitServe is not installed: pip install 'sparsert[serve]'")
pytest.importorskip("transformers", reason="the serving tests' BERT needs transformers")


def offline_embeddings(model_file, texts):
    """What the offline sparse model gives: masked-mean, L2-normalised last hidden state."""
    from sparsert.models import minilm
    from sparsert.serving import load_tokenizer, tokenizer_path_for

    model = sparsert.load(model_file)
    tok = load_tokenizer(str(tokenizer_path_for(model_file)))
    return minilm.embed(model, tok, texts)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serving")
    from sparsert.cli import main

    mlp = folder / "digits-mlp.sparsert"
    assert main(["prune", "digits-mlp", "--sparsity", "0.75", "--pattern", "4x1", "-o", str(mlp), "--json"]) == 0
    return {"bert": tiny_bert_file(folder), "mlp": mlp, "folder": folder}


MLP_INPUT = {"inputs": {"x": {"shape": [1, 64], "dtype": "float32", "data": [0.0] * 64}}}


@pytest.fixture(scope="module")
def servers(files):
    # the BERT's workers run at the HTTP process's priority and on the best dense path (the default);
    # the MLP's are niced by the default and run its dense layers on torch eager
    bert = Server(files["bert"], "--workers", "1", "--threads-per-worker", "1", "--max-batch-size", "4",
                  "--batch-timeout-ms", "5", "--max-body-bytes", "4096", "--max-tokens", "16", "--worker-nice", "0")
    # the MLP waits up to 1.5 s to fill a batch of 64: requests stay queued, so a queue of 2 overflows on cue
    mlp = Server(files["mlp"], "--workers", "2", "--threads-per-worker", "1", "--max-batch-size", "64",
                 "--batch-timeout-ms", "1500", "--max-queue", "2", "--dense-path", "eager")
    try:
        bert.wait_ready()
        mlp.wait_ready()
        yield {"bert": bert, "mlp": mlp}
        # graceful shutdown: a request still waiting for its batch when SIGTERM arrives is answered
        in_flight = []
        t = threading.Thread(target=lambda: in_flight.append(mlp.post("/predict", MLP_INPUT)))
        t.start()
        time.sleep(0.3)
    finally:
        codes = {name: s.stop() for name, s in (("bert", bert), ("mlp", mlp))}
    t.join()
    assert codes == {"bert": 0, "mlp": 0}, f"servers did not shut down cleanly: {codes}"
    assert in_flight and in_flight[0][0] == 200, f"the in-flight request was not drained: {in_flight}"


# ---------------------------------------------------------------------------
# Engine, in-process


def test_engine_embeddings_equal_offline_model(files):
    engine = Engine(files["bert"])
    texts = sentences(7)
    answer = engine.handle("embeddings", {"input": texts})
    got = torch.tensor([d["embedding"] for d in answer["data"]])
    assert [d["index"] for d in answer["data"]] == list(range(7))
    assert (got - offline_embeddings(files["bert"], texts)).abs().max().item() <= 1e-5
    assert answer["usage"]["prompt_tokens"] == sum(len(engine.frontend.tokenizer(t)["input_ids"]) for t in texts)


def test_engine_streamlines_encoders_and_answers_as_hugging_face_does(files):
    from sparsert.convert.streamline import StreamlinedEncoder

    lean, hf = Engine(files["bert"]), Engine(files["bert"], forward="hf")
    assert isinstance(lean.model, StreamlinedEncoder) and not isinstance(hf.model, StreamlinedEncoder)
    texts = sentences(6, seed=3)
    got, want = ([d["embedding"] for d in e.handle("embeddings", {"input": texts})["data"]] for e in (lean, hf))
    assert (torch.tensor(got) - torch.tensor(want)).abs().max().item() <= 1e-5
    assert isinstance(Engine(files["mlp"]).model, torch.nn.Module)  # not an encoder: runs as it is
    with pytest.raises(ValueError, match="forward must be"):
        Engine(files["bert"], forward="onnx")


def test_engine_batches_requests_like_single_ones(files):
    engine = Engine(files["bert"], max_batch_rows=3)
    texts = sentences(5, seed=1)
    prepared = [engine.frontend.embeddings({"input": texts[:2]}), engine.frontend.embeddings({"input": texts[2:]})]
    batched = engine.run(prepared)
    alone = [engine.run([p])[0] for p in prepared]
    for b, a in zip(batched, alone):
        diff = torch.tensor([d["embedding"] for d in b["data"]]) - torch.tensor([d["embedding"] for d in a["data"]])
        assert diff.abs().max().item() <= 1e-5


def test_engine_predict_matches_module(files):
    model = sparsert.load(files["mlp"])
    engine = Engine(files["mlp"])
    x = torch.randn(3, 64)
    out = engine.handle("predict", {"inputs": {"x": {"shape": [3, 64], "dtype": "float32",
                                                     "data": x.reshape(-1).tolist()}}})["outputs"]["output"]
    with torch.no_grad():
        want = model(x)
    assert out["shape"] == [3, 10]
    assert (torch.tensor(out["data"]).reshape(3, 10) - want).abs().max().item() <= 1e-5


def test_engine_runs_plain_linears_on_the_best_dense_path():
    from sparsert.nn import DenseLinear

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 5)).eval()
    best, eager = Engine(module), Engine(module, dense_path="eager")
    assert [type(m) for m in best.model if not isinstance(m, torch.nn.ReLU)] == [DenseLinear, DenseLinear]
    assert [type(m) for m in eager.model if not isinstance(m, torch.nn.ReLU)] == [torch.nn.Linear] * 2
    assert all(type(m) is not DenseLinear for m in module)  # the caller's module is left as it was
    x = torch.randn(7, 24)
    tensor = {"shape": [7, 24], "dtype": "float32", "data": x.reshape(-1).tolist()}
    body = {"inputs": {best.spec.inputs[0].name: tensor}}
    with torch.no_grad():
        want = module(x)
    for engine in (best, eager):
        out = engine.handle("predict", body)["outputs"]["output"]
        assert (torch.tensor(out["data"]).reshape(7, 5) - want).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="dense_path"):
        Engine(module, dense_path="fast")
    # warm-up tunes each dense layer at the worker's token counts (eager: nothing to tune)
    assert all(m.tuned_paths == {} for m in best.model if isinstance(m, DenseLinear))
    best.warmup()
    eager.warmup()
    from sparsert.serving.engine import DENSE_TUNE_ROWS
    assert [sorted(m.tuned_paths) for m in best.model if isinstance(m, DenseLinear)] == [sorted(DENSE_TUNE_ROWS)] * 2
    out = best.handle("predict", body)["outputs"]["output"]
    assert (torch.tensor(out["data"]).reshape(7, 5) - want).abs().max().item() <= 1e-5


def test_engine_refuses_a_corrupt_file_with_the_loaders_error(files, tmp_path):
    bad = tmp_path / "bad.sparsert"
    data = bytearray(files["bert"].read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError) as e:
        sparsert.load(bad)
    with pytest.raises(ValueError, match="bad.sparsert"):
        Engine(bad)
    assert str(e.value)


def test_engine_request_errors_carry_status(files):
    engine = Engine(files["mlp"])
    with pytest.raises(RequestError) as e:
        engine.handle("embeddings", {"input": "hi"})
    assert e.value.status == 404 and "/predict" in e.value.message


@pytest.mark.parametrize("workers,threads,cores,want", [
    (None, None, 4, (1, 4)), (2, None, 4, (2, 2)), (None, 1, 4, (4, 1)), (3, None, 4, (3, 1)), (1, 1, 1, (1, 1)),
])
def test_thread_plan_never_oversubscribes(workers, threads, cores, want):
    plan = plan_threads(workers, threads, cores=list(range(cores)))
    assert (plan.workers, plan.threads_per_worker) == want
    groups = [plan.cores_for(w) for w in range(plan.workers)]
    assert all(len(g) == plan.threads_per_worker for g in groups)
    assert len(set().union(*groups)) == plan.workers * plan.threads_per_worker  # disjoint


def test_thread_plan_rejects_oversubscription():
    with pytest.raises(ValueError, match="oversubscribe"):
        plan_threads(2, 3, cores=[0, 1, 2, 3])


# ---------------------------------------------------------------------------
# Real servers


def test_serve_refuses_to_start_on_a_corrupt_file(files, tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "corrupt.sparsert"
    bad.write_bytes(files["bert"].read_bytes()[: 1000])
    with pytest.raises(ValueError) as loader:
        sparsert.load(bad)
    r = subprocess.run([sys.executable, "-m", "sparsert", "serve", str(bad), "--port", "9"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == f"sparsert serve: error: {str(loader.value).splitlines()[0]}"


def test_serve_refuses_oversubscribed_threads(files):
    import subprocess
    import sys

    from sparsert.serving.threads import usable_cores

    n = len(usable_cores())
    r = subprocess.run([sys.executable, "-m", "sparsert", "serve", str(files["mlp"]), "--workers", str(n + 1),
                        "--threads-per-worker", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "oversubscribe" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--worker-nice", "20"], "--worker-nice"), (["--worker-nice", "-1"], "--worker-nice"),
    (["--dense-path", "fast"], "--dense-path"),
])
def test_serve_refuses_bad_worker_options(files, args, message):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sparsert", "serve", str(files["mlp"]), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "invalid choice" in r.stderr


def _process_tree_nice(root_pid: int) -> tuple[int, list[int]]:
    """The nice value of ``root_pid`` and those of all its descendants (Linux /proc)."""
    root, tree = process_tree_stats(root_pid)
    return int(root[16]), [int(fields[16]) for fields in tree.values()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process priorities from /proc")
def test_model_workers_run_niced_below_the_http_process(servers):
    root, tree = _process_tree_nice(servers["mlp"].proc.pid)
    if root > 14:
        pytest.skip(f"the tests run at nice {root}: no room below it to check")
    assert sorted(tree).count(min(root + 5, 19)) == 2, (root, tree)  # its 2 workers, at the default --worker-nice 5
    assert all(n in (root, min(root + 5, 19)) for n in tree), (root, tree)
    root, tree = _process_tree_nice(servers["bert"].proc.pid)
    assert tree and all(n == root for n in tree), (root, tree)  # --worker-nice 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_cpu_split_finds_the_model_workers(servers):
    # serve_load reports CPU per request of the workers and of the HTTP side from this split: the
    # workers it finds must be the niced model processes, as many as --workers
    split = server_processes(servers["mlp"].proc.pid)
    root_nice = int(split["http"][servers["mlp"].proc.pid][16])
    if root_nice > 14:
        pytest.skip(f"the tests run at nice {root_nice}: the workers cannot be told apart by priority")
    assert [int(f[16]) for f in split["workers"].values()] == [min(root_nice + 5, 19)] * 2, split
    assert all(int(f[16]) == root_nice for f in split["http"].values()), split
    assert len(server_processes(servers["bert"].proc.pid)["workers"]) == 1
    seconds = server_cpu_seconds(servers["mlp"].proc.pid)
    assert set(seconds) == {"workers", "http"} and seconds["workers"] > 0  # (each worker warmed its model up)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads CPU times from /proc")
def test_an_idle_server_leaves_the_cores_idle(servers):
    # LitServe's own batched loop polled its (Manager) request queue every millisecond: an idle
    # 2-worker server burnt ~0.6 of 2 cores. The blocking loop waits instead.
    time.sleep(0.5)  # let start-up work settle
    before = sum(server_cpu_seconds(servers["mlp"].proc.pid).values())
    time.sleep(2.0)
    used = sum(server_cpu_seconds(servers["mlp"].proc.pid).values()) - before
    assert used < 0.2, f"an idle server used {used:.2f} CPU seconds in 2 s"


class _Transport:
    """What a LitServe loop sends its START messages to."""

    def __init__(self):
        self.sent = []

    def send(self, item, consumer_id):
        self.sent.append((consumer_id, item))


def _blocking_loop(max_batch_size=4, batch_timeout=0.05, request_timeout=30.0, idle_wait=0.05):
    from types import SimpleNamespace

    from sparsert.serving.litserve_app import BlockingBatchLoop

    loop = BlockingBatchLoop()
    loop.IDLE_WAIT_S = idle_wait
    api = SimpleNamespace(max_batch_size=max_batch_size, batch_timeout=batch_timeout, request_timeout=request_timeout)
    return loop, api


def test_blocking_batch_loop_takes_a_full_batch_of_what_is_queued():
    import queue

    loop, api = _blocking_loop(max_batch_size=4, batch_timeout=5.0)
    q = queue.Queue()
    for i in range(6):
        q.put((0, f"u{i}", time.monotonic(), i))
    t0 = time.monotonic()
    payloads, timed_out = loop.get_batch_requests(api, q, _Transport())
    assert time.monotonic() - t0 < 1.0  # a full batch does not wait out batch_timeout
    assert payloads == [(0, f"u{i}", i) for i in range(4)] and timed_out == []
    payloads, _ = loop.get_batch_requests(api, q, _Transport())
    assert [p[2] for p in payloads] == [4, 5]  # the rest, in order, after batch_timeout


def test_blocking_batch_loop_waits_batch_timeout_after_the_first_request_only():
    import queue

    loop, api = _blocking_loop(max_batch_size=8, batch_timeout=0.2, idle_wait=5.0)
    q = queue.Queue()
    threading.Timer(0.3, lambda: q.put((0, "first", time.monotonic(), "a"))).start()
    threading.Timer(0.4, lambda: q.put((0, "second", time.monotonic(), "b"))).start()
    threading.Timer(1.0, lambda: q.put((0, "late", time.monotonic(), "c"))).start()
    t0 = time.monotonic()
    payloads, _ = loop.get_batch_requests(api, q, _Transport())
    waited = time.monotonic() - t0
    assert [p[1] for p in payloads] == ["first", "second"]  # "late" comes after the batch closed
    assert 0.45 < waited < 0.95, waited  # first at 0.3 s + 0.2 s of batch_timeout
    assert [p[1] for p in loop.get_batch_requests(api, q, _Transport())[0]] == ["late"]


def test_blocking_batch_loop_idles_separates_stale_requests_and_stops_on_the_sentinel():
    import queue

    from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError

    loop, api = _blocking_loop(batch_timeout=0.0, request_timeout=1.0, idle_wait=0.05)
    q = queue.Queue()
    assert loop.get_batch_requests(api, q, _Transport()) == ([], [])  # nothing came within the idle wait
    q.put((1, "stale", time.monotonic() - 5.0, "x"))
    q.put((1, "fresh", time.monotonic(), "y"))
    assert loop.get_batch_requests(api, q, _Transport()) == ([(1, "fresh", "y")], [(1, "stale")])
    q.put(_SENTINEL_VALUE)
    with pytest.raises(_StopLoopError):
        loop.get_batch_requests(api, q, _Transport())


def test_answer_pipe_transport_delivers_every_answer_in_order_without_a_pool_job_each():
    import asyncio
    import multiprocessing

    from litserve.transport.process_transport import MPQueueTransport

    from sparsert.serving.litserve_app import AnswerPipeTransport

    queues = [multiprocessing.get_context("spawn").Queue() for _ in range(2)]
    transport = AnswerPipeTransport(queues)
    sent = [("u%d" % i, ("answer", i)) for i in range(300)]

    async def receive_all():
        first = await transport.areceive(1)  # starts the reader; the rest arrive while it is busy
        got = [first] + [await transport.areceive(1) for _ in range(len(sent) - 1)]
        assert await transport.areceive(1, timeout=0.05) is None  # nothing more: a timeout is an empty answer
        return got

    def send_later():
        time.sleep(0.05)
        for item in sent:
            queues[1].put(item)

    threading.Thread(target=send_later).start()
    assert asyncio.run(receive_all()) == sent
    assert queues[0].empty()
    transport.close(send_sentinel=True)  # the reader takes the sentinel and ends
    # what a spawned worker unpickles (queues pickle only while spawning): LitServe's own, for sending
    rebuild, args = transport.__reduce__()
    worker_side = rebuild(*args)
    assert type(worker_side) is MPQueueTransport and worker_side._queues is queues


def test_worker_failures_keep_their_status_and_reason():
    import pickle

    from fastapi import HTTPException

    from sparsert.serving.litserve_app import _worker_failure

    assert _worker_failure(HTTPException(504, "Request timed out")) == (504, b"Request timed out")
    assert _worker_failure(pickle.dumps(HTTPException(422, "bad shape"))) == (422, b"bad shape")
    assert _worker_failure(RuntimeError("boom")) == (500, b"server error")
    assert _worker_failure(b"not a pickle") == (500, b"server error")


def test_run_prepared_puts_the_request_on_the_workers_queue_and_returns_its_answer():
    import asyncio
    from types import SimpleNamespace

    from fastapi import HTTPException
    from litserve.utils import LitAPIStatus

    from sparsert.serving.litserve_app import INNER_PATH, PlainQueueLitServer

    answers = {"ok": [b'{"data":[]}', LitAPIStatus.OK],
               "late": [HTTPException(504, "Request timed out"), LitAPIStatus.ERROR]}
    put = []

    class FakeQueue:  # answers as LitServe's answer task would: into response_buffer, then the event
        def put(self, item):
            put.append(item)
            queue_id, uid, _, prepared = item
            buffered = fake.response_buffer[uid]
            buffered.response = answers[prepared["op"]]
            asyncio.get_running_loop().call_soon(buffered.event.set)

    fake = SimpleNamespace(response_buffer={}, _request_ids=iter(range(10)), app=SimpleNamespace(response_queue_id=3),
                           _get_request_queue=lambda path: FakeQueue() if path == INNER_PATH else None)

    async def run(op):
        return await PlainQueueLitServer.run_prepared(fake, {"op": op})

    assert asyncio.run(run("ok")) == (200, b'{"data":[]}')
    assert asyncio.run(run("late")) == (504, b"Request timed out")
    assert [item[0] for item in put] == [3, 3] and len({item[1] for item in put}) == 2  # its answer queue; fresh ids
    assert fake.response_buffer == {}  # nothing left behind


def test_gzip_is_level_one_and_answers_decompress_to_the_plain_ones(servers, files):
    import gzip
    import http.client

    from starlette.middleware.gzip import GZipMiddleware

    from sparsert.serving.litserve_app import build_server

    server = build_server(files["bert"], workers=1, threads_per_worker=1)
    levels = [m.kwargs.get("compresslevel") for m in server.app.user_middleware if m.cls is GZipMiddleware]
    assert levels == [1], server.app.user_middleware

    body = json.dumps({"input": sentences(4, seed=9)}).encode()
    answers = {}
    for encoding in ("gzip", "identity"):
        conn = http.client.HTTPConnection("127.0.0.1", servers["bert"].port, timeout=30)
        conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json", "Accept-Encoding": encoding})
        r = conn.getresponse()
        raw = r.read()
        conn.close()
        assert r.status == 200
        assert r.getheader("Content-Encoding") == ("gzip" if encoding == "gzip" else None)
        answers[encoding] = json.loads(gzip.decompress(raw) if encoding == "gzip" else raw)
    assert answers["gzip"] == answers["identity"]


def test_worker_answers_are_the_bytes_fastapi_would_send():
    from fastapi.responses import JSONResponse

    from sparsert.serving.litserve_app import encode_answer

    answer = {"object": "list", "data": [{"embedding": [0.1, -2.5e-08, 1 / 3], "index": 0}], "model": "näive ✓",
              "usage": {"prompt_tokens": 3}}
    assert encode_answer(answer) == JSONResponse(answer).body
    assert encode_answer({"error": {"status": 422, "message": "x"}}).startswith(b'{"error":')  # what the edge checks
    with pytest.raises(ValueError):
        encode_answer({"x": float("nan")})


def test_health_and_info(servers):
    status, body = servers["bert"].get("/health")
    assert (status, body) == (200, b"ok")


def test_embeddings_equal_offline_sparse_model(servers, files):
    texts = sentences(6, seed=2)
    status, answer = servers["bert"].post("/v1/embeddings", {"input": texts, "model": "tiny-bert"})
    assert status == 200, answer
    assert answer["object"] == "list" and answer["model"] == "tiny-bert"
    got = torch.tensor([d["embedding"] for d in answer["data"]])
    assert got.shape == (6, 32)
    assert (got - offline_embeddings(files["bert"], texts)).abs().max().item() <= 1e-5
    # a single string, and the base64 encoding the OpenAI client asks for by default
    status, one = servers["bert"].post("/v1/embeddings", {"input": texts[0], "encoding_format": "base64"})
    assert status == 200
    vec = torch.tensor(struct.unpack("<32f", base64.b64decode(one["data"][0]["embedding"])))
    assert (vec - got[0]).abs().max().item() <= 1e-5


def test_concurrent_requests_are_batched_and_answered_correctly(servers, files):
    texts = sentences(12, seed=3)
    results: dict[int, tuple] = {}

    def call(i):
        results[i] = servers["bert"].post("/v1/embeddings", {"input": texts[i]})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = offline_embeddings(files["bert"], texts)
    for i, (status, answer) in results.items():
        assert status == 200, answer
        assert (torch.tensor(answer["data"][0]["embedding"]) - want[i]).abs().max().item() <= 1e-5


def test_predict_named_tensors(servers, files):
    x = torch.randn(2, 64)
    status, answer = servers["mlp"].post("/predict", {"inputs": {"x": {"shape": [2, 64], "dtype": "float32",
                                                                         "data": x.reshape(-1).tolist()}}})
    assert status == 200, answer
    out = answer["outputs"]["output"]
    with torch.no_grad():
        want = sparsert.load(files["mlp"])(x)
    assert out["shape"] == [2, 10] and out["dtype"] == "float32"
    assert (torch.tensor(out["data"]).reshape(2, 10) - want).abs().max().item() <= 1e-5


def _ids(n, width=3):
    return {"shape": [n, width], "dtype": "int64", "data": [5] * (n * width)}


BERT_BAD = [
    ("/v1/embeddings", b'{"input": ["hello"', 400, "malformed JSON"),
    ("/v1/embeddings", b"", 400, "empty request body"),
    ("/v1/embeddings", b"[1, 2]", 400, "JSON object"),
    ("/v1/embeddings", {"model": "x"}, 400, "missing field 'input'"),
    ("/v1/embeddings", {"input": []}, 400, "'input' is empty"),
    ("/v1/embeddings", {"input": ["ok", "  "]}, 400, "input 1 is an empty string"),
    ("/v1/embeddings", {"input": [3.5]}, 400, "input 0 must be a string or a list of token ids"),
    ("/v1/embeddings", {"input": " ".join(["hello"] * 30)}, 400, "tokens; the limit is 16"),
    ("/v1/embeddings", {"input": [[2, 99999, 3]]}, 400, "outside the vocabulary"),
    ("/v1/embeddings", {"input": "hi", "encoding_format": "int8"}, 400, "'encoding_format' must be"),
    ("/v1/embeddings", {"input": "hi", "dimensions": 7}, 400, "'dimensions' must be 32"),
    ("/v1/embeddings", {"input": ["word"] * 300}, 400, "at most 256 per request"),
    ("/v1/embeddings", {"input": "x" * 5000}, 413, "over the limit of 4096 bytes"),
    ("/predict", {"inputs": {"input_ids": {"shape": [1, 3], "dtype": "float32", "data": [1, 2, 3]}}}, 400,
     "has dtype 'float32'"),
    ("/predict", {"inputs": {"input_ids": {"shape": [3], "dtype": "int64", "data": [1, 2, 3]}}}, 400,
     "has shape [3]"),
    ("/predict", {"inputs": {"input_ids": {"shape": [0, 3], "dtype": "int64", "data": []}}}, 400, "is empty"),
    ("/predict", {"inputs": {"input_ids": {"shape": [1, 4], "dtype": "int64", "data": [1, 2, 3]}}}, 400,
     "'data' has 3 values but shape [1, 4] needs 4"),
    ("/predict", {"inputs": {"input_ids": _ids(1, 20)}}, 400, "20 tokens per row; the limit is 16"),
    ("/predict", {"inputs": {"attention_mask": _ids(1)}}, 400, "missing input 'input_ids'"),
    ("/predict", {"inputs": {"pixels": _ids(1)}}, 400, "unknown input 'pixels'"),
    ("/predict", {"inputs": {"input_ids": _ids(1), "attention_mask": _ids(2)}}, 400, "different batch sizes"),
    ("/predict", {"x": 1}, 400, "the body must be"),
]


@pytest.mark.parametrize("path,body,status,message", BERT_BAD,
                         ids=[f"{i}-{m.split()[0]}" for i, (_, _, _, m) in enumerate(BERT_BAD)])
def test_bad_input_gets_a_4xx_with_a_reason(servers, path, body, status, message):
    got, answer = servers["bert"].post(path, body)
    assert got == status, answer
    assert message in answer["error"]["message"], answer
    assert answer["error"]["code"] == status and "\n" not in answer["error"]["message"]


MLP_BAD = [
    ("/predict", {"inputs": {"x": {"shape": [1, 63], "dtype": "float32", "data": [0.0] * 63}}}, 400,
     "has shape [1, 63]; this model takes x: float32 [Nx64]"),
    ("/predict", {"inputs": {"x": {"shape": [1, 64], "dtype": "float32", "data": ["a"] * 64}}}, 400,
     "finite numbers only"),
    ("/predict", {"inputs": {"x": {"shape": [1, 64], "dtype": "float32", "data": [0.0] * 63 + [float("nan")]}}},
     400, "finite numbers only"),
    ("/predict", {"inputs": {"x": {"shape": [1, 64], "dtype": "int64", "data": [0] * 64}}}, 400, "has dtype 'int64'"),
    ("/v1/embeddings", {"input": "hello"}, 404, "serves no embeddings"),
]


@pytest.mark.parametrize("path,body,status,message", MLP_BAD, ids=[str(i) for i in range(len(MLP_BAD))])
def test_bad_input_generic_model(servers, path, body, status, message):
    got, answer = servers["mlp"].post(path, json.dumps(body).encode())
    assert got == status, answer
    assert message in answer["error"]["message"], answer


def test_wrong_method_and_internal_route(servers):
    status, body = servers["bert"].get("/v1/embeddings")
    assert status == 405 and b"takes POST" in body
    status, _ = servers["bert"].request("POST", "/_sparsert/run", b"{}")
    assert status == 404


def test_overload_is_answered_with_503(servers):
    results = []

    def call():
        results.append(servers["mlp"].post("/predict", MLP_INPUT))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(s for s, _ in results)
    assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
    rejected = next(a for s, a in results if s == 503)
    assert "overloaded" in rejected["error"]["message"] and "limit 2" in rejected["error"]["message"]


def test_metrics(servers):
    servers["bert"].post("/v1/embeddings", {"input": "hello world"})
    servers["bert"].post("/v1/embeddings", b"{")
    status, raw = servers["bert"].get("/metrics")
    text = raw.decode()
    assert status == 200
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert lines['sparsert_model_info{model="tiny-bert"}'] == "1"
    assert int(lines['sparsert_model_layers{format="csr"}']) == 8  # 2 layers x (fused Q/K/V, out, FFN in, FFN out)
    assert lines["sparsert_threads_per_worker"] == "1" and lines["sparsert_workers"] == "1"
    assert int(lines['sparsert_requests_total{route="/v1/embeddings",code="200"}']) >= 1
    assert int(lines['sparsert_requests_total{route="/v1/embeddings",code="400"}']) >= 1
    assert int(lines["sparsert_request_errors_total"]) >= 1
    assert lines["sparsert_queue_depth"] == "0"
    assert int(lines['sparsert_request_duration_seconds_count{route="/v1/embeddings"}']) >= 2
    assert int(lines['sparsert_batch_size_bucket{le="+Inf"}']) >= 1
    assert float(lines["sparsert_forward_seconds_total"]) > 0


def test_engine_pruned_minilm_equals_offline_sparsified_model(tmp_path):
    """The real all-MiniLM-L6-v2, 80% pruned and sparsified: the engine's embeddings equal the offline model's
    (the HTTP path is the same Engine.run, checked end to end on the tiny BERT above)."""
    from sparsert.models import minilm
    from sparsert.serving import save_tokenizer

    reason = minilm.unavailable_reason()
    if reason:
        pytest.skip(reason)
    model, tok = minilm.load()
    with torch.no_grad():
        for name in minilm.encoder_linear_names(model):
            w = model.get_submodule(name).weight
            w[w.abs() <= w.abs().flatten().kthvalue(int(w.numel() * 0.8)).values] = 0
    sparse = sparsert.sparsify(model, format="csr")
    path = tmp_path / "minilm-80.sparsert"
    sparsert.save(sparse, path)
    save_tokenizer(tok, path)
    engine = Engine(path, threads=1)
    texts = minilm.heldout_sentences(16)
    answer = engine.handle("embeddings", {"input": texts})
    got = torch.tensor([d["embedding"] for d in answer["data"]])
    assert got.shape == (16, 384)
    assert engine.spec.format_mix.get("csr") == 24  # 36 layers, each layer's Q, K and V streamlined into one
    assert (got - minilm.embed(sparse, tok, texts)).abs().max().item() <= 1e-5
