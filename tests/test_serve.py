"""ponder serve against a live server on a free loopback port (the built-in models, started once
per session by conftest's ``serve_server``) with the official ``openai`` client and raw HTTP;
engine failures and timeouts on an in-process server over scripted models."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

for _mod in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_mod)

import httpx  # noqa: E402
import openai  # noqa: E402

from ponder.grading import extract_answer  # noqa: E402
from ponder.serve.presets import AUTO_PRESETS, FIXED_PRESETS  # noqa: E402
from ponder.testing.serve import SERVE_KEY  # noqa: E402

MODEL = "policy-small"
EASY = "Compute 17 - 12."
MEDIUM = "Compute 3 * (4 + 5) - 7."


@pytest.fixture(scope="module")
def client(serve_server):
    return openai.OpenAI(base_url=serve_server.url + "/v1", api_key=SERVE_KEY, max_retries=0, timeout=120)


def _auth():
    return {"Authorization": f"Bearer {SERVE_KEY}"}


def _health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def _hung_up(server) -> float:
    """Chat requests the server saw the client hang up on (status 499 in /metrics)."""
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith('ponder_requests_total{endpoint="chat",status="499"}'):
            return float(line.split()[-1])
    return 0.0


def _wait_idle(server, start: dict, timeout_s: float = 90.0) -> dict:
    """Poll /health until no search is live or queued, no request in flight, and both models'
    KV blocks in use are back at ``start``'s."""
    deadline = time.monotonic() + timeout_s
    while True:
        h = _health(server)
        if (h["live"] == 0 and h["queued"] == 0 and h["in_flight"] == 0
                and h["policy_kv_blocks_in_use"] == start["policy_kv_blocks_in_use"]
                and h["prm_kv_blocks_in_use"] == start["prm_kv_blocks_in_use"]):
            return h
        if time.monotonic() > deadline:
            return h
        time.sleep(0.25)


# ---------------------------------------------------------------- the openai client


@pytest.mark.slow
def test_models_and_health(serve_server, client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == MODEL and f"{MODEL}:dvts-16" in ids
    h = _health(serve_server)
    assert h["status"] == "ok" and h["model"] == MODEL and h["policy_kv_blocks_free"] > 0


@pytest.mark.slow
def test_chat_plain_sampling(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": EASY}], seed=3)
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prm_tokens == 0  # plain sampling never calls the PRM
    assert r.model_extra["ponder"]["seed"] == 3 and "method" not in r.model_extra["ponder"]
    # the same seed gives the same sample; a plain request is a normal completion
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": EASY}], seed=3)
    assert again.choices[0].message.content == c.message.content


@pytest.mark.slow
def test_plain_n_samples_and_max_tokens(client):
    msgs = [{"role": "user", "content": EASY}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, n=3, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2] and all(c.message.content for c in r.choices)
    short = client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": "Compute (2 + 3) * (4 + 5) - 6 * 7."}], max_tokens=3, seed=5)
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens < r.usage.completion_tokens


# ---------------------------------------------------------------- /v1/completions: raw continuation


def _tokenizer():
    from ponder.hf.policy import load_tokenizer
    from ponder.toy.builtin import resolve_model

    return load_tokenizer(resolve_model("builtin:policy-small"))


def _policy_tokens(problem: str) -> list[int]:
    """The built-in policy's prompt for ``problem`` (its chat template writes the BOS)."""
    tok = _tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": problem}], tokenize=False, add_generation_prompt=True)
    return list(tok.encode(text, add_special_tokens=False))


@pytest.mark.slow
def test_raw_completion_continues_token_ids_and_stops(client):
    """No search: the prompt is continued as it is (vLLM's semantics). Greedy continuation of the
    built-in policy's own prompt is its first reasoning step; the matched stop string is cut
    (stop_reason names it) unless include_stop_str_in_output; EOS is finish "stop" with
    stop_reason None; max_tokens is finish "length"; usage counts prompt and generated ids."""
    ids = _policy_tokens(MEDIUM)
    extra = {"return_token_ids": True, "skip_special_tokens": False}
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=64, stop=["\n\n"], temperature=0,
                                  extra_body=extra)
    c = r.choices[0].model_dump()
    assert c["finish_reason"] == "stop" and c["stop_reason"] == "\n\n" and c["text"] and "\n\n" not in c["text"]
    assert c["prompt_token_ids"] == ids and r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(c["token_ids"]) and r.usage.prm_tokens == 0
    kept = client.completions.create(model=MODEL, prompt=ids, max_tokens=64, stop="\n\n", temperature=0,
                                     extra_body={**extra, "include_stop_str_in_output": True})
    assert kept.choices[0].text == c["text"] + "\n\n"
    assert kept.choices[0].model_dump()["token_ids"] == c["token_ids"]
    # no stop: the whole greedy solution, ending at EOS (kept in token_ids, not in the text)
    full = client.completions.create(model=MODEL, prompt=ids, max_tokens=400, temperature=0, extra_body=extra)
    f = full.choices[0].model_dump()
    assert f["finish_reason"] == "stop" and f["stop_reason"] is None and f["token_ids"][-1] == 6
    assert f["text"].startswith(kept.choices[0].text) and "\\boxed{" in f["text"]
    cut = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, extra_body=extra)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].model_dump()["token_ids"] == f["token_ids"][:2]
    # text prompts are tokenized with the tokenizer's special tokens (add_special_tokens, as vLLM)
    text = client.completions.create(model=MODEL, prompt="Compute 2 + 2.", max_tokens=4, temperature=0,
                                     extra_body={"return_token_ids": True})
    want = list(_tokenizer().encode("Compute 2 + 2.", add_special_tokens=True))
    assert text.choices[0].model_dump()["prompt_token_ids"] == want and text.usage.prompt_tokens == len(want)


@pytest.mark.slow
def test_raw_completion_samples_seeds_and_batched_prompts(client):
    ids = _policy_tokens(EASY)
    hard = _policy_tokens(MEDIUM)
    r = client.completions.create(model=MODEL, prompt=hard, n=4, seed=9, temperature=2.0, max_tokens=48)
    again = client.completions.create(model=MODEL, prompt=hard, n=4, seed=9, temperature=2.0, max_tokens=48)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    assert len({c.text for c in r.choices}) > 1  # n independent samples
    two = client.completions.create(model=MODEL, prompt=[ids, hard], n=2, temperature=0, max_tokens=8)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text != two.choices[2].text == two.choices[3].text
    assert two.usage.prompt_tokens == len(ids) + len(hard)


@pytest.mark.slow
def test_raw_completions_run_beside_searches(serve_server, client):
    """Continuations and searches share the policy (a continuation batch holds the engine's step
    lock): run together they give what they give alone, and every KV block comes back."""
    start = _wait_idle(serve_server, {"policy_kv_blocks_in_use": 0, "prm_kv_blocks_in_use": 0})
    ids = _policy_tokens(MEDIUM)
    alone = client.completions.create(model=MODEL, prompt=ids, max_tokens=200, temperature=0).choices[0].text
    msgs = [{"role": "user", "content": EASY}]
    search = {"search": {"method": "best_of_n", "n": 4}}
    searched_alone = client.chat.completions.create(model=MODEL, messages=msgs, seed=3, extra_body=search)
    out: dict = {}

    def raw(k):
        out[k] = client.completions.create(model=MODEL, prompt=ids, max_tokens=200, temperature=0).choices[0].text

    def searched():
        out["search"] = client.chat.completions.create(model=MODEL, messages=msgs, seed=3, extra_body=search)

    threads = [threading.Thread(target=searched), threading.Thread(target=raw, args=(0,)),
               threading.Thread(target=raw, args=(1,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out[0] == out[1] == alone
    assert out["search"].choices[0].message.content == searched_alone.choices[0].message.content
    h = _wait_idle(serve_server, start)
    assert (h["in_flight"], h["policy_kv_blocks_in_use"], h["prm_kv_blocks_in_use"]) == (
        0, start["policy_kv_blocks_in_use"], start["prm_kv_blocks_in_use"])


@pytest.mark.slow
def test_raw_completion_refusals(serve_server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1, 99999])
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1, 4], max_tokens=5000)
    assert e.value.body["param"] == "max_tokens" and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", stop=["a", "b", "c", "d", "e"])
    assert e.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", n=4, extra_body={"echo": True})
    assert e.value.body["param"] == "echo"
    with pytest.raises(openai.BadRequestError) as e:  # a search takes a problem, not token ids
        client.completions.create(model=f"{MODEL}:best_of_n-2", prompt=[1, 4, 8])
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:  # stop is a raw-continuation field
        client.completions.create(model=MODEL, prompt=EASY, stop="\n", extra_body={"search": {"n": 2}})
    assert e.value.body["param"] == "stop"
    h = _wait_idle(serve_server, {"policy_kv_blocks_in_use": 0, "prm_kv_blocks_in_use": 0})
    assert (h["in_flight"], h["policy_kv_blocks_in_use"]) == (0, 0)


@pytest.mark.slow
def test_completions_extra_body_search(client):
    r = client.completions.create(model=MODEL, prompt=EASY, seed=1,
                                  extra_body={"search": {"method": "best_of_n", "n": 4}})
    p = r.model_extra["ponder"]
    assert p["method"] == "best_of_n" and p["config"]["n"] == 4
    text = r.choices[0].text
    assert extract_answer(text) == p["answer"]
    # usage counts every path: 4 sampled solutions, each scored by the PRM step by step
    assert r.usage.prm_tokens == r.usage.completion_tokens
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": EASY}], seed=1)
    assert r.usage.completion_tokens > plain.usage.completion_tokens


@pytest.mark.slow
def test_gated_early_stop_through_the_api(client):
    """search.early_stop as an object, with the PRM gate: majority then reads PRM scores (usage
    counts them) and the response says how the vote stopped."""
    es = {"threshold": 0.95, "round_size": 2, "futility": 0.25, "futility_score": 0.1}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": EASY}], seed=5,
                                       extra_body={"search": {"method": "majority", "n": 8, "early_stop": es}})
    p = r.model_extra["ponder"]
    assert p["method"] == "majority" and p["config"]["early_stop"] == es
    assert p["chosen"]["futility_score"] == 0.1 and p["chosen"]["stopped_by"] in ("settled", "futility", None)
    assert 2 <= p["chosen"]["n"] <= 8
    assert r.usage.prm_tokens > 0  # the gate's scores


@pytest.mark.slow
def test_model_suffix_and_reasoning_effort(serve_server, client):
    r = client.chat.completions.create(model=f"{MODEL}:beam_search-4", messages=[{"role": "user", "content": EASY}],
                                       seed=2)
    p = r.model_extra["ponder"]
    assert (p["method"], p["config"]["n"], p["config"]["beam_width"]) == ("beam_search", 4, 4)
    assert r.model == f"{MODEL}:beam_search-4"
    # search fields override the suffix
    r = client.chat.completions.create(model=f"{MODEL}:best_of_n-8", messages=[{"role": "user", "content": EASY}],
                                       extra_body={"search": {"n": 2}})
    assert r.model_extra["ponder"]["config"]["n"] == 2
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": EASY}],
                                       reasoning_effort="low", seed=4)
    from ponder.serve.app import auto_available

    preset = (AUTO_PRESETS if auto_available() else FIXED_PRESETS)["low"]
    assert r.model_extra["ponder"]["method"] == preset["method"]
    none = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": EASY}],
                                          reasoning_effort="minimal")
    assert "method" not in none.model_extra["ponder"]


@pytest.mark.slow
def test_n_distinct_answers_and_candidates(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": MEDIUM}], n=3, seed=11, temperature=1.0,
        extra_body={"search": {"method": "weighted_best_of_n", "n": 8}, "return_candidates": True},
    )
    p = r.model_extra["ponder"]
    cands, votes = p["candidates"], p["votes"]
    assert len(cands) == 8 and all(len(c["step_scores"]) == len(c["steps"]) for c in cands)
    answered = [c for c in cands if c["answer"] is not None]
    assert sum(v["votes"] for v in votes) == len(answered)
    assert len(r.choices) == min(3, len(votes))
    answers = [extract_answer(c.message.content) for c in r.choices]
    assert len(set(answers)) == len(answers), answers  # distinct answers
    assert answers[0] == p["answer"] == votes[0]["answer"]
    for i, ch in enumerate(r.choices):
        cand = cands[p["chosen_candidates"][i]]
        assert ch.message.content == cand["text"]
        same = [c["score"] for c in answered if c["answer"] == cand["answer"]]
        if i > 0:  # the best solution of its answer
            assert cand["score"] == max(same)
        assert votes[i]["votes"] == len(same)
    # weighted vote: the runners-up are ordered by their summed scores
    weights = [v["weight"] for v in votes[1:]]
    assert weights == sorted(weights, reverse=True)


@pytest.mark.slow
def test_stream_chat_matches_non_streamed(client):
    msgs = [{"role": "user", "content": EASY}]
    search = {"search": {"method": "best_of_n", "n": 2}}
    full = client.chat.completions.create(model=MODEL, messages=msgs, seed=7, extra_body=search)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, seed=7, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=search))
    progress = [c.model_extra["ponder"] for c in chunks if c.choices and (c.model_extra or {}).get("ponder")]
    assert progress and [p["iteration"] for p in progress] == list(range(1, len(progress) + 1))
    assert all(c.choices[0].delta.content == "" for c in chunks if c.choices and (c.model_extra or {}).get("ponder"))
    assert progress[-1]["best_score"] is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


@pytest.mark.slow
def test_stream_completions_raw_sse(serve_server):
    body = {"model": MODEL, "prompt": EASY, "stream": True, "seed": 1}
    with httpx.stream("POST", serve_server.url + "/v1/completions", json=body, headers=_auth(), timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    objs = [json.loads(x[len("data: "):]) for x in lines[:-1]]
    assert all(o["object"] == "text_completion" for o in objs)
    assert "".join(o["choices"][0]["text"] for o in objs if o["choices"])


@pytest.mark.slow
def test_errors_as_openai_exceptions(serve_server, client):
    msgs = [{"role": "user", "content": EASY}]
    bad_key = openai.OpenAI(base_url=serve_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model=MODEL, messages=msgs)
    assert httpx.get(serve_server.url + "/v1/models").status_code == 401  # missing key
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=msgs)
    assert e.value.body["param"] == "model"
    cases = [
        ({"search": {"n": 0}}, "search.n"),
        ({"search": {"method": "dvts", "n": 6, "beam_width": 4}}, "search.n"),
        ({"search": {"method": "nope"}}, "search.method"),
        ({"search": {"bogus": 1}}, "search.bogus"),
        ({"search": {"strategy": "/etc/passwd", "method": "auto"}}, "search.strategy"),
        ({"search": {"sampling": {"temperature": -1}}}, "search.sampling.temperature"),
        ({"search": {"n": 64}}, "search.n"),  # above --max-search-n
        ({"search": {"max_steps": 100}}, "search.max_steps"),
        ({"search": {"agg": 3}}, "search.agg"),
        ({"search": {"sampling": None}}, "search.sampling"),
        ({"search": {"seed": -1}}, "search.seed"),
        ({"search": {"method": "beam_search", "early_stop": 0.9}}, "search.early_stop"),
        ({"search": {"method": "majority", "early_stop": {"futility": 0.2, "futility_score": 2}}},
         "search.early_stop.futility_score"),
        ({"search": {"method": "majority", "early_stop": {"futility_score": 0.1}}}, "search.early_stop.futility_score"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"stop": ["\n"]}, "stop"),
        ({"n": 5}, "n"),  # above --max-choices
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=msgs, extra_body=extra)
        assert e.value.body["param"] == param, (extra, e.value.body)
        assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=f"{MODEL}:quantum-4", messages=msgs)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": EASY}], temperature=7)
    assert e.value.body["param"] == "temperature"
    r = httpx.post(serve_server.url + "/v1/chat/completions", content=b"{not json", headers=_auth())
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


@pytest.mark.slow
def test_metrics(serve_server, client):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": EASY}])
    text = httpx.get(serve_server.url + "/metrics").text
    for needle in ('ponder_requests_total{endpoint="chat",status="200"}', "ponder_request_latency_seconds_bucket",
                   'ponder_tokens_total{kind="completion"}', 'ponder_kv_blocks_in_use{model="policy"}',
                   "ponder_engine_preemptions_total", 'ponder_engine_searches{state="queued"}',
                   "ponder_in_flight_requests"):
        assert needle in text, needle
    done = [line for line in text.splitlines() if line.startswith('ponder_requests_total{endpoint="chat",status="200"}')]
    assert float(done[0].split()[-1]) >= 1


# ---------------------------------------------------------------- disconnects, a full queue


SLOW = {"model": MODEL, "messages": [{"role": "user", "content": "Compute (12 + 7) * 3 - (4 + 5) * 2."}],
        "search": {"method": "beam_search", "n": 8, "beam_width": 4, "num_iterations": 8, "lookahead": 2,
                   "sampling": {"temperature": 3.0}}, "seed": 1}  # 5-15 s of search on 2 CPU cores


@pytest.mark.slow
def test_disconnect_mid_search_frees_every_kv_block(serve_server):
    start = _wait_idle(serve_server, _health(serve_server) | {"policy_kv_blocks_in_use": 0, "prm_kv_blocks_in_use": 0})
    assert start["policy_kv_blocks_in_use"] == 0 and start["prm_kv_blocks_in_use"] == 0
    # a non-streamed request whose client hangs up once its search holds KV blocks
    import socket

    hung = _hung_up(serve_server)

    body = json.dumps(SLOW).encode()
    sock = socket.create_connection(("127.0.0.1", serve_server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + SERVE_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.monotonic() + 60
    while True:
        h = _health(serve_server)
        if h["live"] >= 1 and h["policy_kv_blocks_in_use"] > 0 and h["prm_kv_blocks_in_use"] > 0:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.02)
    sock.close()
    cancelled_before = h["finished"]
    after = _wait_idle(serve_server, start)
    assert after["finished"] == cancelled_before + 1  # it ended, not still running
    assert _hung_up(serve_server) == hung + 1  # because the server saw the hang-up (and cancelled it)
    assert (after["live"], after["in_flight"], after["policy_kv_blocks_in_use"], after["prm_kv_blocks_in_use"]) == (
        0, 0, 0, 0), after
    assert after["policy_kv_blocks_free"] == start["policy_kv_blocks_free"]
    assert after["prm_kv_blocks_free"] == start["prm_kv_blocks_free"]


@pytest.mark.slow
def test_full_queue_429_then_stream_disconnects_free_kv(serve_server, client):
    start = _wait_idle(serve_server, {"policy_kv_blocks_in_use": 0, "prm_kv_blocks_in_use": 0})
    streams, contexts = [], []
    hung = _hung_up(serve_server)
    try:
        for _ in range(3):  # --max-queue 3
            cm = httpx.stream("POST", serve_server.url + "/v1/chat/completions", json=SLOW | {"stream": True},
                              headers=_auth(), timeout=120)
            r = cm.__enter__()
            contexts.append(cm)
            assert r.status_code == 200
            streams.append(r.iter_lines())
        for lines in streams:  # every search is running: a progress chunk arrives
            for line in lines:
                if line.startswith("data: ") and '"ponder"' in line:
                    break
        raw = httpx.post(serve_server.url + "/v1/chat/completions", json={**SLOW, "search": None}, headers=_auth())
        assert raw.status_code == 429 and int(raw.headers["Retry-After"]) >= 1
        assert raw.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": EASY}])
        assert _health(serve_server)["policy_kv_blocks_in_use"] > 0
    finally:
        for cm in contexts:  # disconnect mid-search
            cm.__exit__(None, None, None)
    after = _wait_idle(serve_server, start)
    assert (after["live"], after["queued"], after["in_flight"]) == (0, 0, 0), after
    assert _hung_up(serve_server) == hung + 3  # each stream's search was cancelled on the hang-up
    assert (after["policy_kv_blocks_in_use"], after["prm_kv_blocks_in_use"]) == (0, 0), after
    # and the server still answers
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": EASY}])
    assert ok.choices[0].message.content


# ---------------------------------------------------------------- in-process: failures and timeouts


class ScriptedPolicy:
    """Answers ``\\boxed{4}`` in one step; a problem containing ``boom`` raises in the engine,
    ``slow`` takes 0.1 s per step and never finishes, ``stuck`` blocks 2.5 s in its first step."""

    kv_block_size = 16

    def __init__(self) -> None:
        self.problem: dict[int, str] = {}

    def start(self, root_ids, problems):
        for r, p in zip(root_ids, problems):
            self.problem[int(r)] = p
        return [[1, 2, 3] for _ in root_ids]

    def sample_steps(self, parent_ids, child_ids, params):
        from ponder.protocols import Step

        out = []
        for p, c in zip(parent_ids, child_ids):
            text = self.problem[int(p)]
            self.problem[int(c)] = text
            if "boom" in text:
                raise RuntimeError("scripted engine failure")
            if "stuck" in text:
                time.sleep(2.5)
            if "slow" in text or "stuck" in text:
                time.sleep(0.1)
                out.append(Step([5, 6], "more\n\n"))
            else:
                out.append(Step([7, 8], "\\boxed{4}", eos=True))
        return out

    def rollout(self, node_ids, num_steps, params):
        return [[] for _ in node_ids]

    def release(self, node_ids):
        for x in node_ids:
            self.problem.pop(int(x), None)


@pytest.fixture(scope="module")
def scripted_server():
    import socket

    import uvicorn

    from ponder.engine import AsyncEngine
    from ponder.serve.app import ServeSettings, create_app

    engine = AsyncEngine(ScriptedPolicy(), None)
    settings = ServeSettings(model_name="scripted", request_timeout_s=1.0, hard_timeout_slack_s=0.5,
                             auto_available=False)
    app = create_app(engine, settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def _ask(url: str, problem: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"model": "scripted", "messages": [
        {"role": "user", "content": problem}]}, timeout=30)


def test_engine_failure_is_500_and_server_survives(scripted_server):
    ok = _ask(scripted_server, "Compute 2 + 2.")
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "\\boxed{4}"
    bad = _ask(scripted_server, "boom")
    assert bad.status_code == 500
    err = bad.json()["error"]
    assert err["type"] == "server_error" and "scripted engine failure" in err["message"]
    again = _ask(scripted_server, "Compute 2 + 2.")
    assert again.status_code == 200
    # a search method needs a PRM this server lacks: the request's mistake, not the server's
    r = httpx.post(scripted_server + "/v1/chat/completions", json={"model": "scripted", "messages": [
        {"role": "user", "content": "x"}], "search": {"method": "beam_search"}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "search.method"


def test_request_timeout_answers_with_what_it_has(scripted_server):
    t0 = time.monotonic()
    r = _ask(scripted_server, "slow")
    assert r.status_code == 200 and time.monotonic() - t0 < 10
    body = r.json()
    assert body["ponder"]["stopped"] == "timeout"
    assert body["choices"][0]["finish_reason"] == "length"


def test_hard_timeout_is_504(scripted_server):
    r = _ask(scripted_server, "stuck")
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    time.sleep(3)  # the stuck step ends; the cancelled search is freed
    assert _ask(scripted_server, "Compute 2 + 2.").status_code == 200
    h = httpx.get(scripted_server + "/health").json()
    assert (h["live"], h["queued"], h["in_flight"]) == (0, 0, 0)


# ---------------------------------------------------------------- the command


def test_serve_without_extra_says_how_to_install():
    code = ("import sys; sys.modules['fastapi'] = None; from ponder.cli import main; sys.exit(main(['serve']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "ponder[serve]"' in lines[0]


def test_serve_bad_flag_is_one_line():
    p = subprocess.run([sys.executable, "-m", "ponder", "serve", "--max-queue", "0"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "ponder serve: error: --max-queue 0 is out of range"


_SIGTERM_SERVER = r"""
import sys
sys.path.insert(0, {tests!r})
from test_serve import ScriptedPolicy
from ponder.engine import AsyncEngine
from ponder.serve.app import ServeSettings, create_app
from ponder.serve.cli import run_server, server_config
app = create_app(AsyncEngine(ScriptedPolicy(), None), ServeSettings(model_name="scripted", auto_available=False))
sys.exit(0 if run_server(app, server_config(app, "127.0.0.1", {port}, {grace}), {grace}, "ready") else 1)
"""


@pytest.mark.slow
def test_sigterm_cancels_in_flight_within_grace(tmp_path):
    """SIGTERM with a search in flight: it is cancelled after the grace period and its request
    answers with what it had; the process exits 0."""
    import os
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    grace = 3.0
    code = _SIGTERM_SERVER.format(tests=os.path.dirname(__file__), port=port, grace=grace)
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.3)
        got: dict = {}

        def ask():
            got["r"] = _ask(url, "slow")  # never finishes by itself (the server's timeout is 300 s)

        t = threading.Thread(target=ask)
        t.start()
        while httpx.get(url + "/health", timeout=2).json()["live"] == 0:
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        waited = time.monotonic() - t0
        assert proc.wait(30) == 0
        r = got["r"]
        assert r.status_code == 200
        assert r.json()["ponder"]["stopped"] == "cancelled"
        assert grace - 1.5 <= waited <= grace + 5, waited
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _serve_examples() -> list[tuple[str, str]]:
    """The openai client examples: docs/serve.md's first python block, and README.md's
    "Serve it" section's python block once the README has one."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    block = re.compile(r"```python\n(.*?)```", re.S)
    out = [("docs/serve.md", block.search((root / "docs" / "serve.md").read_text()).group(1))]
    readme = (root / "README.md").read_text()
    if "## Serve it" in readme:
        section = readme.split("## Serve it", 1)[1].split("\n## ", 1)[0]
        m = block.search(section)
        if m:
            out.append(("README.md", m.group(1)))
    return out


@pytest.mark.slow
def test_client_examples_run(serve_server, capsys):
    for where, code in _serve_examples():
        assert "http://127.0.0.1:8000/v1" in code, where
        code = code.replace("http://127.0.0.1:8000/v1", serve_server.url + "/v1").replace(
            'api_key="none"', f'api_key="{SERVE_KEY}"')
        exec(compile(code, f"{where} serve example", "exec"), {"__name__": "example"})
        printed = capsys.readouterr().out
        assert "\\boxed{" in printed, (where, printed)


# ---------------------------------------------------------------- the continuation thread, in-process


def test_continuer_cancel_and_kv_blocks():
    """A request cancelled while its batch decodes stops at the next token (partial choices); one
    cancelled while waiting is dropped; every KV block is back afterwards; greedy output equals
    HFPolicy's own greedy step."""
    from ponder.engine import Engine
    from ponder.hf.policy import HFPolicy
    from ponder.protocols import SamplingParams
    from ponder.serve.continuation import Continuation, Continuer

    policy = HFPolicy("builtin:policy-small", device="cpu", kv_budget=4096)
    engine = Engine(policy)
    cont = Continuer(engine)
    try:
        ids = policy.prompt_tokens(MEDIUM)
        greedy = cont.submit(Continuation([ids], max_tokens=96, stops=("\n\n",), include_stop=True,
                                          temperature=0)).result(60)
        policy.start([0], [MEDIUM])
        (step,) = policy.sample_steps([0], [1], SamplingParams(temperature=0, max_step_tokens=96))
        policy.release([0, 1])
        assert greedy[0].tokens == step.tokens and greedy[0].text == step.text
        with engine._step_lock:  # hold the batch back: both wait; one is cancelled while waiting
            # greedy, this prompt runs to the token limit (900 tokens, ~10 s) unless cancelled
            long = Continuation([policy.tokenizer.encode("(((((")], n=2, max_tokens=900, temperature=0)
            dropped = Continuation([ids], max_tokens=8, temperature=0)
            cont.submit(long)
            cont.submit(dropped)
            dropped.cancel()
            time.sleep(0.05)
        time.sleep(0.3)
        long.cancel()
        choices = long.future.result(60)
        assert dropped.future.cancelled()
        assert len(choices) == 2 and all(0 < len(c.tokens) < 900 and c.finish_reason == "length" for c in choices)
        assert all(6 not in c.tokens for c in choices)  # cut by the cancel, not by EOS
        deadline = time.monotonic() + 10
        while policy.kv.stats()["blocks_in_use"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert policy.kv.stats()["blocks_in_use"] == 0
    finally:
        cont.close()
