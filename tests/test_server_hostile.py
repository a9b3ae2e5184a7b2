"""Hostile clients against the server: every case gets its HTTP status and a one-line JSON error body.

Also: the same answer for a missing and a forbidden adapter path, the API key, the body cap, and the
command line's warning for a key given as an argument.
"""

from __future__ import annotations

import json
import os

import pytest
from fastapi.testclient import TestClient
from test_runtime_support import cached_fleet, foreign_delta

from deltakit.runtime import ServingEngine, create_app
from deltakit.runtime.server import ServerLimits

MAX_BODY = 64 << 10
MAX_PROMPT_TOKENS = 64
OK = {"model": "base", "prompt": "hi", "max_tokens": 2, "temperature": 0}
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def fleet() -> dict:
    return cached_fleet("llama")


@pytest.fixture(scope="module")
def roots(fleet, tmp_path_factory) -> dict:
    """An allowed root holding a symlink that leaves it (to a real delta outside every root)."""
    allowed = tmp_path_factory.mktemp("allowed")
    outside = foreign_delta(fleet["root"])
    (allowed / "escape").symlink_to(outside, target_is_directory=True)
    return {"allowed": allowed, "outside": outside}


@pytest.fixture(scope="module")
def engine(fleet, roots):
    eng = ServingEngine.from_base(
        fleet["base"],
        deltas={"dq": str(fleet["delta"]["dqrelo-0"])},
        max_prompt_tokens=MAX_PROMPT_TOKENS,
    )
    eng.allowed_roots.append(roots["allowed"].resolve())
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, limits=ServerLimits(max_body_bytes=MAX_BODY))) as c:
        yield c


def _completion(**fields) -> dict:
    return {"json": {**OK, **fields}}


def _raw(content: bytes) -> dict:
    return {"content": content, "headers": {"content-type": "application/json"}}


# (id, method, route, request kwargs (or a callable of the fleet/roots giving them), status)
CASES = [
    ("malformed-json", "post", "/v1/completions", _raw(b'{"model": "base", "prompt": '), 400),
    ("json-array-body", "post", "/v1/completions", {"json": [1, 2, 3]}, 400),
    ("empty-body", "post", "/v1/completions", _raw(b""), 400),
    ("deep-json", "post", "/v1/completions", _raw(b"[" * 20000 + b"]" * 20000), 400),
    ("nan-literal", "post", "/v1/completions", _raw(b'{"model":"base","prompt":"x","temperature":NaN}'), 400),
    ("body-too-large", "post", "/v1/completions", _completion(prompt="x" * (MAX_BODY + 10)), 413),
    ("seed-2**70", "post", "/v1/completions", _completion(seed=2**70), 400),
    ("seed-2**63", "post", "/v1/completions", _completion(seed=2**63), 400),
    ("seed-negative", "post", "/v1/completions", _completion(seed=-1), 400),
    ("seed-fraction", "post", "/v1/completions", _completion(seed=1.5), 400),
    ("temperature-negative", "post", "/v1/completions", _completion(temperature=-0.5), 400),
    ("temperature-too-high", "post", "/v1/completions", _completion(temperature=5), 400),
    ("temperature-string", "post", "/v1/completions", _completion(temperature="hot"), 400),
    ("top-p-zero", "post", "/v1/completions", _completion(top_p=0), 400),
    ("top-p-above-one", "post", "/v1/completions", _completion(top_p=1.5), 400),
    ("top-k-negative", "post", "/v1/completions", _completion(top_k=-5), 400),
    ("top-k-list", "post", "/v1/completions", _completion(top_k=[1]), 400),
    ("max-tokens-zero", "post", "/v1/completions", _completion(max_tokens=0), 400),
    ("max-tokens-huge", "post", "/v1/completions", _completion(max_tokens=10**9), 400),
    ("max-tokens-over-context", "post", "/v1/completions", _completion(max_tokens=10_000), 400),
    ("n-two", "post", "/v1/completions", _completion(n=2), 400),
    ("stop-too-many", "post", "/v1/completions", _completion(stop=["a", "b", "c", "d", "e"]), 400),
    ("stop-wrong-type", "post", "/v1/completions", _completion(stop=5), 400),
    ("stop-too-long", "post", "/v1/completions", _completion(stop="s" * 300), 400),
    ("prompt-empty-list", "post", "/v1/completions", _completion(prompt=[]), 400),
    ("prompt-empty-string", "post", "/v1/completions", _completion(prompt=""), 400),
    ("prompt-wrong-type", "post", "/v1/completions", _completion(prompt=123), 400),
    ("prompt-too-many", "post", "/v1/completions", _completion(prompt=["a"] * 17), 400),
    (
        "prompt-over-token-cap",
        "post",
        "/v1/completions",
        _completion(prompt="y" * (MAX_PROMPT_TOKENS + 1)),
        400,
    ),
    (
        "second-prompt-over-cap",
        "post",
        "/v1/completions",
        _completion(prompt=["a", "y" * (MAX_PROMPT_TOKENS + 1)]),
        400,
    ),
    ("stream-two-prompts", "post", "/v1/completions", _completion(prompt=["a", "b"], stream=True), 400),
    ("echo-wrong-type", "post", "/v1/completions", _completion(echo={"x": 1}), 400),
    ("model-missing", "post", "/v1/completions", {"json": {"prompt": "x"}}, 400),
    ("model-empty", "post", "/v1/completions", _completion(model=""), 400),
    ("model-unknown", "post", "/v1/completions", _completion(model="no-such-model"), 404),
    ("model-path-like", "post", "/v1/completions", _completion(model="../../etc/passwd"), 404),
    ("chat-no-messages", "post", "/v1/chat/completions", {"json": {**CHAT, "messages": []}}, 400),
    (
        "chat-bad-role",
        "post",
        "/v1/chat/completions",
        {"json": {**CHAT, "messages": [{"role": "x", "content": "a"}]}},
        400,
    ),
    (
        "chat-text-part-not-string",
        "post",
        "/v1/chat/completions",
        {"json": {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}},
        400,
    ),
    ("chat-seed-2**70", "post", "/v1/chat/completions", {"json": {**CHAT, "seed": 2**70}}, 400),
    ("load-missing-fields", "post", "/v1/load_lora_adapter", {"json": {"lora_name": "x"}}, 400),
    (
        "load-base-name",
        "post",
        "/v1/load_lora_adapter",
        lambda f, r: {"json": {"lora_name": "base", "lora_path": str(f["delta"]["svd-2"])}},
        400,
    ),
    (
        "load-missing-path",
        "post",
        "/v1/load_lora_adapter",
        {"json": {"lora_name": "x", "lora_path": "/no/such/dir"}},
        404,
    ),
    (
        "load-outside-roots",
        "post",
        "/v1/load_lora_adapter",
        lambda f, r: {"json": {"lora_name": "x", "lora_path": str(f["delta"]["svd-2"])}},
        404,
    ),
    (
        "load-system-dir",
        "post",
        "/v1/load_lora_adapter",
        {"json": {"lora_name": "x", "lora_path": "/etc"}},
        404,
    ),
    (
        "load-dotdot-escape",
        "post",
        "/v1/load_lora_adapter",
        lambda f, r: {"json": {"lora_name": "x", "lora_path": f"{r['allowed']}/../../../etc"}},
        404,
    ),
    (
        "load-symlink-escape",
        "post",
        "/v1/load_lora_adapter",
        lambda f, r: {"json": {"lora_name": "x", "lora_path": str(r["allowed"] / "escape")}},
        404,
    ),
    (
        "load-not-a-delta",
        "post",
        "/v1/load_lora_adapter",
        lambda f, r: {"json": {"lora_name": "x", "lora_path": str(r["allowed"])}},
        400,
    ),
    ("unload-unknown", "post", "/v1/unload_lora_adapter", {"json": {"lora_name": "never-loaded"}}, 404),
    ("unknown-route", "get", "/v1/no-such-route", {}, 404),
    ("wrong-method", "get", "/v1/completions", {}, 405),
]


@pytest.mark.parametrize(
    ("method", "route", "kwargs", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_request_gets_a_json_error(client, fleet, roots, method, route, kwargs, status):
    kwargs = kwargs(fleet, roots) if callable(kwargs) else kwargs
    response = getattr(client, method)(route, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "\n" not in error["message"] and "Traceback" not in response.text
    names = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert names == ["base", "dq"]  # nothing hostile got registered
    assert client.post("/v1/completions", json=OK).status_code == 200  # the server still serves


def test_missing_and_forbidden_paths_get_the_same_answer(client, fleet, roots):
    answers = []
    for path in ("/no/such/dir", str(fleet["delta"]["svd-2"]), str(roots["allowed"] / "escape")):
        response = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        answers.append((response.status_code, response.json()["error"]["message"].replace(path, "PATH")))
    assert len(set(answers)) == 1, answers


def test_allowed_path_loads(client, fleet):
    response = client.post(
        "/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": str(fleet["delta"]["dqrelo-0"])}
    )
    assert response.status_code == 200, response.text
    assert client.post("/v1/completions", json={**OK, "model": "again"}).status_code == 200
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "again"}).status_code == 200


def test_chunked_body_over_the_cap_is_refused(client):
    def chunks():
        yield b'{"model": "base", "prompt": "'
        for _ in range(MAX_BODY // 1024 + 2):
            yield b"z" * 1024
        yield b'"}'

    response = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "body_too_large"


def test_internal_errors_are_json_without_details(engine):
    def boom(_prompt):
        raise RuntimeError("secret /internal/path detail")

    original = engine.encode_prompt
    engine.encode_prompt = boom
    try:
        with TestClient(create_app(engine), raise_server_exceptions=False) as c:
            response = c.post("/v1/completions", json=OK)
    finally:
        engine.encode_prompt = original
    assert response.status_code == 500
    assert "secret" not in response.text and response.json()["error"]["type"] == "InternalServerError"


def test_api_key_wrong_or_missing(engine):
    with TestClient(create_app(engine, api_key="k3y")) as c:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k3y"}):
            response = c.post("/v1/completions", json=OK, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert c.post("/v1/completions", json=OK, headers={"Authorization": "Bearer k3y"}).status_code == 200


@pytest.mark.parametrize("where", ["env", "argument"])
def test_cli_api_key_from_env_or_argument(fleet, monkeypatch, capsys, where):
    """The key works either way; only the command-line form warns that other users can see it."""
    import uvicorn

    from deltakit_cli.main import main

    seen = {}

    def fake_run(app, **kwargs):
        with TestClient(app) as c:
            seen["no_key"] = c.get("/health").status_code
            seen["key"] = c.get("/health", headers={"Authorization": "Bearer envk3y"}).status_code

    monkeypatch.setattr(uvicorn, "run", fake_run)
    argv = ["serve", str(fleet["base"])]
    if where == "env":
        monkeypatch.setenv("DELTAKIT_API_KEY", "envk3y")
    else:
        monkeypatch.delenv("DELTAKIT_API_KEY", raising=False)
        argv += ["--api-key", "envk3y"]
    main(argv)
    err = capsys.readouterr().err
    assert seen == {"no_key": 401, "key": 200}
    assert ("visible to every local user" in err) == (where == "argument")
    assert "envk3y" not in err and os.environ.get("DELTAKIT_API_KEY") in (None, "envk3y")


def test_streaming_request_for_an_unknown_model_is_refused_before_the_stream(client):
    with client.stream(
        "POST", "/v1/completions", json={**OK, "model": "no-such", "stream": True}
    ) as response:
        assert response.status_code == 404  # refused before the stream starts
        assert json.loads(response.read())["error"]["code"] == "model_not_found"
