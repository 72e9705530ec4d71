"""The OpenAI-compatible HTTP app of ``ponder serve`` (FastAPI) over one ``AsyncEngine``.

    app = create_app(AsyncEngine(policy, prm), ServeSettings(model_name="policy-small"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /health`` (JSON: engine and KV numbers; no key needed), ``GET /metrics`` (Prometheus).

Contract of a completion request (docs/serve.md has the details):

* The search comes from, lowest priority first: ``reasoning_effort`` (``presets``), the
  model-name suffix (``policy-small:dvts-16``), the ``search`` object (any ``SearchConfig``
  field but ``strategy``). The request's ``temperature`` / ``top_p`` / ``top_k`` / ``seed``
  seed the search's sampling and seed; ``search.sampling`` / ``search.seed`` override them.
  None of them on chat: plain sampling (``majority`` with n = the request's ``n``, no PRM):
  choices are the n samples in order, ``max_tokens`` bounds each request's policy tokens.
  None of them on ``/v1/completions``: raw continuation of the prompt (text or token ids) on
  the policy model, as a plain completion server (``stop``, ``n``, vLLM's ``stop_reason`` /
  ``token_ids``), run by ``serve.continuation.Continuer`` under the engine's step lock.
* With a search, ``choices[0]`` is the solution the search chose; ``n > 1`` adds the best
  solution of each next-ranked distinct answer (at most ``n`` choices; fewer when the search
  found fewer distinct answers). ``usage``: prompt tokens (once), completion tokens = every
  policy token generated across the search, ``prm_tokens`` = tokens the PRM scored.
  ``ponder`` (always with a search): method, config, stopped, difficulty, chosen; with
  ``return_candidates: true`` also every candidate (text, step scores, score, answer) and
  the votes per answer.
* No seed given: a random one (reported in ``ponder.seed``), so repeated requests differ.
* Errors: OpenAI's error body; 400 malformed or refused (the field in ``param``), 401 key,
  404 model or route, 413 body too large, 422 schema, 429 queue full (``Retry-After``), 500
  engine failure (the server keeps serving), 503 shutting down, 504 past the hard timeout.
* A client that disconnects cancels its search (its nodes and KV blocks are freed by the
  engine); every search gets ``max_wall_s`` <= ``request_timeout_s`` (it then ends with
  what it has, ``finish_reason: "length"``), and a request still waiting
  ``hard_timeout_slack_s`` later is cancelled with 504.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import math
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..methods.config import IMPLIED_VOTE, SearchConfig, SearchResult
from .continuation import Continuation, ContinuationRefused, Continuer, supports_continuation
from .metrics import CONTENT_TYPE, Metrics
from .presets import effort_preset, listed_models, parse_model
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, Limits, config_dict, search_config


@dataclasses.dataclass
class ServeSettings:
    """How a server answers.

    model_name: the id clients send (and ``/v1/models`` lists). api_key: required as
    ``Authorization: Bearer KEY`` on ``/v1/*`` (None: no key). max_queue: requests in flight
    at once (searching or waiting for the engine); one more gets 429 with ``Retry-After:
    retry_after_s``. request_timeout_s: cap on every search's ``max_wall_s``.
    hard_timeout_slack_s: a request still unanswered this long after request_timeout_s is
    cancelled (504). limits: request size limits. defaults: ``search`` fields every search
    starts from (e.g. a task's step limits; ``sampling`` as a mapping). auto_available:
    ``method="auto"`` can load its strategy table (None: find out at startup); it picks the
    ``reasoning_effort`` presets. max_body_bytes: larger bodies get 413.
    """

    model_name: str = "policy-small"
    api_key: str | None = None
    max_queue: int = 64
    request_timeout_s: float = 300.0
    hard_timeout_slack_s: float = 30.0
    retry_after_s: int = 1
    limits: Limits = dataclasses.field(default_factory=Limits)
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    auto_available: bool | None = None
    max_body_bytes: int = 1 << 20


def auto_available(strategy: str | None = None) -> bool:
    """Whether ``method="auto"`` can load its strategy table (``strategy`` path or built-in)."""
    try:
        from ..methods.strategy import load_cached

        load_cached(strategy)
        return True
    except Exception:  # noqa: BLE001 - any failure: no table, fixed presets
        return False


class _ClientGone(Exception):
    pass


def _model_context(model) -> int | None:
    cfg = getattr(getattr(model, "model", None), "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def create_app(engine, settings: ServeSettings | None = None, *, close_engine: bool = True):
    """The FastAPI app serving ``engine`` (an ``AsyncEngine``) with ``settings``.

    close_engine: close the engine when the app shuts down (lifespan). ``app.state.drain(grace_s)``
    starts a graceful shutdown: new requests get 503 and searches still running after
    ``grace_s - 1`` seconds are cancelled (their requests answer with what they have)."""
    settings = settings or ServeSettings()
    if settings.auto_available is None:
        settings.auto_available = auto_available()
    inner = engine.engine
    policy, prm = inner.policy, inner.prm
    contexts = [c for c in (_model_context(policy), _model_context(prm)) if c is not None]
    if settings.limits.context is None and contexts:
        settings.limits.context = min(contexts)
    handles: set = set()
    state = {"in_flight": 0, "draining": False}

    def read_stats() -> dict:
        s = dict(engine.stats())
        for name, model in (("policy", policy), ("prm", prm)):
            free = getattr(model, "kv_free_blocks", None)
            if model is not None and callable(free):
                s[f"{name}_kv_blocks_free"] = int(free())
        s["in_flight"] = state["in_flight"]
        return s

    metrics = Metrics(read_stats)
    # /v1/completions without a search: raw continuation on the policy model (serve/continuation.py)
    continuer = Continuer(inner) if supports_continuation(policy) else None

    @asynccontextmanager
    async def lifespan(_app):
        yield
        if continuer is not None:
            await asyncio.to_thread(continuer.close)
        if close_engine:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="ponder serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.read_stats = read_stats
    app.state.continuer = continuer

    def drain(grace_s: float) -> None:
        state["draining"] = True
        loop = asyncio.get_running_loop()

        def cancel_all() -> None:
            for h in list(handles):
                h.cancel()

        loop.call_later(max(0.0, grace_s - 1.0), cancel_all)

    app.state.drain = drain

    # ------------------------------------------------------------------ errors

    def error_response(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def _server_error(_request, exc: Exception):
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), settings.api_key):
            raise ApiError(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                           "authentication_error", code="invalid_api_key")

    # ------------------------------------------------------------------ plain endpoints

    @app.get("/health")
    async def health():
        s = read_stats()
        body = {"status": "draining" if state["draining"] else "ok", "model": settings.model_name}
        body.update({k: v for k, v in s.items() if isinstance(v, (int, float))})
        return JSONResponse(body, status_code=503 if state["draining"] else 200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        now = int(time.time())
        data = [{"id": m, "object": "model", "created": now, "owned_by": "ponder"}
                for m in listed_models(settings.model_name)]
        return {"object": "list", "data": data}

    # ------------------------------------------------------------------ completions

    async def read_request(request: Request, model_cls):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            raise ApiError(413, f"request body over {settings.max_body_bytes} bytes", code="body_too_large")
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise ApiError(413, f"request body over {settings.max_body_bytes} bytes", code="body_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}"[:300], code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object; got {type(body).__name__}", code="invalid_json")
        try:
            return model_cls.model_validate(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            param = ".".join(str(x) for x in err.get("loc", ())) or None
            raise ApiError(422, f"{param}: {err.get('msg')}" if param else str(err.get("msg")), param=param) from None
        except RecursionError:
            raise ApiError(400, "the body is nested too deeply", code="invalid_json") from None

    # The prompt length check tokenizes on the event loop while the engine thread uses the
    # policy's tokenizer: a copy of it, so that no Rust tokenizer is shared between threads.
    try:
        own_tokenizer = copy.deepcopy(policy.tokenizer) if callable(getattr(policy, "format_prompt", None)) else None
    except Exception:  # noqa: BLE001 - no copy: estimate
        own_tokenizer = None

    def prompt_tokens(problem: str) -> int:
        """The policy's prompt length for ``problem`` (an estimate when it cannot be counted)."""
        if own_tokenizer is not None:
            try:
                text = policy.format_prompt(problem)
                special = not getattr(policy, "use_chat_template", False)
                return len(own_tokenizer.encode(text, add_special_tokens=special))
            except Exception:  # noqa: BLE001 - the engine's own start reports real failures
                pass
        return len(problem) // 2 + 64

    def search_sources(req) -> tuple[dict | None, dict | None]:
        """The request's preset (``reasoning_effort``) and model-suffix fields (None: absent);
        ApiError for an unknown model, suffix or effort."""
        try:
            _, suffix = parse_model(req.model, settings.model_name)
        except LookupError:
            raise ApiError(404, f"model {req.model!r} does not exist here; this server serves {settings.model_name!r} "
                           f"(optionally with a search suffix such as {settings.model_name}:dvts-16)",
                           "not_found_error", param="model", code="model_not_found") from None
        except ValueError as exc:
            raise ApiError(400, str(exc), param="model") from None
        try:
            preset = effort_preset(req.reasoning_effort, bool(settings.auto_available))
        except ValueError as exc:
            raise ApiError(400, str(exc), param="reasoning_effort") from None
        return preset, suffix

    def build_config(req, problem: str) -> tuple[SearchConfig, bool]:
        """The request's SearchConfig and whether it is a search (else plain sampling)."""
        preset, suffix = search_sources(req)
        name = req.unsupported()
        if name is None and isinstance(req, CompletionRequest) and req.stop:
            name = "stop"
        if name is not None:
            raise ApiError(400, f"{name} is not supported by ponder serve", param=name, code="unsupported_parameter")
        if req.n > settings.limits.max_choices:
            raise ApiError(400, f"n = {req.n} is above this server's limit {settings.limits.max_choices} (--max-choices)",
                           param="n")
        if not problem.strip():
            raise ApiError(400, "the problem (last user message / prompt) is empty",
                           param="messages" if isinstance(req, ChatCompletionRequest) else "prompt")
        if len(problem) > settings.limits.max_prompt_chars:
            raise ApiError(400, f"the problem has {len(problem)} characters, above this server's limit "
                           f"{settings.limits.max_prompt_chars} (--max-prompt-chars)",
                           param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        searched = preset is not None or suffix is not None or req.search is not None
        fields: dict[str, Any] = {}
        defaults = {k: v for k, v in settings.defaults.items() if k != "strategy"}  # a path: the server's only
        for layer in (defaults, preset or {}, suffix or {}):
            _merge(fields, layer)
        if req.search is not None:
            _merge(fields, req.search)
        sampling = {k: v for k, v in (("temperature", req.temperature), ("top_p", req.top_p), ("top_k", req.top_k))
                    if v is not None}
        if isinstance(fields.get("sampling", {}), dict):
            fields["sampling"] = {**sampling, **fields.get("sampling", {})}
        fields.setdefault("seed", req.seed if req.seed is not None else secrets.randbits(62))
        if not searched:
            fields.update(method="majority", n=req.n)
            fields.pop("vote", None)
            limit = req.token_limit()
            if limit is not None:
                fields["max_policy_tokens"] = limit
        base = SearchConfig(strategy=settings.defaults.get("strategy"))
        if fields.get("method") == "auto" and not settings.auto_available and "strategy" not in fields:
            raise ApiError(400, "method 'auto' needs a strategy table and this server has none (ponder serve --strategy)",
                           param="search.method")
        cfg = search_config(fields, base, settings.limits, prompt_tokens(problem))
        wall = settings.request_timeout_s
        cfg.max_wall_s = wall if cfg.max_wall_s is None else min(cfg.max_wall_s, wall)
        if not searched and cfg.n > settings.limits.max_search_n:
            raise ApiError(400, f"n = {cfg.n} is above this server's limit", param="n")
        return cfg, searched

    def take_slot() -> None:
        if state["draining"]:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        if state["in_flight"] >= settings.max_queue:
            raise ApiError(429, f"the queue is full ({settings.max_queue} requests in flight); retry later",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": str(settings.retry_after_s)})
        state["in_flight"] += 1
        metrics.in_flight.set(state["in_flight"])

    def free_slot() -> None:
        state["in_flight"] -= 1
        metrics.in_flight.set(state["in_flight"])

    def submit(problem: str, cfg: SearchConfig, on_event):
        try:
            h = engine.submit(problem, cfg, on_event)
        except ValueError as exc:  # e.g. a method that needs a PRM on a PRM-less server
            raise ApiError(400, str(exc), param="search.method") from None
        handles.add(h)
        return h

    def outcome(h) -> SearchResult:
        try:
            return h.result(timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - the search failed in the engine
            from .._core import KVCacheFull

            if isinstance(exc, KVCacheFull):
                raise ApiError(400, f"this search alone does not fit the server's KV cache ({exc}); lower search.n",
                               param="search.n", code="kv_cache_full") from None
            raise ApiError(500, f"the search failed: {type(exc).__name__}: {exc}"[:1000], "server_error",
                           code="engine_error") from None

    async def wait_disconnect(request: Request) -> None:
        while True:
            msg = await request.receive()
            if msg.get("type") == "http.disconnect":
                return

    async def run_search(request: Request, problem: str, cfg: SearchConfig) -> SearchResult:
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        def on_event(ev) -> None:
            if ev.kind == "end":
                loop.call_soon_threadsafe(lambda: ended.done() or ended.set_result(None))

        h = submit(problem, cfg, on_event)
        watcher = asyncio.ensure_future(wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({ended, watcher}, timeout=settings.request_timeout_s + settings.hard_timeout_slack_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if ended not in done:
                h.cancel()
                if watcher in done:
                    raise _ClientGone()
                raise ApiError(504, "the search did not end in time", "server_error", code="timeout")
            return outcome(h)
        finally:
            watcher.cancel()
            if not h.done():
                h.cancel()
            handles.discard(h)

    # ------------------------------------------------------------------ raw continuation

    vocab = None
    if continuer is not None:
        emb = getattr(policy.model, "get_input_embeddings", lambda: None)()
        vocab = int(emb.num_embeddings) if emb is not None else int(policy.model.config.vocab_size)

    def build_continuation(req: CompletionRequest) -> Continuation:
        """The request as a Continuation; ApiError naming the field for anything refused."""
        if continuer is None:
            raise ApiError(400, f"this server's policy ({type(policy).__name__}) cannot continue raw text; send a search "
                           "(extra_body.search, a model suffix or reasoning_effort) or use /v1/chat/completions",
                           param="prompt", code="unsupported_parameter")
        name = req.unsupported(allowed=("stop",))
        if name is not None:
            raise ApiError(400, f"{name} is not supported by ponder serve", param=name, code="unsupported_parameter")
        stops = req.stops()
        raw = [req.prompt] if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) \
            else list(req.prompt)
        if not raw:
            raise ApiError(400, "prompt is empty", param="prompt")
        add_special = req.flag("add_special_tokens", True)
        prompts: list[list[int]] = []
        for p in raw:
            if isinstance(p, str):
                if len(p) > settings.limits.max_prompt_chars:
                    raise ApiError(400, f"a prompt has {len(p)} characters, above this server's limit "
                                   f"{settings.limits.max_prompt_chars} (--max-prompt-chars)", param="prompt",
                                   code="context_length_exceeded")
                ids = list(own_tokenizer.encode(p, add_special_tokens=add_special)) if own_tokenizer is not None else []
            else:
                ids = [int(t) for t in p]
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
            if not ids:
                raise ApiError(400, "a prompt is empty (no tokens)", param="prompt")
            prompts.append(ids)
        rows = len(prompts) * req.n
        if rows > settings.limits.max_search_n:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n = {req.n} is {rows} continuations, above this server's "
                           f"limit {settings.limits.max_search_n} (--max-search-n)", param="n")
        max_tokens = req.max_tokens if req.max_tokens is not None else 16  # OpenAI's default
        context = settings.limits.context
        cap = context if context is not None else settings.limits.max_steps * settings.limits.max_step_tokens
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > cap:
            raise ApiError(400, f"prompt ({longest} tokens) + max_tokens ({max_tokens}) = {longest + max_tokens} is above "
                           f"this server's {'context' if context is not None else 'limit'} of {cap} tokens; lower "
                           "max_tokens or shorten the prompt", param="max_tokens", code="context_length_exceeded")
        temperature = 1.0 if req.temperature is None else req.temperature
        return Continuation(
            prompts=prompts, n=req.n, max_tokens=max_tokens, stops=stops,
            include_stop=req.flag("include_stop_str_in_output", False) or req.flag("no_stop_trim", False),
            temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            seed=req.seed if req.seed is not None else secrets.randbits(62),
            skip_special=req.flag("skip_special_tokens", True),
        )

    async def run_continuation(request: Request, job: Continuation) -> list:
        try:
            fut = asyncio.wrap_future(continuer.submit(job))
        except ContinuationRefused as exc:
            raise ApiError(400, str(exc), param="n", code="kv_cache_full") from None
        watcher = asyncio.ensure_future(wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({fut, watcher}, timeout=settings.request_timeout_s + settings.hard_timeout_slack_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if fut not in done:
                job.cancel()
                if watcher in done:
                    raise _ClientGone()
                raise ApiError(504, "the completion did not end in time", "server_error", code="timeout")
            try:
                return fut.result()
            except asyncio.CancelledError:
                raise _ClientGone() from None
            except Exception as exc:  # noqa: BLE001 - the model failed on this batch
                raise ApiError(500, f"the completion failed: {type(exc).__name__}: {exc}"[:1000], "server_error",
                               code="engine_error") from None
        finally:
            watcher.cancel()
            if not fut.done():
                job.cancel()

    async def raw_completion(request: Request, req: CompletionRequest) -> Response:
        """``/v1/completions`` without a search: continue the prompt(s) (see serve/continuation.py)."""
        job = build_continuation(req)
        take_slot()
        try:
            choices = await run_continuation(request, job)
        finally:
            free_slot()
        want_ids = req.flag("return_token_ids", False)
        rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
        out = []
        for i, c in enumerate(choices):
            item = {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason}
            if want_ids:
                item["token_ids"] = c.tokens
                item["prompt_token_ids"] = job.prompts[i // job.n]
            out.append(item)
        prompt_n = sum(len(p) for p in job.prompts)
        gen_n = sum(len(c.tokens) for c in choices)
        usage = {"prompt_tokens": prompt_n, "completion_tokens": gen_n, "total_tokens": prompt_n + gen_n, "prm_tokens": 0}
        metrics.add_usage(prompt_n, gen_n, 0)
        body = {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": out,
                "usage": usage, "ponder": {"seed": job.seed, "stopped": None}}
        if not req.stream:
            return JSONResponse(body)
        events = []
        for item in out:  # the whole text at once: a continuation is sent when its batch ends
            events.append({**item, "finish_reason": None, "stop_reason": None})
            events.append({k: v for k, v in item.items() if k not in ("token_ids", "prompt_token_ids")} | {"text": ""})
        lines = [f"data: {json.dumps({**body, 'choices': [e], 'usage': None})}\n\n" for e in events]
        tail = {"ponder": body["ponder"]}
        if req.include_usage():
            tail["usage"] = usage
        lines.append(f"data: {json.dumps({**body, 'choices': [], 'usage': None, **tail})}\n\n")
        lines.append("data: [DONE]\n\n")

        async def send():
            for line in lines:
                yield line

        return StreamingResponse(send(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completion_endpoint(request: Request, model_cls, endpoint: str):
        t0 = time.perf_counter()
        status = 200
        streaming = False
        try:
            check_key(request)
            req = await read_request(request, model_cls)
            if endpoint == "completions" and req.search is None and search_sources(req) == (None, None):
                return await raw_completion(request, req)
            problem = req.problem()
            cfg, searched = build_config(req, problem)
            take_slot()
            try:
                if req.stream:
                    streaming = True
                    gen = stream_search(request, req, problem, cfg, searched, endpoint, t0)
                    # Start it here (it submits the search and owns the slot from now on): a
                    # started generator is closed, running its cleanup, even if the response
                    # never starts sending.
                    first = await gen.__anext__()
                    return StreamingResponse(_prepend(first, gen), media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                result = await run_search(request, problem, cfg)
            finally:
                if not streaming:
                    free_slot()
            body = response_body(req, cfg, searched, result, endpoint)
            u = body["usage"]
            metrics.add_usage(u["prompt_tokens"], u["completion_tokens"], u["prm_tokens"])
            return JSONResponse(body)
        except ApiError as exc:
            status = exc.status
            return error_response(exc)
        except _ClientGone:
            status = 499
            return Response(status_code=499)
        finally:
            if not streaming:
                metrics.observe(endpoint, status, time.perf_counter() - t0)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completion_endpoint(request, ChatCompletionRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion_endpoint(request, CompletionRequest, "completions")

    # ------------------------------------------------------------------ streaming

    async def stream_search(request, req, problem, cfg, searched, endpoint, t0):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        chat = endpoint == "chat"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        status = 200
        h = None
        watcher = None

        def chunk(choices: list[dict], **extra) -> str:
            obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                   "model": req.model, "choices": choices, **extra}
            return f"data: {json.dumps(obj)}\n\n"

        def piece(i: int, text: str | None, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}

        try:
            try:
                h = submit(problem, cfg, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
            except ApiError as exc:
                status = exc.status
                raise
            watcher = asyncio.ensure_future(wait_disconnect(request))
            deadline = time.monotonic() + settings.request_timeout_s + settings.hard_timeout_slack_s
            yield chunk([piece(0, "", role=True)])
            iteration = completed = 0
            best = -math.inf
            while True:
                get = asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({get, watcher}, timeout=max(0.0, deadline - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    h.cancel()
                    if watcher in done:
                        status = 499
                        return
                    status = 504
                    err = ApiError(504, "the search did not end in time", "server_error", code="timeout")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                ev = get.result()
                if ev.kind == "step":
                    iteration += 1
                    scores = [s for s in ev.scores if s is not None and math.isfinite(s)]
                    if scores:
                        best = max(best, max(scores))
                    progress = {"iteration": iteration, "best_score": best if math.isfinite(best) else None,
                                "completed": completed}
                    yield chunk([piece(0, "")], ponder=progress)
                elif ev.kind == "completion":
                    completed += 1
                elif ev.kind == "end":
                    break
            try:
                result = outcome(h)
            except ApiError as exc:
                status = exc.status
                yield f"data: {json.dumps(exc.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            body = response_body(req, cfg, searched, result, endpoint)
            for c in body["choices"]:
                text = c["message"]["content"] if chat else c["text"]
                for part in _split_steps(text, cfg.sampling.step_delimiter):
                    yield chunk([piece(c["index"], part)])
                yield chunk([piece(c["index"], None if chat else "", c["finish_reason"])])
            u = body["usage"]
            metrics.add_usage(u["prompt_tokens"], u["completion_tokens"], u["prm_tokens"])
            tail: dict[str, Any] = {}
            if "ponder" in body:
                tail["ponder"] = body["ponder"]
            if req.include_usage():
                tail["usage"] = u
            if tail:
                yield chunk([], **tail)
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            if h is not None:
                if not h.done():
                    h.cancel()
                handles.discard(h)
            free_slot()
            metrics.observe(endpoint, status, time.perf_counter() - t0)

    return app


async def _prepend(first: str, rest):
    yield first
    async for item in rest:
        yield item


def _merge(into: dict, layer: dict) -> None:
    """Merge ``search`` fields into ``into``; ``sampling`` objects merge key by key."""
    for k, v in layer.items():
        if k in ("sampling",) and isinstance(v, dict) and isinstance(into.get(k), dict):
            into[k] = {**into[k], **v}
        else:
            into[k] = v


def _split_steps(text: str, delimiter: str) -> list[str]:
    """``text`` cut after each delimiter (the pieces join back to ``text``)."""
    if not text:
        return []
    parts, start = [], 0
    while True:
        i = text.find(delimiter, start)
        if i < 0:
            parts.append(text[start:])
            break
        parts.append(text[start : i + len(delimiter)])
        start = i + len(delimiter)
    return [p for p in parts if p]


def _finish_reason(c) -> str:
    return "stop" if c.finished else "length"


def _score(x: float) -> float:
    return x if isinstance(x, float) and math.isfinite(x) else -math.inf


def _json_float(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def rank_answers(result: SearchResult, cfg: SearchConfig) -> list[dict]:
    """The distinct answers of a result's completions (each completion counted once), the
    search's winner first, then by the final vote's measure (majority: votes, then best score;
    best: best score; weighted: the sum of scores). Each: answer, votes, weight (sum of path
    scores), best_score, best (the index in ``result.completions`` of its best solution)."""
    key_of = _answer_keys(result)
    groups: dict[Any, dict] = {}
    seen: set[int] = set()
    for i, c in enumerate(result.completions):
        if c.node_id in seen or c.answer is None:
            continue
        seen.add(c.node_id)
        k = key_of(c)
        g = groups.setdefault(k, {"key": k, "answer": c.answer, "votes": 0, "weight": 0.0, "best_score": -math.inf, "best": i})
        g["votes"] += 1
        s = _score(c.score)
        if math.isfinite(s):
            g["weight"] += s
        if s > g["best_score"]:
            g["best_score"], g["best"] = s, i
    how = IMPLIED_VOTE.get(cfg.method) or cfg.vote or "weighted"
    measure = {
        "majority": lambda g: (g["votes"], g["best_score"]),
        "best": lambda g: (g["best_score"], g["votes"]),
        "weighted": lambda g: (g["weight"], g["votes"]),
    }.get(how, lambda g: (g["weight"], g["votes"]))
    ranked = sorted(groups.values(), key=measure, reverse=True)  # stable: ties keep first-seen order
    winner_key = _key_of_node(result, key_of)
    winner = next((g for g in ranked if g["key"] == winner_key), None)
    if winner is not None:
        ranked.remove(winner)
        ranked.insert(0, winner)
    for g in ranked:
        g["best_score"] = _json_float(g["best_score"])
        del g["key"]
    return ranked


def _answer_keys(result: SearchResult):
    """Completion -> its vote key: the forest's answer id of its node (equivalent answers
    share it), else its normalized answer text."""
    ids = result.tree.get("node_id")
    answers = result.tree.get("answer")
    table = {}
    if ids is not None and answers is not None:
        table = dict(zip((int(x) for x in ids), (int(a) for a in answers)))

    def key(c) -> Any:
        a = table.get(int(c.node_id))
        if a is not None and a >= 0:
            return ("id", a)
        from ..grading import normalize_answer

        return ("text", normalize_answer(c.answer))

    return key


def _key_of_node(result: SearchResult, key_of) -> Any:
    for c in result.completions:
        if c.node_id == result.answer_node:
            return key_of(c)
    return None


def pick_choices(result: SearchResult, cfg: SearchConfig, n: int, searched: bool) -> list[int]:
    """Indices into ``result.completions`` of the returned choices (see the module docstring)."""
    comps = result.completions
    if not comps:
        return []
    if not searched:
        order = list(dict.fromkeys(range(len(comps))))
        return order[:n]
    ranked = rank_answers(result, cfg)
    picks = [g["best"] for g in ranked[:n]]
    chosen = next((i for i, c in enumerate(comps) if c.node_id == result.answer_node), None)
    if picks and chosen is not None:
        picks[0] = chosen  # the search's own choice (the winner's representative)
    if not picks:  # no completion has an answer: the best-scored one
        picks = [max(range(len(comps)), key=lambda i: (_score(comps[i].score), -i))]
    return picks


def response_body(req, cfg: SearchConfig, searched: bool, result: SearchResult, endpoint: str) -> dict:
    """The OpenAI response object of a finished search (see the module docstring)."""
    chat = endpoint == "chat"
    picks = pick_choices(result, cfg, req.n, searched)
    choices = []
    for idx, i in enumerate(picks):
        c = result.completions[i]
        finish = _finish_reason(c)
        if chat:
            choices.append({"index": idx, "message": {"role": "assistant", "content": c.text},
                            "logprobs": None, "finish_reason": finish})
        else:
            choices.append({"index": idx, "text": c.text, "logprobs": None, "finish_reason": finish})
    if not choices:  # cancelled before any step: an empty answer
        empty = {"role": "assistant", "content": ""}
        choices.append({"index": 0, **({"message": empty} if chat else {"text": ""}),
                        "logprobs": None, "finish_reason": "length"})
    b = result.budget
    usage = {"prompt_tokens": int(b.policy_tokens_prefilled), "completion_tokens": int(b.policy_tokens_generated),
             "total_tokens": int(b.policy_tokens_prefilled + b.policy_tokens_generated),
             "prm_tokens": int(b.prm_tokens_scored)}
    body: dict[str, Any] = {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": usage,
    }
    info: dict[str, Any] = {"seed": cfg.seed, "stopped": result.stopped}
    if searched:
        info.update(method=cfg.method, answer=result.answer, config=config_dict(cfg), difficulty=result.difficulty,
                    chosen=result.chosen, wall_s=b.wall_s)
    if req.return_candidates:
        info["candidates"] = [
            {"index": i, "node_id": c.node_id, "text": c.text, "answer": c.answer, "steps": c.steps,
             "step_scores": [_json_float(s) for s in c.step_scores], "score": _json_float(c.score),
             "finished": c.finished, "truncated": c.truncated}
            for i, c in enumerate(result.completions)
        ]
        info["votes"] = rank_answers(result, cfg)
        info["chosen_candidates"] = picks
    body["ponder"] = info
    return body

