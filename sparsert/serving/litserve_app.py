"""One machine: the engine behind LitServe (dynamic batching, worker processes).

``build_server(...)`` returns a ``litserve.LitServer``; ``serve(...)`` (what
``sparsert serve FILE`` runs) builds and runs it until SIGINT/SIGTERM.

Layout: one HTTP process (uvicorn + :class:`~sparsert.serving.http.ServingMiddleware`,
which validates requests, puts them on the workers' queue and serves ``/metrics``)
and ``workers`` model processes, each loading the file, pinning itself to its own group of
``threads_per_worker`` cores, lowering its own CPU priority by ``worker_nice``
and warming up before ``/health`` says ready.

Why the workers are niced: the HTTP process answers overload (503) before any
model work, but only when it gets a core; on a machine whose cores the workers
keep busy, a worker at equal priority holds the core for its time slice and
the refusal waits behind a running batch. At a lower priority the workers
yield to the HTTP process whenever it has something to do (parse, refuse,
relay), and still get every cycle it leaves.

A causal LM (``/v1/completions``) is served by a streaming API: a worker runs
one request at a time (batch 1, its own KV cache) and streams its chunks, one
JSON object per line, which the middleware relays or joins.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing
import os
import pickle
import signal
import threading
import time
from pathlib import Path
from queue import Empty

from .engine import Engine, EngineSpec
from .http import ServingMiddleware
from .metrics import Metrics
from .threads import DEFAULT_WORKER_NICE, ThreadPlan, plan_threads

__all__ = ["build_server", "serve", "INNER_PATH", "DEFAULT_WORKER_NICE"]

INNER_PATH = "/_sparsert/run"  # where the workers listen; only the middleware may call it


try:
    import litserve as ls
except ImportError:  # pragma: no cover - the message says what to install
    raise ImportError("sparsert serve needs LitServe: pip install 'sparsert[serve]' (or pip install litserve)") \
        from None
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError  # (pinned litserve>=0.2.19; tested)
from litserve.loops.simple_loops import BatchedLoop
from litserve.transport.process_transport import MPQueueTransport
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem
from starlette.middleware.gzip import GZipMiddleware  # (LitServe's FastAPI brings starlette)


class BlockingBatchLoop(BatchedLoop):
    """LitServe's batched loop, without its polling.

    LitServe's batched loop asks its request queue with a 1 ms timeout, again and again, busy or idle.
    With LitServe's own ``multiprocessing.Manager`` queue (every ``get`` a round trip to the manager
    process; :class:`PlainQueueLitServer` now replaces it) an idle 2-worker server kept ~0.6 of 2 cores
    busy (each worker ~0.14, the manager ~0.3), cycles the model and the HTTP process lose under load.
    This loop waits for a batch's first request in one blocking ``get`` (up to 1 s, then an empty
    batch, as LitServe's loop returns), then gathers the rest until the batch is full or
    ``batch_timeout`` has passed since that first request, each in one ``get`` for the time left
    (what is already queued is taken without waiting).
    """

    IDLE_WAIT_S = 1.0

    def get_batch_requests(self, lit_api, request_queue, transport):
        payloads, timed_out = [], []
        apply_timeout = lit_api.request_timeout not in (-1, False)
        deadline = None  # set by the batch's first request
        while len(payloads) < lit_api.max_batch_size:
            try:
                if deadline is None:
                    item = request_queue.get(timeout=self.IDLE_WAIT_S)
                else:
                    left = deadline - time.monotonic()
                    item = request_queue.get(timeout=left) if left > 0 else request_queue.get(block=False)
            except Empty:
                break
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, enqueued_at, x_enc = item
            self.put_response(transport=transport, response_queue_id=response_queue_id, uid=uid, response_data=(),
                              status=LitAPIStatus.START, response_type=LoopResponseType.REGULAR)
            if deadline is None:
                deadline = time.monotonic() + lit_api.batch_timeout
            if apply_timeout and time.monotonic() - enqueued_at > lit_api.request_timeout:
                timed_out.append((response_queue_id, uid))
            else:
                payloads.append((response_queue_id, uid, x_enc))
        return payloads, timed_out


class AnswerPipeTransport(MPQueueTransport):
    """LitServe's queue transport, read by one thread instead of a thread-pool job per answer.

    LitServe receives each answer in the HTTP process with ``asyncio.to_thread(queue.get, timeout=1)``:
    an executor job, a pool thread's wake-up and a future for every answer. Here one daemon thread per
    consumer blocks on its queue, takes whatever else is already queued, and hands the lot to the event
    loop in one ``call_soon_threadsafe``. The workers only send: they unpickle LitServe's plain transport.
    """

    def __init__(self, queues: list):
        super().__init__(None, queues)
        self._inboxes: dict[int, asyncio.Queue] = {}

    def __reduce__(self):
        return (MPQueueTransport, (None, self._queues))

    def _start_reader(self, consumer_id: int) -> asyncio.Queue:
        loop, inbox = asyncio.get_running_loop(), asyncio.Queue()
        source = self._queues[consumer_id]

        def deliver(items):
            for item in items:
                inbox.put_nowait(item)

        def read():
            while not self._closed:
                try:
                    items = [source.get()]
                except (OSError, EOFError, ValueError):  # the pipe closed under it: the process is ending
                    return
                with_more = True
                while with_more and len(items) < 64:
                    try:
                        items.append(source.get_nowait())
                    except Empty:
                        with_more = False
                try:
                    loop.call_soon_threadsafe(deliver, items)
                except RuntimeError:  # the loop has closed: the server is shutting down
                    return

        threading.Thread(target=read, name=f"sparsert-answers-{consumer_id}", daemon=True).start()
        self._inboxes[consumer_id] = inbox
        return inbox

    async def areceive(self, consumer_id: int, timeout: float | None = None, block: bool = True):
        if self._closed:
            raise asyncio.CancelledError("Transport closed")
        inbox = self._inboxes[consumer_id] if consumer_id in self._inboxes else self._start_reader(consumer_id)
        if timeout is None:
            return await inbox.get()  # LitServe's answer task waits here; shutdown cancels it
        try:
            return await asyncio.wait_for(inbox.get(), timeout)
        except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11 on)
            return None


class PlainQueueLitServer(ls.LitServer):
    """A ``LitServer`` with plain ``multiprocessing`` queues, a threaded answer reader, a direct way in
    for prepared requests, and gzip at level 1.

    - Queues: LitServe makes them ``multiprocessing.Manager`` queues: every ``put`` and ``get`` is a round
      trip through the manager process (measured under load: ~25% of a worker's time and ~16% of the HTTP
      process's). A plain queue is a pipe that the processes share. They are made in the ``spawn`` context
      because LitServe spawns its workers (the forked HTTP process inherits them either way).
    - Answers are read by :class:`AnswerPipeTransport`.
    - :meth:`run_prepared` puts a request the middleware has already validated straight on the workers'
      queue, as LitServe's own route handler does, without a second trip through FastAPI (routing, its
      dependency solver, a ``Request``, JSON out and back in).
    - LitServe adds Starlette's ``GZipMiddleware`` at its default level 9: ~230 us of the one HTTP
      process per 8 KB embedding answer, against ~50 us at level 1 for 3% more bytes (4,113 against
      3,972 for 384 floats); level 1 is what HTTP servers use for dynamic answers.
    """

    GZIP_LEVEL = 1

    def __init__(self, *args, **kwargs):
        self._request_ids = itertools.count()
        super().__init__(*args, **kwargs)

    def _register_middleware(self):  # (LitServe calls it from __init__, after adding its GZipMiddleware)
        self.middlewares = [(GZipMiddleware, {**entry[1], "compresslevel": self.GZIP_LEVEL})
                            if isinstance(entry, tuple) and entry[0] is GZipMiddleware else entry
                            for entry in self.middlewares]
        super()._register_middleware()

    def _init_manager(self, num_api_servers: int):
        manager = super()._init_manager(num_api_servers)
        spawn = multiprocessing.get_context("spawn")
        for api_path in self.litapi_request_queues:
            self.litapi_request_queues[api_path] = spawn.Queue()
        if isinstance(self._transport, MPQueueTransport):
            self._transport = AnswerPipeTransport([spawn.Queue() for _ in self._transport._queues])
        return manager

    async def run_prepared(self, prepared: dict) -> tuple[int, bytes]:
        """Runs one validated request on the model workers: ``(200, the answer's JSON)``, or a worker
        failure's ``(status, reason)`` (:func:`_worker_failure`).

        What LitServe's route handler does for a request, in the HTTP process that received it: the
        answer comes back through LitServe's answer task into ``response_buffer``."""
        uid = f"{os.getpid()}-{next(self._request_ids)}"
        item = ResponseBufferItem(event=asyncio.Event())
        self.response_buffer[uid] = item
        try:
            self._get_request_queue(INNER_PATH).put((self.app.response_queue_id, uid, time.monotonic(), prepared))
            await item.event.wait()
        finally:
            self.response_buffer.pop(uid, None)
        answer, status = item.response
        if status == LitAPIStatus.ERROR:
            return _worker_failure(answer)
        return 200, answer


def _worker_failure(answer) -> tuple[int, bytes]:
    """A LitServe loop's error answer (an ``HTTPException``, pickled or not, or anything else) as
    ``(status, message)``; the middleware gives it the OpenAI error form."""
    if isinstance(answer, bytes):
        try:
            answer = pickle.loads(answer)
        except Exception:  # noqa: BLE001 - an unreadable error is still a server error
            answer = None
    status = getattr(answer, "status_code", None)
    if isinstance(status, int) and 400 <= status < 600:
        return status, str(getattr(answer, "detail", "") or "server error").encode()
    return 500, b"server error"


class SparsertAPI(ls.LitAPI):
    """Runs prepared requests (validated by the middleware) on one worker's Engine.

    Module-level (not nested) because LitServe pickles it into spawned worker processes."""

    def __init__(self, model_file: str, engine_kwargs: dict, metrics: Metrics, plan: ThreadPlan,
                 worker_nice: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.worker_nice = worker_nice
        self.model_file = model_file
        self.engine_kwargs = engine_kwargs
        self.metrics = metrics
        self.plan = plan

    def setup(self, device):
        worker = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        cores = self.plan.cores_for(worker)
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)  # this worker's own core group: no two workers share a core
        if self.worker_nice > 0:
            os.nice(self.worker_nice)  # the HTTP process goes first (see the module docstring)
        self.engine = Engine(self.model_file, threads=self.plan.threads_per_worker, **self.engine_kwargs)
        self.engine.warmup()

    def decode_request(self, request):
        return request

    def predict(self, x):
        batch = x if isinstance(x, list) else [x]
        t0 = time.perf_counter()
        answers = self.engine.run(batch)
        self.metrics.observe_batch(len(batch), time.perf_counter() - t0)
        return answers if isinstance(x, list) else answers[0]

    def encode_response(self, output):
        # The JSON bytes are made here, in the worker (one per core), not in the one HTTP process
        # (FastAPI's jsonable_encoder and json.dumps took ~1.6 ms there per embedding answer, serial
        # work that every request and every overload refusal waits behind); the middleware sends them.
        return encode_answer(output)


def encode_answer(answer) -> bytes:
    """An answer as the JSON bytes FastAPI's JSONResponse would send (compact, UTF-8, no NaN)."""
    return json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


class SparsertStreamAPI(SparsertAPI):
    """A causal LM's worker: one request at a time, every answer a stream (LitServe sends each
    dict as one JSON line): a completion's chunks as they are generated, any other answer whole."""

    def predict(self, x):
        t0 = time.perf_counter()
        if x["op"] == "completions":
            yield from self.engine.complete(x)
        else:
            yield self.engine.run([x])[0]
        self.metrics.observe_batch(1, time.perf_counter() - t0)

    def encode_response(self, output):
        yield from output


def build_server(model_file: "str | os.PathLike", *, workers: int | None = None,
                 threads_per_worker: int | None = None, max_batch_size: int = 8, batch_timeout_ms: float = 2.0,
                 max_queue: int = 256, max_body_bytes: int = 1 << 20, request_timeout_s: float = 30.0,
                 tokenizer: str | None = None, max_tokens: int | None = None, name: str | None = None,
                 max_completion_tokens: int = 256, dense_path: str = "best", worker_nice: int = DEFAULT_WORKER_NICE,
                 forward: str = "streamlined"):
    """A ready-to-run ``litserve.LitServer`` for ``model_file``.

    The file is loaded once here first: a file that fails validation raises the
    loader's error and no server starts. ``worker_nice`` (0-19) lowers the model workers' CPU
    priority below the HTTP process's. A causal LM gets ``/v1/completions`` (streamed,
    batch 1 per request: ``max_batch_size`` does not apply to it).
    """
    plan = plan_threads(workers, threads_per_worker)
    if not 0 <= worker_nice <= 19:
        raise ValueError(f"worker_nice must be in 0..19, got {worker_nice}")
    model_file = str(Path(model_file))
    engine_kwargs = {"tokenizer": tokenizer, "max_tokens": max_tokens, "name": name,
                     "max_completion_tokens": max_completion_tokens, "dense_path": dense_path, "forward": forward}
    # the dense path does not change the spec: the check skips packing the dense weights
    probe_kwargs = {**engine_kwargs, "dense_path": "eager"}
    spec: EngineSpec = Engine(model_file, threads=plan.threads_per_worker, **probe_kwargs).spec
    engine_kwargs["tokenizer"] = spec.tokenizer  # the workers use exactly what was checked here
    metrics = Metrics(spec.name, spec.format_mix, plan.workers, plan.threads_per_worker)
    if spec.causal_lm:
        api = SparsertStreamAPI(model_file, engine_kwargs, metrics, plan, worker_nice, max_batch_size=1,
                                api_path=INNER_PATH, stream=True)
    else:
        api = SparsertAPI(model_file, engine_kwargs, metrics, plan, worker_nice, max_batch_size=max_batch_size,
                          batch_timeout=batch_timeout_ms / 1000.0, api_path=INNER_PATH,
                          loop=BlockingBatchLoop() if max_batch_size > 1 else "auto")
    server = None  # bound below; LitServe registers the middleware while the server is being built

    async def submit(prepared: dict) -> tuple[int, bytes]:
        return await server.run_prepared(prepared)

    edge = {"spec": spec, "metrics": metrics, "inner_path": INNER_PATH, "max_body_bytes": max_body_bytes,
            "max_queue": max_queue,
            # batched answers come back whole: the middleware puts requests on the workers' queue itself
            "submit": None if spec.causal_lm else submit}
    server = PlainQueueLitServer(
        api, accelerator="cpu", devices=1, workers_per_device=plan.workers, timeout=request_timeout_s,
        middlewares=[(ServingMiddleware, edge)],
        model_metadata={"model": spec.name, "formats": spec.format_mix, "workers": plan.workers,
                        "threads_per_worker": plan.threads_per_worker},
    )
    server.sparsert_spec = spec
    return server


def serve(model_file: "str | os.PathLike", *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          **kwargs) -> None:
    """Builds the server and runs it until interrupted; SIGTERM shuts down like Ctrl-C (in-flight
    requests get up to uvicorn's graceful-shutdown time to finish)."""
    server = build_server(model_file, **kwargs)

    def _stop(signum, frame):  # SIGTERM (docker stop, kubectl delete): the same path as Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        server.run(host=host, port=port, num_api_servers=1, generate_client_file=False, log_level=log_level)
    finally:
        signal.signal(signal.SIGTERM, previous)
