"""Per-request isolation and batch determinism.

- a failing request never fails its batch-mates (scheduler and HTTP);
- a client that disconnects stops its generation (streaming and non-streaming);
- what a batched request promises relative to the same request alone (docs/serving.md, "Batches and
  determinism"): the same greedy text, and last-position logits within ``LOGIT_ATOL`` (fp32).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from test_runtime_support import cached_fleet

from deltakit.errors import NotFoundError, UsageError
from deltakit.runtime import SamplingParams, ServingEngine, create_app
from deltakit.runtime.generate import GenerationRequest
from deltakit.runtime.scheduler import Job

PROMPTS = ("hello there", "the quick brown fox jumps", "deltas!")
MAX_TOKENS = 8
#: documented bound on |logit(batched) - logit(alone)| for fp32 models (docs/serving.md)
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def fleet() -> dict:
    return cached_fleet("llama")


@pytest.fixture(scope="module")
def engine(fleet):
    eng = ServingEngine.from_base(fleet["base"], deltas={n: str(p) for n, p in fleet["delta"].items()})
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    """The app under uvicorn on 127.0.0.1 (a real socket, so that disconnects are real)."""
    import uvicorn

    config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    srv.should_exit = True
    thread.join(timeout=10)


def _job(engine, model, prompt, **params) -> Job:
    ids = engine.tokenizer(prompt).input_ids
    return Job(model, GenerationRequest(ids, SamplingParams(MAX_TOKENS, **{"temperature": 0, **params})))


def _alone(engine, model, prompt) -> str:
    job = _job(engine, model, prompt)
    engine.scheduler.run_batch([job])
    return job.future.result().text


def test_failing_requests_do_not_fail_their_batch_mates(engine):
    good = [("dqrelo-0", PROMPTS[0]), (None, PROMPTS[1]), ("svd-2", PROMPTS[2]), ("bitdelta-1", PROMPTS[1])]
    expected = [_alone(engine, m, p) for m, p in good]
    jobs = [_job(engine, m, p) for m, p in good]
    bad_seed = _job(engine, "dqrelo-0", PROMPTS[0])
    object.__setattr__(bad_seed.request.params, "seed", 2**70)  # bypasses validation, as a buggy caller might
    unloaded = _job(engine, "gone", PROMPTS[0])
    bad_token = _job(engine, "svd-2", PROMPTS[0])
    bad_token.request.prompt_ids = [1, 2, 10**6]  # out of the vocabulary: the batched forward raises

    def hang_up(_text: str) -> None:
        raise BrokenPipeError("client went away")

    broken_stream = _job(engine, None, PROMPTS[2])
    broken_stream.request.on_text = hang_up
    batch = [jobs[0], bad_seed, jobs[1], unloaded, jobs[2], bad_token, broken_stream, jobs[3]]
    engine.scheduler.run_batch(batch)
    assert [j.future.result().text for j in jobs] == expected
    with pytest.raises(UsageError, match="seed"):
        bad_seed.future.result()
    with pytest.raises(NotFoundError):
        unloaded.future.result()
    with pytest.raises(IndexError):
        bad_token.future.result()
    assert broken_stream.future.result().finish_reason == "cancelled"


def test_http_request_with_a_huge_seed_gets_400_while_the_others_complete(engine, server):
    bodies = [
        {"model": m, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0}
        for m, p in [("dqrelo-0", PROMPTS[0]), ("base", PROMPTS[1]), ("svd-2", PROMPTS[2])]
    ]
    bodies.insert(1, {**bodies[0], "seed": 2**70, "temperature": 1.0})
    expected = [_alone(engine, None if b["model"] == "base" else b["model"], b["prompt"]) for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(
            pool.map(lambda b: httpx.post(f"{server}/v1/completions", json=b, timeout=60), bodies)
        )
    assert [r.status_code for r in responses] == [200, 400, 200, 200]
    assert "seed" in responses[1].json()["error"]["message"]
    for i in (0, 2, 3):
        assert responses[i].json()["choices"][0]["text"] == expected[i]


@pytest.fixture
def slow_model(engine):
    """Each forward pass of the resident model takes at least 20 ms (so a generation outlives a client)."""
    handle = engine.runtime.model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    yield
    handle.remove()


def _wait_for_cancelled(engine, before: int, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reasons = [r for b in engine.scheduler.batches[before:] for r in b.finish_reasons]
        if reasons:
            return reasons
        time.sleep(0.05)
    return []


def test_streaming_client_disconnect_stops_generation(engine, server, slow_model):
    before = len(engine.scheduler.batches)
    body = {"model": "dqrelo-0", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "stream": True}
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{server}/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    assert _wait_for_cancelled(engine, before) == ["cancelled"]


def test_non_streaming_client_disconnect_stops_generation(engine, server, slow_model):
    before = len(engine.scheduler.batches)
    body = {"model": "svd-2", "prompt": PROMPTS[1], "max_tokens": 200, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/completions", json=body, timeout=0.5)
    assert _wait_for_cancelled(engine, before) == ["cancelled"]


def _last_logits(model, prompts: list[list[int]], pad: int) -> torch.Tensor:
    """Last-position logits of left-padded prompts, positions from the mask (as generate does)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()


def test_batched_request_matches_the_same_request_alone(engine):
    """Mixed-delta and same-delta batches (left padding, other rows) against each request alone."""
    rt, tok = engine.runtime, engine.tokenizer
    combos = [("dqrelo-0", 0), (None, 1), ("bitdelta-1", 2), ("svd-2", 1), ("lossless-3", 0), ("dqrelo-0", 2)]
    ids = [tok(PROMPTS[p]).input_ids for _, p in combos]
    alone = []
    for (model, _), row in zip(combos, ids, strict=True):
        rt.activate(model)
        alone.append(_last_logits(rt.model, [row], tok.pad_token_id)[0])
    with engine.executor.assign([m for m, _ in combos]):
        mixed = _last_logits(rt.model, ids, tok.pad_token_id)
    rt.activate("dqrelo-0")
    same_rows = [i for i, (m, _) in enumerate(combos) if m == "dqrelo-0"]
    merged = _last_logits(rt.model, [ids[i] for i in same_rows], tok.pad_token_id)
    gaps = [float((mixed[i] - alone[i]).abs().max()) for i in range(len(combos))]
    gaps += [float((merged[j] - alone[i]).abs().max()) for j, i in enumerate(same_rows)]
    assert max(gaps) <= LOGIT_ATOL, gaps
    assert all(torch.equal(mixed[i].argmax(), alone[i].argmax()) for i in range(len(combos)))

    # greedy text: in a mixed batch and in a same-delta batch, equal to the request alone
    expected = [_alone(engine, m, PROMPTS[p]) for m, p in combos]
    jobs = [_job(engine, m, PROMPTS[p]) for m, p in combos]
    engine.scheduler.run_batch(jobs)
    assert engine.scheduler.batches[-1].path == "multi"
    assert [j.future.result().text for j in jobs] == expected
    same = [_job(engine, "dqrelo-0", p) for p in PROMPTS]
    engine.scheduler.run_batch(same)
    assert engine.scheduler.batches[-1].path == "merged"
    assert [j.future.result().text for j in same] == [_alone(engine, "dqrelo-0", p) for p in PROMPTS]


def test_seeded_sampling_in_a_batch_matches_alone(engine):
    """Seeded sampling uses a per-request generator: the batch-mates do not change its draws."""
    params = {"temperature": 1.0, "top_p": 0.9, "seed": 1234}
    alone = _job(engine, "bitdelta-1", PROMPTS[1], **params)
    engine.scheduler.run_batch([alone])
    jobs = [_job(engine, "svd-2", PROMPTS[0]), _job(engine, "bitdelta-1", PROMPTS[1], **params)]
    engine.scheduler.run_batch(jobs)
    assert jobs[1].future.result().token_ids == alone.future.result().token_ids


def test_failed_swap_over_http_leaves_health_and_base_truthful(engine, server, monkeypatch):
    """A swap that fails half way: the request gets a JSON error, /health says base, the base is served."""
    rt = engine.runtime
    base_text = _alone(engine, None, PROMPTS[0])
    original, calls = rt._write_param, [0]

    def failing(canonical, value):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("device write failed")
        original(canonical, value)

    monkeypatch.setattr(rt, "_write_param", failing)
    body = {"model": "bitdelta-1", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
    response = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert "serving the base" in response.json()["error"]["message"]
    assert httpx.get(f"{server}/health", timeout=10).json()["active"] is None
    base = httpx.post(f"{server}/v1/completions", json={**body, "model": "base"}, timeout=60).json()
    assert base["choices"][0]["text"] == base_text


def test_batch_failing_mid_stream_reruns_only_the_requests_that_streamed_nothing(engine):
    """A batch that fails after a few tokens: the streaming request (its client has text already) gets the
    error and is not re-run (no repeated text); the other request is re-run alone and completes."""
    expected = _alone(engine, "svd-2", PROMPTS[1])
    pieces: list[str] = []
    streaming = _job(engine, "svd-2", PROMPTS[0])
    streaming.request.on_text = pieces.append
    plain = _job(engine, "svd-2", PROMPTS[1])
    forwards = [0]

    def fail_batched_step(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[0] == 2:
            forwards[0] += 1
            if forwards[0] == 4:
                raise RuntimeError("device fault in step 4")

    handle = engine.runtime.model.register_forward_pre_hook(fail_batched_step, with_kwargs=True)
    try:
        engine.scheduler.run_batch([streaming, plain])
    finally:
        handle.remove()
    assert forwards[0] == 4 and pieces  # it failed after text was streamed
    with pytest.raises(RuntimeError, match="step 4"):
        streaming.future.result()
    assert plain.future.result().text == expected
    streamed = "".join(pieces)
    assert _alone(engine, "svd-2", PROMPTS[0]).startswith(streamed)  # a prefix, never repeated


def test_a_delta_with_overflowing_values_fails_its_request_alone_with_a_non_finite_error(fleet, tmp_path):
    """A delta whose manifest sets its MLP output projections' sign scale to 1e38 passes every check
    (finite, well-formed) but overflows the activations to NaN logits: its requests end in
    NonFiniteError (HTTP 400, non_finite_delta), not in tokens drawn from NaN logits (greedy decoding
    would pick a NaN's index), and the requests batched with them complete."""
    import json
    import shutil

    from deltakit.errors import NonFiniteError
    from deltakit.runtime.server import error_for

    hostile = Path(shutil.copytree(fleet["delta"]["dqrelo-0"], tmp_path / "hostile"))
    manifest = json.loads((hostile / "manifest.json").read_text())
    for name, entry in manifest["tensors"].items():
        if entry["kind"] == "encoded" and "down_proj" in name:
            entry["params"]["scale"] = 1e38
    (hostile / "manifest.json").write_text(json.dumps(manifest))
    eng = ServingEngine.from_base(
        fleet["base"], deltas={"hostile": str(hostile), "svd-2": str(fleet["delta"]["svd-2"])}
    )
    try:
        expected = [_alone(eng, m, p) for m, p in ((None, PROMPTS[0]), ("svd-2", PROMPTS[1]))]
        for params in ({}, {"temperature": 0.8, "seed": 1}):
            jobs = [_job(eng, None, PROMPTS[0]), _job(eng, "hostile", PROMPTS[2], **params)]
            jobs.append(_job(eng, "svd-2", PROMPTS[1]))
            eng.scheduler.run_batch(jobs)
            assert [jobs[0].future.result().text, jobs[2].future.result().text] == expected
            with pytest.raises(NonFiniteError, match="logits"):
                jobs[1].future.result()
            assert error_for(jobs[1].future.exception()).status_code == 400
        for prompt in PROMPTS:  # a streaming batch-mate that has sent text already is not failed with it
            pieces: list[str] = []
            streaming = _job(eng, "svd-2", prompt)
            streaming.request.on_text = pieces.append
            hostile_job = _job(eng, "hostile", PROMPTS[2])
            eng.scheduler.run_batch([streaming, hostile_job])
            assert eng.scheduler.batches[-1].finish_reasons[1] == "error"  # one batch, the row failed
            assert streaming.future.result().text == "".join(pieces) == _alone(eng, "svd-2", prompt)
            with pytest.raises(NonFiniteError):
                hostile_job.future.result()
    finally:
        eng.close()
