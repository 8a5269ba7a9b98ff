"""The HTTP edge shared by the server adapters: an ASGI middleware that checks
every request before it reaches a model queue.

For ``POST /v1/embeddings``, ``POST /v1/completions`` and ``POST /predict`` it

1. refuses new work when ``max_queue`` requests are already in flight (503 with
   ``Retry-After``, answered at once: overload never becomes a timeout storm);
2. reads the body up to ``max_body_bytes`` (413 beyond it);
3. parses the JSON (400 with the parser's position on malformed JSON);
4. validates it with :class:`~sparsert.serving.engine.Frontend` (4xx with a
   one-line reason) and hands the *prepared* request to the model workers:
   through ``submit`` where the server gives one (LitServe's batched workers:
   straight onto their queue), else as a call to ``inner_path``, the one route
   where the workers listen; so a bad request never joins a batch and cannot
   fail the good requests batched with it.

Completions come back from the worker as one JSON chunk per line
(:meth:`~sparsert.serving.engine.Engine.complete`); the middleware relays them
as server-sent events as they arrive (``stream: true``, OpenAI's chunk format,
ending with ``data: [DONE]``) or joins them into one answer.

It also serves ``GET /metrics`` and counts every answer. Error bodies have the
OpenAI form ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import json
import time

from .engine import EngineSpec, Frontend, RequestError
from .metrics import Metrics

__all__ = ["ServingMiddleware", "ROUTES", "error_body", "sse_event", "SSE_DONE"]

# public route -> engine operation
ROUTES = {"/v1/embeddings": "embeddings", "/v1/completions": "completions", "/predict": "predict"}
SSE_DONE = b"data: [DONE]\n\n"  # OpenAI's end of a stream
# a worker answer that is an error starts with this (see Engine.run): the edge turns it into a 4xx
WORKER_ERROR_PREFIX = b'{"error":'


def error_body(status: int, message: str) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


def sse_event(chunk: dict) -> bytes:
    """One server-sent event carrying a JSON chunk, as OpenAI streams them."""
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def _send_json(send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class ServingMiddleware:
    def __init__(self, app, *, spec: EngineSpec, metrics: Metrics, inner_path: str,
                 max_body_bytes: int, max_queue: int, submit=None):
        """``submit``: an async callable that runs a prepared request on the workers and returns
        ``(status, body)`` as :meth:`_answer` takes them (the answer's JSON on 200, else the reason);
        without it, requests go to ``inner_path`` through ``app``."""
        self.app = app
        self.submit = submit
        self.frontend = Frontend(spec)
        if spec.embeddings:
            self.frontend.tokenizer  # noqa: B018  (load it at start-up, not in the first request)
        self.metrics = metrics
        self.inner_path = inner_path
        self.max_body_bytes = max_body_bytes
        self.max_queue = max_queue

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path == "/metrics" and method == "GET":
            body = self.metrics.render().encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if path == self.inner_path:
            return await _send_json(send, 404, error_body(404, "Not Found"))
        if path not in ROUTES:
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = await self._serve(scope, receive, send, path)
        self.metrics.observe_request(path, status, time.perf_counter() - t0)

    async def _serve(self, scope, receive, send, path: str) -> int:
        async def fail(status: int, message: str, headers=None) -> int:
            await _send_json(send, status, error_body(status, message), headers)
            return status

        if scope["method"] != "POST":
            return await fail(405, f"{path} takes POST")
        if self.metrics.in_flight >= self.max_queue:
            self.metrics.rejected += 1
            return await fail(503, f"overloaded: {self.metrics.in_flight} requests already queued "
                                   f"(limit {self.max_queue}, --max-queue); retry later", [(b"retry-after", b"1")])
        self.metrics.in_flight += 1
        try:
            headers = dict(scope["headers"])
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                return await fail(413, f"request body of {int(declared)} bytes is over the limit of "
                                       f"{self.max_body_bytes} bytes (--max-body-bytes)")
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return 499
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    return await fail(413, f"request body is over the limit of {self.max_body_bytes} bytes "
                                           "(--max-body-bytes)")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            raw = b"".join(chunks)
            if not raw.strip():
                return await fail(400, "empty request body: send a JSON object")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return await fail(400, f"malformed JSON: {e}")
            try:
                prepared = self.frontend.parse(ROUTES[path], body)
            except RequestError as e:
                return await fail(e.status, e.message)
            if prepared["op"] == "completions":
                return await self._forward_completion(scope, receive, send, prepared)
            if self.submit is not None:
                return await self._answer(send, *await self.submit(prepared))
            return await self._forward(scope, receive, send, json.dumps(prepared).encode())
        finally:
            self.metrics.in_flight -= 1

    def _inner(self, scope, receive, payload: bytes):
        """The scope and ``receive`` of a call to the model route carrying ``payload``. After the
        payload, ``receive`` is the client's own, so a streaming answer that listens for a
        disconnect hears only a real one."""
        inner = dict(scope, path=self.inner_path, raw_path=self.inner_path.encode(),
                     headers=[(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())])
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}

        return inner, replay

    async def _forward(self, scope, receive, send, payload: bytes) -> int:
        """Hands the prepared request to the model route; relays its answer (a worker error -> its 4xx)."""
        inner, replay = self._inner(scope, receive, payload)

        start: dict = {}
        parts: list[bytes] = []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        await self.app(inner, replay, capture)
        body = b"".join(parts)
        status = int(start.get("status", 500))
        if status >= 400:
            try:
                detail = json.loads(body).get("detail", "")
            except (ValueError, AttributeError):
                detail = ""
            body = str(detail).encode()
        return await self._answer(send, status, body)

    @staticmethod
    async def _answer(send, status: int, body: bytes) -> int:
        """Sends a worker's answer: its JSON on 200, unless it is an engine error (-> its 4xx); on any
        other status ``body`` is the reason, sent in the OpenAI error form."""
        if status == 200 and body.startswith(WORKER_ERROR_PREFIX):
            err = json.loads(body)["error"]
            status, body = int(err["status"]), err["message"].encode()
        if status != 200:
            body = error_body(status, body.decode("utf-8", "replace") or "server error")
        await _send_json(send, status, body)
        return status

    async def _forward_completion(self, scope, receive, send, prepared: dict) -> int:
        """Hands a prepared completion to the model route, whose answer streams one JSON chunk per
        line; relays each chunk as a server-sent event as it comes (``stream``), else one answer."""
        from .engine import collect_completion

        inner, replay = self._inner(scope, receive, json.dumps(prepared).encode())
        status, pending, chunks, started = 200, b"", [], False
        error: dict | None = None

        async def relay(message):
            nonlocal status, pending, started, error
            if message["type"] == "http.response.start":
                status = int(message["status"])
                return
            if message["type"] != "http.response.body" or status != 200:
                pending += message.get("body", b"")
                return
            pending += message.get("body", b"")
            *lines, pending = pending.split(b"\n")
            for line in filter(None, (x.strip() for x in lines)):
                chunk = json.loads(line)
                if "error" in chunk and not started:
                    error = error or chunk["error"]
                    continue
                if not prepared["stream"]:
                    chunks.append(chunk)
                    continue
                if not started:
                    started = True
                    await send({"type": "http.response.start", "status": 200,
                                "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                            (b"cache-control", b"no-cache")]})
                await send({"type": "http.response.body", "body": sse_event(chunk), "more_body": True})

        await self.app(inner, replay, relay)
        if started:
            await send({"type": "http.response.body", "body": SSE_DONE, "more_body": False})
            return 200
        if status != 200:
            try:
                detail = json.loads(pending).get("detail", "")
            except (ValueError, AttributeError):
                detail = ""
            error = {"status": status, "message": str(detail) or "server error"}
        if error is None and not chunks:
            error = {"status": 500, "message": "the model worker gave no answer"}
        if error is not None:
            await _send_json(send, int(error["status"]), error_body(int(error["status"]), error["message"]))
            return int(error["status"])
        await _send_json(send, 200, json.dumps(collect_completion(chunks)).encode())
        return 200
