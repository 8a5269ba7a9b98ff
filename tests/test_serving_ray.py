"""The Ray Serve adapter on a local Ray instance started by the test and torn down after."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'sparsert[serve]'")
pytest.importorskip("transformers", reason="the serving tests' BERT needs transformers")

from serving_util import free_port, sentences, smollm2_tokenizer_reason, tiny_bert_file, tiny_llama_file  # noqa: E402


def _post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def ray_url():
    """A local Ray instance with Serve on a free loopback port, torn down after the module."""
    import ray
    from ray import serve

    port = free_port()
    # 3 logical CPUs: the two 1-thread BERT replicas and the one LM replica fit at once
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_ray_serve_two_replicas_answer_like_the_offline_model(tmp_path, ray_url):
    from ray import serve

    import sparsert
    from sparsert.models import minilm
    from sparsert.serving import load_tokenizer, ray_app, tokenizer_path_for

    model_file = tiny_bert_file(tmp_path)
    serve.run(ray_app(model_file, replicas=2, threads_per_replica=1, max_batch_size=4), route_prefix="/",
              name="sparsert-test")
    url = ray_url
    texts = sentences(5, seed=4)
    status, answer = _post(url + "/v1/embeddings", {"input": texts})
    assert status == 200, answer
    got = torch.tensor([d["embedding"] for d in answer["data"]])
    want = minilm.embed(sparsert.load(model_file), load_tokenizer(str(tokenizer_path_for(model_file))), texts)
    assert (got - want).abs().max().item() <= 1e-5
    status, answer = _post(url + "/v1/embeddings", {"input": []})
    assert status == 400 and "'input' is empty" in answer["error"]["message"]
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert r.status == 200


@pytest.mark.slow
def test_ray_serve_completions_stream_and_whole(tmp_path, ray_url):
    reason = smollm2_tokenizer_reason()
    if reason:
        pytest.skip(f"the completions test uses SmolLM2's tokenizer: {reason}")
    from ray import serve

    from sparsert.serving import Engine, ray_app

    model_file = tiny_llama_file(tmp_path)
    serve.run(ray_app(model_file, replicas=1, threads_per_replica=1, max_completion_tokens=16), route_prefix="/lm",
              name="sparsert-lm")
    url = ray_url + "/lm/v1/completions"
    engine = Engine(model_file)
    body = {"prompt": "A sparse model runs", "max_tokens": 12, "temperature": 0.8, "seed": 3}
    want = engine.completion(engine.frontend.completions(body))["choices"][0]["text"]
    status, answer = _post(url, body)
    assert status == 200, answer
    assert answer["choices"][0]["text"] == want and answer["usage"]["completion_tokens"] == 12
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = r.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    status, answer = _post(url, {"prompt": "x", "max_tokens": 17})
    assert status == 400 and "this server's limit is 16" in answer["error"]["message"]
