"""Hypothesis fuzz of raw HTTP bodies against the live ``ponder serve`` (conftest's
``serve_server``, built-in models, small limits): whatever the body, the answer is never a 5xx,
an error is OpenAI's error body, and the server still answers afterwards with no search,
request or KV block left behind."""

from __future__ import annotations

import json
import time

import pytest

for _mod in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_mod)

import httpx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ponder.testing.serve import SERVE_KEY  # noqa: E402

MODEL = "policy-small"
HEADERS = {"Authorization": f"Bearer {SERVE_KEY}"}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["majority", "best_of_n", "weighted_best_of_n", "beam_search", "dvts", "auto", "min", "prod",
                     "weighted", "low", "high", MODEL, f"{MODEL}:dvts-4", f"{MODEL}:best_of_n-2", "user"]),
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)

SEARCH_KEYS = ["method", "n", "beam_width", "num_iterations", "lookahead", "agg", "vote", "filter_duplicates",
               "sort_completed", "sampling", "seed", "compat_search_and_learn", "max_steps", "max_wall_s",
               "max_policy_tokens", "early_stop", "budget", "budget_tokens", "strategy", "nope"]
SAMPLING = st.dictionaries(st.sampled_from(["temperature", "top_p", "top_k", "max_step_tokens", "step_delimiter",
                                            "seed", "x"]), scalars, max_size=3)
search_objs = st.dictionaries(st.sampled_from(SEARCH_KEYS), st.one_of(scalars, SAMPLING), max_size=4)
TOP_KEYS = ["model", "messages", "prompt", "n", "temperature", "top_p", "top_k", "max_tokens", "stream", "seed",
            "reasoning_effort", "search", "return_candidates", "stop", "stream_options", "logprobs"]
messages = st.one_of(
    json_values,
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot"]),
                                    "content": st.one_of(st.text(max_size=30), st.just("Compute 2 + 3."), json_values)}),
             max_size=3),
)


@st.composite
def bodies(draw):
    """A nearly valid request with a few fields replaced, or any JSON value, or raw bytes."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Compute 2 + 3."}], "prompt": "Compute 4 - 1.",
            "seed": 1}
    for key in draw(st.lists(st.sampled_from(TOP_KEYS), max_size=4, unique=True)):
        if key == "search":
            value = draw(search_objs | json_values)
        elif key == "messages":
            value = draw(messages)
        else:
            value = draw(scalars | json_values)
        if draw(st.booleans()) and key not in ("model", "messages"):
            body.pop(key, None)
        else:
            body[key] = value
    if isinstance(body.get("search"), dict) and "max_wall_s" not in body["search"]:
        body["search"]["max_wall_s"] = 3  # a valid search stays short
    return json.dumps(body, allow_nan=True).encode()


STATUSES: dict[int, int] = {}  # what the fuzz got, to check it reached both answers and refusals


def _idle(url: str, timeout_s: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        h = httpx.get(url + "/health", timeout=10).json()
        if (h["live"], h["queued"], h["in_flight"], h["policy_kv_blocks_in_use"], h["prm_kv_blocks_in_use"]) == (
                0, 0, 0, 0, 0) or time.monotonic() > deadline:
            return h
        time.sleep(0.25)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=bodies(), endpoint=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def _fuzz_once(url: str, body: bytes, endpoint: str) -> None:
    with httpx.stream("POST", url + endpoint, content=body, headers=HEADERS | {"Content-Type": "application/json"},
                      timeout=120) as r:
        raw = r.read()
    assert r.status_code < 500, (r.status_code, body, raw[:500])
    STATUSES[r.status_code] = STATUSES.get(r.status_code, 0) + 1
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        assert raw.rstrip().endswith(b"data: [DONE]"), raw[-200:]
        for line in raw.decode().splitlines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk or chunk["error"]["type"] != "server_error", chunk
        return
    payload = json.loads(raw)
    if r.status_code == 200:
        assert payload["choices"] and "usage" in payload
    else:
        err = payload["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"]


@pytest.mark.slow
def test_fuzz_bodies_never_500_and_server_survives(serve_server):
    STATUSES.clear()
    _fuzz_once(serve_server.url)
    assert STATUSES.get(200, 0) >= 5 and sum(v for k, v in STATUSES.items() if 400 <= k < 500) >= 10, STATUSES
    h = _idle(serve_server.url)
    assert (h["live"], h["queued"], h["in_flight"]) == (0, 0, 0), h
    assert (h["policy_kv_blocks_in_use"], h["prm_kv_blocks_in_use"]) == (0, 0), h
    r = httpx.post(serve_server.url + "/v1/chat/completions", headers=HEADERS, timeout=120,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "Compute 2 + 3."}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    metrics = httpx.get(serve_server.url + "/metrics").text
    assert 'status="500"' not in metrics
