"""The HTTP edge shared by the server adapters: an ASGI middleware that checks
every request before it reaches a model queue.

For ``POST /v1/embeddings`` and ``POST /predict`` it

1. refuses new work when ``max_queue`` requests are already in flight (503 with
   ``Retry-After``, answered at once: overload never becomes a timeout storm);
2. reads the body up to ``max_body_bytes`` (413 beyond it);
3. parses the JSON (400 with the parser's position on malformed JSON);
4. validates it with :class:`~sparsert.serving.engine.Frontend` (4xx with a
   one-line reason) and forwards the *prepared* request to ``inner_path``, the
   one route where the model workers listen; so a bad request never joins a
   batch and cannot fail the good requests batched with it.

It also serves ``GET /metrics`` and counts every answer. Error bodies have the
OpenAI form ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import json
import time

from .engine import EngineSpec, Frontend, RequestError
from .metrics import Metrics

__all__ = ["ServingMiddleware", "ROUTES", "error_body"]

# public route -> engine operation
ROUTES = {"/v1/embeddings": "embeddings", "/predict": "predict"}
# a worker answer that is an error starts with this (see Engine.run): the edge turns it into a 4xx
WORKER_ERROR_PREFIX = b'{"error":'


def error_body(status: int, message: str) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


async def _send_json(send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class ServingMiddleware:
    def __init__(self, app, *, spec: EngineSpec, metrics: Metrics, inner_path: str,
                 max_body_bytes: int, max_queue: int):
        self.app = app
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
            return await self._forward(scope, send, json.dumps(prepared).encode())
        finally:
            self.metrics.in_flight -= 1

    async def _forward(self, scope, send, payload: bytes) -> int:
        """Hands the prepared request to the model route; relays its answer (a worker error -> its 4xx)."""
        inner = dict(scope, path=self.inner_path, raw_path=self.inner_path.encode(),
                     headers=[(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())])
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}

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
        if status == 200 and body.startswith(WORKER_ERROR_PREFIX):
            err = json.loads(body)["error"]
            status, body = int(err["status"]), error_body(int(err["status"]), err["message"])
        elif status >= 400:
            try:
                detail = json.loads(body).get("detail", "")
            except (ValueError, AttributeError):
                detail = ""
            body = error_body(status, str(detail) or "server error")
        await _send_json(send, status, body)
        return status
