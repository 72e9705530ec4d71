"""Request and response shapes of ``ponder serve``: OpenAI's, plus ponder's extensions.

Requests are pydantic models that accept OpenAI's fields (unknown fields are ignored, as
OpenAI-compatible servers do, except those in ``UNSUPPORTED`` when they ask for something
ponder cannot do); the extensions ``search`` (any ``SearchConfig`` field) and
``return_candidates`` arrive at the top level of the body (the ``openai`` client's
``extra_body``). Errors are ``ApiError``: an HTTP status and OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``.

``search_config`` turns a ``search`` mapping into a validated ``SearchConfig``: an unknown
field, a wrong type, a value ``SearchConfig.validate`` refuses, or one above the server's
limits is an ``ApiError`` (400) whose ``param`` names the field (``search.n``,
``search.sampling.temperature``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from ..methods.config import SearchConfig
from ..protocols import SamplingParams

# OpenAI request fields ponder does not implement; a request that sets one to anything but
# null / false / its default is refused (400) rather than silently ignored.
UNSUPPORTED = ("stop", "logprobs", "top_logprobs", "tools", "functions", "tool_choice", "function_call",
               "logit_bias", "echo", "suffix", "best_of", "response_format", "audio", "modalities",
               "presence_penalty", "frequency_penalty", "use_beam_search")

# SearchConfig fields a request may not set: ``strategy`` is a path on the server's disk.
FORBIDDEN_SEARCH_FIELDS = {"strategy": "search.strategy is a file path on the server and cannot be set by a request"}

_INT_FIELDS = ("n", "beam_width", "num_iterations", "max_steps", "lookahead", "seed", "max_policy_tokens")
_BOOL_FIELDS = ("filter_duplicates", "sort_completed", "compat_search_and_learn")
_MAX_SEED = 2**63 - 1


class ApiError(Exception):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=_MAX_SEED)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    reasoning_effort: str | None = None
    # ponder's extensions
    search: dict[str, Any] | None = None
    return_candidates: bool = False

    def unsupported(self, allowed: tuple[str, ...] = ()) -> str | None:
        """The first field of ``UNSUPPORTED`` (but ``allowed``) this request sets to something
        other than null, false, 0 or an empty list (None when none)."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            if name in allowed:
                continue
            value = extra.get(name)
            if value not in (None, False, 0, [], {}, "", 1 if name == "best_of" else None):
                return name
        return None

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions. The problem is the last ``user`` message's text; the policy
    renders it with its own chat template and system prompt (other messages are not used)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def problem(self) -> str:
        for m in reversed(self.messages):
            if m.role == "user":
                return m.text()
        raise ApiError(400, "messages needs at least one message with role 'user' (the problem)", param="messages")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    """POST /v1/completions. With a search (``search``, a model suffix or ``reasoning_effort``)
    ``prompt`` (a string, or a list of one string) is the problem, rendered with the policy's
    chat template like a chat request's. Without one it is raw text to continue (a string, a
    list of strings, token ids, or a list of token-id lists: one prompt each), as any
    completion server; ``stop`` and vLLM's ``include_stop_str_in_output``,
    ``skip_special_tokens``, ``add_special_tokens``, ``return_token_ids`` apply there."""

    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    stop: str | list[str] | None = None

    def problem(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1 or not isinstance(self.prompt[0], str):
            raise ApiError(400, "a search's prompt is the problem: a string or a list of one string",
                           param="prompt")
        return self.prompt[0]

    def stops(self) -> tuple[str, ...]:
        """The stop strings (ApiError 400 for more than 4 or an empty one)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop must be a non-empty string or a list of at most 4 non-empty strings", param="stop")
        return tuple(stops)

    def flag(self, name: str, default: bool) -> bool:
        """A boolean extension field (vLLM's ``include_stop_str_in_output`` ...): ApiError 400
        when set to anything but true / false / null."""
        value = (self.model_extra or {}).get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ApiError(400, f"{name} must be true or false; got {value!r}"[:200], param=name)
        return value

    def token_limit(self) -> int | None:
        return self.max_tokens


@dataclasses.dataclass
class Limits:
    """Request size limits of a server (``ponder serve --max-...``). ``context``: the
    policy's context length (prompt + (max_steps + lookahead) x max_step_tokens must fit)."""

    max_prompt_chars: int = 8192
    max_choices: int = 8
    max_search_n: int = 64
    max_iterations: int = 64
    max_steps: int = 64
    max_step_tokens: int = 512
    max_lookahead: int = 8
    context: int | None = None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sampling_params(fields: dict[str, Any], base: SamplingParams) -> SamplingParams:
    """``base`` with ``fields`` (a ``search.sampling`` mapping) applied, each checked."""
    if not isinstance(fields, dict):
        raise ApiError(400, f"search.sampling must be an object; got {type(fields).__name__}", param="search.sampling")
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    for key, v in fields.items():
        p = f"search.sampling.{key}"
        if key not in names:
            raise ApiError(400, f"unknown field {p} (sampling fields: {', '.join(sorted(names))})", param=p)
        if key in ("temperature", "top_p"):
            if not _is_number(v) or v < 0 or (key == "top_p" and not 0 < v <= 1) or v > 100:
                raise ApiError(400, f"{p} must be a number ({'in (0, 1]' if key == 'top_p' else '>= 0'}); got {v!r}",
                               param=p)
        elif key in ("top_k", "max_step_tokens"):
            if not _is_int(v) or v < (1 if key == "max_step_tokens" else 0):
                raise ApiError(400, f"{p} must be an integer >= {1 if key == 'max_step_tokens' else 0}; got {v!r}",
                               param=p)
        elif key == "step_delimiter":
            if not isinstance(v, str) or not v or len(v) > 32:
                raise ApiError(400, f"{p} must be a non-empty string of at most 32 characters; got {v!r}", param=p)
        elif key == "seed":
            if v is not None and (not _is_int(v) or not 0 <= v <= _MAX_SEED):
                raise ApiError(400, f"{p} must be null or an integer in [0, 2^63); got {v!r}", param=p)
    return dataclasses.replace(base, **fields)


def search_config(fields: dict[str, Any], base: SearchConfig, limits: Limits, prompt_tokens: int = 0) -> SearchConfig:
    """``base`` with ``fields`` (a request's ``search`` mapping, already merged with presets)
    applied, validated by ``SearchConfig.validate`` and the server's ``limits``. ApiError (400)
    naming the field for anything refused."""
    names = {f.name for f in dataclasses.fields(SearchConfig)}
    cfg_kw: dict[str, Any] = {}
    for key, v in fields.items():
        p = f"search.{key}"
        if key in FORBIDDEN_SEARCH_FIELDS:
            raise ApiError(400, FORBIDDEN_SEARCH_FIELDS[key], param=p)
        if key not in names:
            raise ApiError(400, f"unknown field {p} (SearchConfig fields: {', '.join(sorted(names - set(FORBIDDEN_SEARCH_FIELDS)))})",
                           param=p)
        if key in _INT_FIELDS and v is not None and not _is_int(v):
            raise ApiError(400, f"{p} must be an integer; got {v!r}", param=p)
        if key in _BOOL_FIELDS and not isinstance(v, bool):
            raise ApiError(400, f"{p} must be true or false; got {v!r}", param=p)
        if key in ("method", "agg") and not isinstance(v, str):
            raise ApiError(400, f"{p} must be a string; got {v!r}", param=p)
        if key == "vote" and v is not None and not isinstance(v, str):
            raise ApiError(400, f"{p} must be null or a string; got {v!r}", param=p)
        if key in ("max_wall_s", "budget", "budget_tokens") and v is not None and not _is_number(v):
            raise ApiError(400, f"{p} must be null or a finite number; got {v!r}", param=p)
        if key == "early_stop" and not (v is None or isinstance(v, (bool, dict)) or _is_number(v)):
            raise ApiError(400, f"{p} must be null, a threshold in (0.5, 1] or an object; got {v!r}", param=p)
        if key == "seed" and not 0 <= v <= _MAX_SEED:
            raise ApiError(400, f"{p} must be in [0, 2^63); got {v!r}", param=p)
        if key == "sampling":
            v = sampling_params(v, base.sampling)
        cfg_kw[key] = v
    cfg = dataclasses.replace(base, **cfg_kw)
    try:
        cfg.validate()
    except Exception as exc:  # noqa: BLE001 - every refusal of the config is the request's mistake
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise ApiError(400, f"search: {message}", param=_field_named(message, names)) from None
    _check_limits(cfg, limits, prompt_tokens)
    return cfg


def _field_named(message: str, names: set[str]) -> str:
    """The ``search.*`` field a ``SearchConfig.validate`` message is about (its first word,
    or the first field name it mentions, with its sub-field, e.g. ``early_stop.futility_score``;
    ``search`` when none)."""
    words = [w.strip("(),:;'\"=") for w in message.replace("=", " ").split()]
    if words and words[0].startswith("sampling."):
        return f"search.{words[0]}"
    for w in words:
        if w in names or w.split(".")[0] in names:
            return f"search.{w}"
    if words and words[0] in ("method", "budget"):
        return f"search.{words[0]}"
    return "search"


def _check_limits(cfg: SearchConfig, limits: Limits, prompt_tokens: int) -> None:
    checks = (
        ("search.n", cfg.n, limits.max_search_n, "--max-search-n"),
        ("search.beam_width", cfg.beam_width, limits.max_search_n, "--max-search-n"),
        ("search.num_iterations", cfg.num_iterations, limits.max_iterations, "--max-iterations"),
        ("search.max_steps", cfg.max_steps, limits.max_steps, "--max-steps"),
        ("search.lookahead", cfg.lookahead, limits.max_lookahead, "--max-lookahead"),
        ("search.sampling.max_step_tokens", cfg.sampling.max_step_tokens, limits.max_step_tokens, "--max-step-tokens"),
    )
    for param, value, cap, flag in checks:
        if value > cap:
            raise ApiError(400, f"{param} = {value} is above this server's limit {cap} ({flag})", param=param)
    for param, value in (("search.budget", cfg.budget),):
        if value is not None and value > limits.max_search_n:
            raise ApiError(400, f"{param} = {value} is above this server's limit {limits.max_search_n} (--max-search-n)",
                           param=param)
    if cfg.budget_tokens is not None and cfg.budget_tokens > limits.max_search_n * limits.max_steps * limits.max_step_tokens:
        raise ApiError(400, "search.budget_tokens is above this server's limits (--max-search-n x --max-steps x "
                       "--max-step-tokens)", param="search.budget_tokens")
    if cfg.early_stop is not None and cfg.early_stop is not False:
        es = cfg.early_stop
        rs = es.get("round_size") if isinstance(es, dict) else getattr(es, "round_size", None)
        if _is_int(rs) and rs > limits.max_search_n:
            raise ApiError(400, f"search.early_stop.round_size = {rs} is above this server's limit {limits.max_search_n}",
                           param="search.early_stop.round_size")
    if limits.context is not None:
        longest = prompt_tokens + (cfg.max_steps + cfg.lookahead) * cfg.sampling.max_step_tokens
        if longest > limits.context:
            raise ApiError(
                400,
                f"a path may reach {longest} tokens (prompt {prompt_tokens} + (max_steps {cfg.max_steps} + lookahead "
                f"{cfg.lookahead}) x max_step_tokens {cfg.sampling.max_step_tokens}), above the policy's context of "
                f"{limits.context}; lower search.max_steps or search.sampling.max_step_tokens",
                param="search.max_steps",
            )


def config_dict(cfg: SearchConfig) -> dict:
    """A ``SearchConfig`` as JSON-able data (``sampling`` and ``early_stop`` as objects)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = dataclasses.asdict(v)
        out[f.name] = v
    return out
