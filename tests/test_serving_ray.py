"""The Ray Serve adapter on a local Ray instance started by the test and torn down after."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'sparsert[serve]'")
pytest.importorskip("transformers", reason="the serving tests' BERT needs transformers")

from serving_util import free_port, sentences, tiny_bert_file  # noqa: E402


def _post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_ray_serve_two_replicas_answer_like_the_offline_model(tmp_path):
    import ray
    from ray import serve

    import sparsert
    from sparsert.models import minilm
    from sparsert.serving import load_tokenizer, ray_app, tokenizer_path_for

    model_file = tiny_bert_file(tmp_path)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app(model_file, replicas=2, threads_per_replica=1, max_batch_size=4), route_prefix="/",
                  name="sparsert-test")
        url = f"http://127.0.0.1:{port}"
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
    finally:
        serve.shutdown()
        ray.shutdown()
