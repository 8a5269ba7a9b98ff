"""Locust user for benchmarks/serve_load.py: one short sentence per POST /v1/embeddings.

A response counts as a failure unless it is 200 with exactly one 384-wide embedding.
SERVE_LOAD_SENTENCES (a file, one sentence per line) picks the sentences.

The user is locust's ``FastHttpUser`` (geventhttpclient), not ``HttpUser`` (python-requests): the load
generator shares the server's two cores here, and under load ``HttpUser`` took ~0.3 of them, cycles
the server under test lost (on a real deployment the clients are other machines).
"""

import itertools
import os

from locust import FastHttpUser, constant, task

with open(os.environ["SERVE_LOAD_SENTENCES"], encoding="utf-8") as f:
    SENTENCES = [s.strip() for s in f if s.strip()]
_next = itertools.cycle(SENTENCES)


class EmbeddingsUser(FastHttpUser):
    wait_time = constant(0)  # closed loop: each user sends its next request when the last one is answered

    @task
    def embed(self):
        with self.client.post("/v1/embeddings", json={"input": next(_next)}, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            data = r.json().get("data", [])
            if len(data) != 1 or len(data[0].get("embedding", [])) != 384:
                r.failure("wrong answer shape")
