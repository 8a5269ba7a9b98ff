"""Scale-out: the same engine as a Ray Serve deployment.

``ray_app(FILE, ...)`` returns a Ray Serve application (``serve.run(app)``);
``build_app`` is the same for ``serve run`` / a KubeRay ``RayService``
(``import_path: sparsert.serving.ray_serve:build_app`` with ``args``);
``sparsert serve FILE --ray --replicas N`` runs it from the command line.

Each replica loads the file, fixes its threads, warms up, and answers the same
routes as the LitServe server (``/v1/embeddings``, ``/v1/completions``,
``/predict``, ``/health``) with the same validation
(:class:`~sparsert.serving.engine.Frontend`), so a bad request never joins a
batch. Requests are batched with ``@serve.batch``; completions run batch 1,
each in its own thread stepping the engine (whose lock interleaves them);
``max_ongoing_requests`` bounds the work inside a replica and
``max_queued_requests`` the requests waiting for one: beyond it Ray answers 503.
Metrics are Ray's own (``ray_serve_*`` on Ray's metrics port).
"""

# no "from __future__ import annotations": FastAPI must see the real Request type on the routes
import asyncio
import json
import os
import signal
import threading
from typing import Any

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from ray import serve
except ImportError:  # pragma: no cover - the message says what to install
    raise ImportError("the Ray Serve adapter needs Ray Serve: pip install 'sparsert[serve]' "
                      "(or pip install 'ray[serve]')") from None

from .engine import Engine, RequestError
from .engine import collect_completion
from .http import ROUTES, SSE_DONE, error_body, sse_event

__all__ = ["ray_app", "build_app", "run_ray", "SparsertDeployment"]

_api = FastAPI()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(json.loads(error_body(status, message)), status_code=status)


@serve.deployment
@serve.ingress(_api)
class SparsertDeployment:
    def __init__(self, model_file: str, engine_kwargs: dict, threads: int, max_batch_size: int,
                 batch_timeout_s: float, max_body_bytes: int):
        self.engine = Engine(model_file, threads=threads, **engine_kwargs)
        self.engine.warmup()
        self.max_body_bytes = max_body_bytes
        self._run.set_max_batch_size(max_batch_size)
        self._run.set_batch_wait_timeout_s(batch_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _run(self, prepared: "list[dict]") -> "list[dict]":
        # off the event loop, so /health answers while a batch runs
        return await asyncio.to_thread(self.engine.run, prepared)

    async def _handle(self, route: str, request: Request):
        raw = await request.body()
        if len(raw) > self.max_body_bytes:
            return _error(413, f"request body of {len(raw)} bytes is over the limit of {self.max_body_bytes} bytes")
        if not raw.strip():
            return _error(400, "empty request body: send a JSON object")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"malformed JSON: {e}")
        try:
            prepared = self.engine.frontend.parse(ROUTES[route], body)
        except RequestError as e:
            return _error(e.status, e.message)
        if prepared["op"] == "completions":
            return await self._complete(prepared)
        answer = await self._run(prepared)
        if "error" in answer:
            return _error(answer["error"]["status"], answer["error"]["message"])
        return JSONResponse(answer)

    async def _complete(self, prepared: dict):
        chunks = self.engine.complete(prepared)
        if not prepared["stream"]:
            answer = await asyncio.to_thread(collect_completion, chunks)
            if "error" in answer:
                return _error(answer["error"]["status"], answer["error"]["message"])
            return JSONResponse(answer)
        first = await asyncio.to_thread(next, chunks)  # an error before any text is still a 4xx
        if "error" in first:
            return _error(first["error"]["status"], first["error"]["message"])

        async def events():
            chunk = first
            while chunk is not None:
                yield sse_event(chunk)
                chunk = await asyncio.to_thread(next, chunks, None)  # one token per step, off the event loop
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream")

    @_api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle("/v1/completions", request)

    @_api.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        return await self._handle("/v1/embeddings", request)

    @_api.post("/predict")
    async def predict(self, request: Request):
        return await self._handle("/predict", request)

    @_api.get("/health")
    async def health(self):
        return PlainTextResponse("ok")  # a replica takes traffic only after __init__ (load + warm-up)

    def check_health(self):  # Ray's own replica health check
        if self.engine is None:  # pragma: no cover
            raise RuntimeError("engine not loaded")


def ray_app(model_file: "str | os.PathLike", *, replicas: int = 1, threads_per_replica: "int | None" = None,
            max_batch_size: int = 8, batch_timeout_ms: float = 2.0, max_ongoing_requests: "int | None" = None,
            max_queued_requests: int = 256, autoscale: bool = False, max_body_bytes: int = 1 << 20,
            tokenizer: "str | None" = None, max_tokens: "int | None" = None, name: "str | None" = None,
            max_queue: "int | None" = None, max_completion_tokens: int = 256, dense_path: str = "best",
            forward: str = "streamlined"):
    """A Ray Serve application serving ``model_file``.

    Each replica reserves ``threads_per_replica`` CPUs from Ray (default 1), so Ray never places
    more replica threads on a node than it has CPUs. With ``autoscale=True`` the replica count
    moves between 1 and ``replicas`` to keep about ``max_batch_size`` requests per replica.
    The file is validated here first: a bad file raises the loader's error before anything deploys.
    """
    threads = threads_per_replica or 1
    probe = Engine(model_file, threads=None, tokenizer=tokenizer, max_tokens=max_tokens, name=name,
                   max_completion_tokens=max_completion_tokens, dense_path="eager")  # (the spec is the same)
    engine_kwargs = {"tokenizer": probe.spec.tokenizer, "max_tokens": max_tokens, "name": probe.spec.name,
                     "max_completion_tokens": max_completion_tokens, "dense_path": dense_path, "forward": forward}
    options: dict[str, Any] = {
        "name": f"sparsert-{probe.spec.name}",
        "max_ongoing_requests": max_ongoing_requests or 2 * max_batch_size,
        "max_queued_requests": max_queue or max_queued_requests,
        "ray_actor_options": {"num_cpus": threads},
        "health_check_period_s": 10,
    }
    if autoscale:
        options["autoscaling_config"] = {"min_replicas": 1, "max_replicas": replicas,
                                         "target_ongoing_requests": max_batch_size, "upscale_delay_s": 5,
                                         "downscale_delay_s": 60}
    else:
        options["num_replicas"] = replicas
    return SparsertDeployment.options(**options).bind(
        str(model_file), engine_kwargs, threads, max_batch_size, batch_timeout_ms / 1000.0, max_body_bytes)


def build_app(args: dict):
    """``serve run sparsert.serving.ray_serve:build_app model_file=FILE replicas=2`` (values as strings)."""
    args = dict(args)
    model_file = args.pop("model_file")
    ints = {"replicas", "threads_per_replica", "max_batch_size", "max_ongoing_requests", "max_queued_requests",
            "max_body_bytes", "max_tokens", "max_completion_tokens"}
    kwargs = {k: (int(v) if k in ints else float(v) if k == "batch_timeout_ms" else
                  str(v).lower() in ("1", "true", "yes") if k == "autoscale" else v) for k, v in args.items()}
    return ray_app(model_file, **kwargs)


def run_ray(model_file: "str | os.PathLike", *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
            threads_per_replica: "int | None" = None, **kwargs) -> None:
    """``sparsert serve FILE --ray``: joins the Ray cluster in ``RAY_ADDRESS`` (or starts a local one),
    deploys, and serves until SIGINT/SIGTERM, then shuts the deployment down."""
    import ray

    app = ray_app(model_file, replicas=replicas, threads_per_replica=threads_per_replica, **kwargs)
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, route_prefix="/", name="sparsert")
        print(f"sparsert serve: Ray Serve on http://{host}:{port} ({replicas} replica(s)); Ctrl-C stops", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
