"""The OpenAI-compatible server: outputs equal deltakit.apply's models, no leakage, errors, API key."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from test_runtime_support import (
    applied_model,
    byte_tokenizer,
    cached_fleet,
    foreign_delta,
    reference_generate,
)
from transformers import AutoModelForCausalLM

from deltakit.runtime import SamplingParams, ServingEngine, create_app
from deltakit.runtime.generate import GenerationRequest
from deltakit.runtime.scheduler import Job

PROMPTS = ("hello there", "the quick brown fox", "deltas!")
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def fleet() -> dict:
    return cached_fleet("llama")


@pytest.fixture(scope="module")
def expected(fleet) -> dict[tuple[str, str], str]:
    """Greedy text per (model, prompt) from transformers' generate on deltakit.apply's models."""
    tok = byte_tokenizer()
    models = {"base": AutoModelForCausalLM.from_pretrained(fleet["base"], dtype="auto").eval()}
    for name, path in fleet["delta"].items():
        models[name] = applied_model(fleet["base"], path, fleet["root"] / f"applied-{name}")
    return {
        (m, p): reference_generate(model, tok, p, MAX_TOKENS) for m, model in models.items() for p in PROMPTS
    }


@pytest.fixture(scope="module")
def engine(fleet):
    eng = ServingEngine.from_base(
        fleet["base"],
        deltas={n: str(p) for n, p in fleet["delta"].items()},
        allowed_roots=[fleet["root"]],  # load_lora_adapter may read any delta of the fleet
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine)) as c:
        yield c


def _complete(client, model: str, prompt: str, **extra) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_outputs_differ_between_models(expected):
    assert len({expected[(m, PROMPTS[1])] for m in ("base", "dqrelo-0", "bitdelta-1", "svd-2")}) == 4


def test_greedy_completion_equals_applied_model(client, expected, fleet):
    for name in [*fleet["delta"], "base"]:
        model = name if name != "base" else "base"
        got = _complete(client, model, PROMPTS[0])
        assert got["object"] == "text_completion" and got["model"] == model
        assert got["choices"][0]["text"] == expected[(name, PROMPTS[0])], name
        assert got["usage"]["prompt_tokens"] == len(PROMPTS[0])


def test_models_lists_deltas_with_parent(client, fleet):
    data = client.get("/v1/models").json()["data"]
    ids = [m["id"] for m in data]
    assert ids[0] == "base" and set(fleet["delta"]) <= set(ids)
    assert all(m["parent"] == "base" for m in data[1:])
    assert str(fleet["root"]) not in json.dumps(data)  # the cards reveal no server paths


def test_mixed_batch_through_scheduler_gives_each_model_its_output(engine, expected, fleet):
    models = ["dqrelo-0", None, "bitdelta-1", "svd-2", "lossless-3", "dqrelo-0"]
    tok = engine.tokenizer
    jobs = [
        Job(m, GenerationRequest(tok(PROMPTS[i % 3]).input_ids, SamplingParams(MAX_TOKENS, temperature=0)))
        for i, m in enumerate(models)
    ]
    engine.scheduler.run_batch(jobs)
    assert engine.scheduler.batches[-1].path == "multi"
    for i, (m, job) in enumerate(zip(models, jobs, strict=True)):
        assert job.future.result().text == expected[(m or "base", PROMPTS[i % 3])], m


def test_concurrent_requests_alternating_deltas_do_not_leak(engine, expected, fleet):
    """Real HTTP (uvicorn on 127.0.0.1) with 4 models interleaved from 8 threads."""
    import uvicorn

    config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    models = ["dqrelo-0", "bitdelta-1", "svd-2", "base"]
    work = [(models[i % 4], PROMPTS[i % 3]) for i in range(16)]
    before = len(engine.scheduler.batches)

    def call(item):
        model, prompt = item
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        return httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, work))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    for (model, prompt), result in zip(work, results, strict=True):
        assert result["choices"][0]["text"] == expected[(model, prompt)], (model, prompt)
    assert len(engine.scheduler.batches) > before


def test_a_then_b_then_base_leaves_base_bit_exact(client, engine, fleet):
    for model in ("dqrelo-0", "bitdelta-1", "base"):
        _complete(client, model, PROMPTS[2])
    assert engine.runtime.active is None
    reference = AutoModelForCausalLM.from_pretrained(fleet["base"], dtype="auto")
    ours = dict(engine.runtime.model.named_parameters())
    assert all(torch.equal(ours[n], p) for n, p in reference.named_parameters())


def test_chat_completion_and_streaming_agree(client):
    body = {
        "model": "svd-2",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    plain = client.post("/v1/chat/completions", json=body).json()
    assert plain["object"] == "chat.completion" and plain["choices"][0]["message"]["role"] == "assistant"
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


def test_sampling_seed_stop_and_max_tokens(client, expected):
    body = {"model": "dqrelo-0", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 1.0, "top_p": 0.9}
    first = client.post("/v1/completions", json={**body, "seed": 7}).json()["choices"][0]["text"]
    again = client.post("/v1/completions", json={**body, "seed": 7}).json()["choices"][0]["text"]
    assert first == again
    greedy = expected[("dqrelo-0", PROMPTS[1])]
    stop = greedy[3:5]
    got = _complete(client, "dqrelo-0", PROMPTS[1], stop=[stop])["choices"][0]
    assert got["text"] == greedy[: greedy.find(stop)] and got["finish_reason"] == "stop"
    short = _complete(client, "dqrelo-0", PROMPTS[1], max_tokens=2)
    assert short["usage"]["completion_tokens"] <= 2 and short["choices"][0]["finish_reason"] in (
        "length",
        "stop",
    )


def _assert_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_error_cases(client, fleet):
    _assert_error(client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404)
    _assert_error(
        client.post(
            "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}
        ),
        404,
    )
    bad_json = client.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    _assert_error(bad_json, 400)
    _assert_error(client.post("/v1/completions", json={"prompt": "x"}), 400)  # no model
    _assert_error(
        client.post("/v1/completions", json={"model": "base", "prompt": "x", "temperature": 5}), 400
    )
    _assert_error(client.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 0}), 400)
    _assert_error(
        client.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 10_000}), 400
    )
    _assert_error(client.post("/v1/chat/completions", json={"model": "base", "messages": []}), 400)
    _assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "never-loaded"}), 404)
    _assert_error(
        client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/no/such/dir"}), 404
    )
    error = _assert_error(
        client.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "foreign", "lora_path": str(foreign_delta(fleet["root"]))},
        ),
        409,
    )
    assert "base" in error["message"]
    assert "foreign" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    _assert_error(client.get("/v1/no-such-route"), 404)


def test_load_and_unload_adapter(client, fleet, expected):
    path = str(fleet["delta"]["bitdelta-1"])
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "tenant-b", "lora_path": path})
    assert response.status_code == 200, response.text
    _assert_error(
        client.post("/v1/load_lora_adapter", json={"lora_name": "tenant-b", "lora_path": path}), 400
    )
    assert (
        _complete(client, "tenant-b", PROMPTS[0])["choices"][0]["text"]
        == expected[("bitdelta-1", PROMPTS[0])]
    )
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "tenant-b"}).status_code == 200
    _assert_error(client.post("/v1/completions", json={"model": "tenant-b", "prompt": "x"}), 404)


def test_small_cache_keeps_server_results_right(fleet, expected):
    engine = ServingEngine.from_base(
        fleet["base"],
        deltas={n: str(p) for n, p in fleet["delta"].items()},
        host_cache_bytes=2048,  # smaller than each of the three deltas served below
        device_cache_bytes=2048,
    )
    try:
        with TestClient(create_app(engine)) as c:
            for model in ["dqrelo-0", "svd-2", "bitdelta-1", "dqrelo-0"]:
                assert _complete(c, model, PROMPTS[0])["choices"][0]["text"] == expected[(model, PROMPTS[0])]
        assert (
            engine.runtime.host_cache.nbytes <= 2048
        )  # the larger deltas are re-read from disk on each swap
        assert sum(not s.host_cache_hit for s in engine.runtime.history) >= 3
    finally:
        engine.close()


def test_api_key_is_checked_on_every_route(engine):
    with TestClient(create_app(engine, api_key="s3cret")) as c:
        for method, path in [
            ("get", "/v1/models"),
            ("post", "/v1/completions"),
            ("post", "/v1/chat/completions"),
            ("post", "/v1/load_lora_adapter"),
            ("post", "/v1/unload_lora_adapter"),
            ("get", "/health"),
            ("get", "/nothing-here"),
        ]:
            error = _assert_error(getattr(c, method)(path), 401)
            assert error["code"] == "invalid_api_key"
        _assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_cli_parsers():
    from deltakit_cli.serve_cmds import parse_bytes, parse_deltas

    assert parse_bytes("512M") == 512 << 20 and parse_bytes("2GiB") == 2 << 30 and parse_bytes("100") == 100
    assert parse_deltas(("a=/x", "chat:v1")) == {"a": "/x", "chat:v1": "chat:v1"}
