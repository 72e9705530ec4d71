"""Raw text continuation on the server's policy model: ``/v1/completions`` without a search.

A :class:`Continuation` is one request: prompts (token ids), ``n`` samples of each, a token
limit, stop strings and sampling settings. A :class:`Continuer` runs them on the engine's
policy (``HFPolicy``: its model, tokenizer and KV pool) from one background thread, batching
every waiting request into one generation: each prompt is prefilled once (full blocks already
in the pool, e.g. a shared chat prompt or a path the search computed, are reused through the
pool's prefix index), forked ``n`` times, and all rows of all requests decode together, one
forward per token.

Concurrency with the engine: a batch runs while holding the engine's step lock, so it never
overlaps an engine step (both use the policy's model, KV pool and tokenizer); its sequences are
freed before the lock is released, so the engine's admission control never sees them. After a
batch, when the engine has work, the thread waits (at most ``yield_s``) for the engine to take a
step before it starts the next batch, so neither side starves the other.

Stopping, as vLLM's: a row stops at an EOS id (``finish_reason "stop"``, ``stop_reason`` None;
the id is kept in ``tokens``, dropped from the text), once its decoded text holds one of the
stop strings (``"stop"``, ``stop_reason`` = that string; the text ends before the stop string,
or after it with ``include_stop``; ``tokens`` are every generated id), or after ``max_tokens``
tokens (``"length"``). The decode rules are ``HFPolicy``'s (the same greedy tie rule, top-k /
top-p filters and stop check), so a greedy continuation of a search path is the step
``HFPolicy`` samples there.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..protocols import SamplingParams

try:  # the decode rule HFPolicy uses
    from ..hf.sampling import sample_next
except ImportError:  # pragma: no cover - older layout
    from ..hf.policy import sample_next  # type: ignore[attr-defined,no-redef]

# Bounds the tokens of one prefill forward (as HFPolicy's prefill batches).
_PREFILL_BATCH_TOKENS = 16384
# Stop detection decodes the last len(stop) + this many tokens of a row (a stop string cannot
# start earlier: the row would have stopped there; the extra covers split UTF-8 characters).
_STOP_WINDOW_EXTRA = 8


class ContinuationRefused(Exception):
    """A request this server cannot run (too large for the KV pool); the message says why."""


@dataclass
class Choice:
    """One generated continuation: ``tokens`` (EOS id included when it ended there), ``text``
    (decoded without EOS ids, cut at the stop string), ``finish_reason`` ("stop" / "length"),
    ``stop_reason`` (the matched stop string; None for EOS or length)."""

    tokens: list[int]
    text: str
    finish_reason: str
    stop_reason: str | None = None


@dataclass
class Continuation:
    """One request: ``n`` continuations of each prompt (token ids, each non-empty).

    max_tokens >= 1: generated tokens per continuation. stops: stop strings (non-empty).
    include_stop: keep the matched stop string in the text. temperature 0 is greedy; else
    temperature, top_p in (0, 1], top_k (0: none). seed: the request's random stream (None:
    from the OS); its rows draw from it in order. skip_special: drop special tokens from the
    text. The result (``future``) is the choices, prompt-major: prompt i's j-th sample is
    ``i * n + j``. A request cancelled (:meth:`cancel`, or its future cancelled) before its
    batch starts is dropped (future cancelled); during its batch its rows stop at the next
    token and the future gets the partial choices.
    """

    prompts: list[list[int]]
    n: int = 1
    max_tokens: int = 16
    stops: tuple[str, ...] = ()
    include_stop: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    skip_special: bool = True
    future: Future = field(default_factory=Future)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating for this request (its rows leave the batch at the next token)."""
        self.cancelled = True

    def rows(self) -> int:
        return len(self.prompts) * self.n


def supports_continuation(policy) -> bool:
    """Whether ``policy`` exposes what raw continuation runs on (``HFPolicy`` does): ``model``,
    ``tokenizer``, ``eos_ids`` and a KV pool ``kv`` with new_sequence / fork / forward / free."""
    kv = getattr(policy, "kv", None)
    return (getattr(policy, "model", None) is not None and getattr(policy, "tokenizer", None) is not None
            and getattr(policy, "eos_ids", None) is not None
            and all(callable(getattr(kv, m, None)) for m in ("new_sequence", "fork", "forward", "free", "stats")))


class Continuer:
    """Runs :class:`Continuation` requests on ``engine.policy`` (see the module docstring).

    engine: the ``ponder.Engine`` whose policy runs them (its step lock serializes the two).
    max_rows: at most this many rows (prompts x n) in one batch (a larger request runs alone).
    yield_s: how long a batch waits for the engine to take a step when it has work.
    """

    def __init__(self, engine, *, max_rows: int = 256, yield_s: float = 1.0) -> None:
        if not supports_continuation(engine.policy):
            raise TypeError(f"{type(engine.policy).__name__} has no model / KV pool to continue text with")
        self.engine = engine
        self.policy = engine.policy
        self.max_rows = int(max_rows)
        self.yield_s = float(yield_s)
        self.blocks_total = int(self.policy.kv.stats().get("blocks_total", 0))  # the pool's size (fixed)
        self._cond = threading.Condition()
        self._pending: list[Continuation] = []
        self._stop = False
        self.counters = {"batches": 0, "requests": 0, "rows": 0, "tokens_generated": 0, "tokens_prefilled": 0}
        self._thread = threading.Thread(target=self._loop, name="ponder-continue", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests

    def block_need(self, job: Continuation) -> int:
        """KV blocks ``job`` may take at most: each prompt once, then per row its private tail
        (the prompt's partial block copied on write plus ``max_tokens`` tokens)."""
        bs = int(getattr(self.policy, "kv_block_size", 16))
        need = 0
        for p in job.prompts:
            need += math.ceil(len(p) / bs) + job.n * (math.ceil(job.max_tokens / bs) + 1)
        return need

    def submit(self, job: Continuation) -> Future:
        """Queue ``job``; its future gets the choices (or ContinuationRefused / a model error).
        ContinuationRefused at once when the request alone exceeds the whole KV pool."""
        total = self.blocks_total
        if total and self.block_need(job) > total:
            raise ContinuationRefused(
                f"{job.rows()} continuations of up to {max(len(p) for p in job.prompts)} + {job.max_tokens} tokens need "
                f"up to {self.block_need(job)} KV blocks, above the pool's {total}; lower n or max_tokens")
        with self._cond:
            if self._stop:
                raise RuntimeError("the continuation thread is closed")
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def close(self) -> None:
        """Stop the thread after its current batch; waiting requests are cancelled."""
        with self._cond:
            self._stop = True
            pending, self._pending = self._pending, []
            self._cond.notify()
        for job in pending:
            job.future.cancel()
        self._thread.join()

    # ------------------------------------------------------------------ the thread

    def _take(self) -> list[Continuation]:
        """The next batch: waiting requests in order while their rows and KV blocks fit."""
        free_fn = getattr(self.policy, "kv_free_blocks", None)
        free = int(free_fn()) if callable(free_fn) else None
        batch: list[Continuation] = []
        rows = blocks = 0
        with self._cond:
            keep = []
            for job in self._pending:
                if job.cancelled:
                    job.future.cancel()
                    continue
                need = self.block_need(job)
                fits_rows = not batch or rows + job.rows() <= self.max_rows
                if fits_rows and (free is None or blocks + need <= free):
                    if not job.future.set_running_or_notify_cancel():
                        continue  # its waiter cancelled the future
                    batch.append(job)
                    rows += job.rows()
                    blocks += need
                else:
                    keep.append(job)
            self._pending = keep
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
            batch: list[Continuation] = []
            with self.engine.exclusive():
                try:
                    batch = self._take()
                    if batch:
                        self._run(batch)
                except Exception as exc:  # noqa: BLE001 - delivered to the batch's requests
                    if not batch:  # taking failed: fail what waits, so that no request hangs
                        with self._cond:
                            batch, self._pending = self._pending, []
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(exc)
            if not batch:  # nothing fits the KV pool now: let the engine free some
                time.sleep(0.01)
            self._yield_to_engine()

    def _yield_to_engine(self) -> None:
        eng = self.engine
        if not eng.has_work():
            return
        steps = eng.steps_taken
        deadline = time.monotonic() + self.yield_s
        while eng.steps_taken == steps and eng.has_work() and time.monotonic() < deadline:
            time.sleep(0.0005)

    # ------------------------------------------------------------------ one batch

    def _run(self, batch: list[Continuation]) -> None:
        import torch

        pol, kv = self.policy, self.policy.kv
        tok = pol.tokenizer
        eos_ids = set(int(x) for x in pol.eos_ids)
        bases: list[int] = []
        seqs: list[int] = []
        try:
            # prefill each prompt once (cached full blocks are not recomputed)
            news = []
            for job in batch:
                for p in job.prompts:
                    seq, cached = kv.new_sequence(p)
                    bases.append(seq)
                    news.append((seq, p[cached:]))
                    self.counters["tokens_prefilled"] += len(p) - cached
            base_logits: list = []
            i = 0
            while i < len(news):
                j, total = i, 0
                while j < len(news) and (j == i or total + len(news[j][1]) <= _PREFILL_BATCH_TOKENS):
                    total += len(news[j][1])
                    j += 1
                base_logits.extend(kv.forward(pol.model, [s for s, _ in news[i:j]], [t for _, t in news[i:j]],
                                              logits="last").unbind(0))
                i = j
            # n rows per prompt
            owner: list[Continuation] = []
            first = []
            b = 0
            for job in batch:
                gen = None
                if job.temperature > 0:
                    gen = torch.Generator(device=pol.device if hasattr(pol, "device") else "cpu")
                    if job.seed is None:
                        gen.seed()
                    else:
                        gen.manual_seed(int(job.seed))
                job._gen = gen  # type: ignore[attr-defined]
                for _ in job.prompts:
                    forks = [int(s) for s in kv.fork(bases[b], job.n)]
                    seqs.extend(forks)
                    owner.extend([job] * job.n)
                    first.extend([base_logits[b]] * job.n)
                    b += 1
            kv.free(bases)
            bases = []
            B = len(seqs)
            tokens: list[list[int]] = [[] for _ in range(B)]
            finish: list[str | None] = [None] * B
            reason: list[str | None] = [None] * B
            logits = torch.stack(first)
            active = list(range(B))
            while active:
                # cancelled requests leave the batch
                live = [k for k, r in enumerate(active) if not owner[r].cancelled]
                if len(live) < len(active):
                    active = [active[k] for k in live]
                    logits = logits[live]
                    if not active:
                        break
                nxt = self._sample(logits, [owner[r] for r in active])
                keep = []
                for k, (r, t) in enumerate(zip(active, nxt)):
                    tokens[r].append(t)
                    job = owner[r]
                    if t in eos_ids:
                        finish[r] = "stop"
                        continue
                    if job.stops:
                        window = max(len(s) for s in job.stops) + _STOP_WINDOW_EXTRA
                        tail = tok.decode(tokens[r][-window:], skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False)
                        hit = _first_stop(tail, job.stops)
                        if hit is not None:
                            finish[r], reason[r] = "stop", hit
                            continue
                    if len(tokens[r]) >= job.max_tokens:
                        finish[r] = "length"
                        continue
                    keep.append(k)
                self.counters["tokens_generated"] += len(active)
                active = [active[k] for k in keep]
                if active:
                    logits = kv.forward(pol.model, [seqs[r] for r in active], [[tokens[r][-1]] for r in active],
                                        logits="last")
        finally:
            kv.free(bases + seqs)
        self.counters["batches"] += 1
        start = 0
        for job in batch:
            rows = range(start, start + job.rows())
            start += job.rows()
            self.counters["requests"] += 1
            self.counters["rows"] += job.rows()
            out = []  # a cancelled request gets what it has (nobody reads it)
            for r in rows:
                text = tok.decode([t for t in tokens[r] if t not in eos_ids], skip_special_tokens=job.skip_special,
                                  clean_up_tokenization_spaces=False)
                if reason[r] is not None:
                    at = text.find(reason[r])
                    if at >= 0:
                        text = text[: at + len(reason[r])] if job.include_stop else text[:at]
                out.append(Choice(tokens[r], text, finish[r] or "length", reason[r]))
            job.future.set_result(out)

    @staticmethod
    def _sample(logits, jobs: list[Continuation]) -> list[int]:
        """The next token of each row: rows grouped by sampling setting, each row drawing from
        its request's generator (rows of a request in order)."""
        import torch

        out = [0] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for k, job in enumerate(jobs):
            key = (0.0, 1.0, 0) if job.temperature <= 0 else (job.temperature, job.top_p, job.top_k)
            groups.setdefault(key, []).append(k)
        for (temp, top_p, top_k), ks in groups.items():
            params = SamplingParams(temperature=temp, top_p=top_p, top_k=top_k)
            rows = logits if len(ks) == len(jobs) else logits[torch.tensor(ks, device=logits.device)]
            gens = None if temp <= 0 else [jobs[k]._gen for k in ks]  # type: ignore[attr-defined]
            for k, t in zip(ks, sample_next(rows, params, gens).tolist()):
                out[k] = int(t)
        return out


def _first_stop(text: str, stops: tuple[str, ...]) -> str | None:
    """The stop string that occurs first in ``text`` (None when none does)."""
    best, at = None, len(text) + 1
    for s in stops:
        i = text.find(s)
        if 0 <= i < at:
            best, at = s, i
    return best
