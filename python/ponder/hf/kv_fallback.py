"""Exact search on models the paged KV path refuses: transformers' own cache, one per sequence.

:func:`cache_for_model` is what :class:`ponder.hf.policy.HFPolicy` and :class:`ponder.hf.prm.HFPRM`
build their cache with. It returns a :class:`ponder.hf.kv.PagedKVCache` when
:func:`ponder.hf.kv.paged_refusal` accepts the model (the fast path: prefix sharing, one batched
forward), and otherwise a :class:`FallbackKVCache` with the same interface (``new_sequence`` /
``fork`` / ``free`` / ``seq_lens`` / ``prepare`` -> batch ``.run(model)`` / ``.on(companion)`` /
``forward`` / ``companion`` / ``stats``), warning once per model.

``FallbackKVCache`` keeps, per sequence, its token list and the cache object the model itself
returns (``DynamicCache`` and its hybrid / recurrent / sliding-window relatives). A fork shares
its parent's cache object until either side runs again, which then works on a deep copy; each
row of a batch runs as its own forward (batch size 1, no padding). Models whose own cache does
not reproduce their cache-free logits on the same probe as the paged check (or that cannot be
copied) run in ``recompute`` mode: every forward recomputes the whole sequence without a cache.
Either way the logits are the model's own; what is lost is prefix reuse and batching
(``stats()["backend"]`` says ``"fallback"``, ``stats()["reason"]`` why).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from . import kv as _kv
from .kv import DEFAULT_TOKEN_BUDGET, PagedKVCache, paged_refusal

__all__ = ["FallbackBatch", "FallbackKVCache", "cache_for_model", "with_companion"]

_MODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> "cache" | "recompute"
_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cache_for_model(
    model: torch.nn.Module,
    *,
    block_size: int = 16,
    token_budget: int | None = None,
    self_check: bool = True,
) -> PagedKVCache | FallbackKVCache:
    """The paged cache when ``model`` runs exactly on it (see :func:`ponder.hf.kv.paged_refusal`),
    else a :class:`FallbackKVCache` (one ``RuntimeWarning`` per model naming the reason).
    ``self_check=False`` skips the probe (the paged path is then trusted for every layout
    :func:`ponder.hf.kv.kv_spec_of` accepts). Sizes as :meth:`PagedKVCache.for_model`; errors: its
    ValueError when the pool does not fit in memory."""
    reason = paged_refusal(model, self_check=self_check)
    if reason is None:
        return PagedKVCache.for_model(model, block_size=block_size, token_budget=token_budget, self_check=False)
    return FallbackKVCache(model, reason, block_size=block_size, token_budget=token_budget)


def with_companion(
    kv: PagedKVCache | FallbackKVCache, primary: torch.nn.Module, model: torch.nn.Module, *, self_check: bool = True
) -> tuple[PagedKVCache | FallbackKVCache, PagedKVCache | FallbackKVCache]:
    """(primary cache, companion cache) for a second ``model`` over the same sequences as
    ``kv`` (built for ``primary``), e.g. an implicit PRM's reference. Both stay paged when
    both models pass the check; otherwise both go to the fallback (one set of sequences must
    hold for both). ValueError when ``kv`` must change but already holds sequences."""
    if isinstance(kv, PagedKVCache):
        reason = paged_refusal(model, self_check=self_check)
        if reason is None:
            return kv, kv.companion(model, self_check=False)
        if kv.stats()["tokens_requested"]:
            raise ValueError("with_companion: the primary cache already holds sequences; build the companion first")
        kv = FallbackKVCache(primary, f"the companion {reason}", block_size=kv.block_size,
                             token_budget=kv.num_blocks * kv.block_size)
    return kv, kv.companion(model)


def _restore_own_attention(model: torch.nn.Module) -> None:
    try:
        _kv._set_attention(model, _kv._own_attention(model))
    except Exception:  # noqa: BLE001 - a model without switchable attention keeps what it has
        pass


@dataclass
class _Holder:
    """A model cache object shared by forks until one of them runs again."""

    cache: Any
    refs: int = 1


@dataclass
class _Seq:
    tokens: list[int]
    holders: dict = field(default_factory=dict)  # id(FallbackKVCache) -> (_Holder, tokens it covers)


class _Group:
    """The sequences (ids, token lists) shared by a primary fallback cache and its companions."""

    def __init__(self) -> None:
        self.seqs: dict[int, _Seq] = {}
        self.next_id = 0
        self.caches: list[FallbackKVCache] = []
        self.counters = dict.fromkeys(("tokens_requested", "tokens_from_cache", "tokens_appended",
                                       "cow_copies", "evictions", "tokens_recomputed"), 0)


@dataclass
class FallbackBatch:
    """New tokens for several sequences of a :class:`FallbackKVCache` (already appended to their
    token lists by ``prepare``). ``q_lens``: int64 [B]; ``prev``: each sequence's length before."""

    cache: FallbackKVCache
    seq_ids: np.ndarray
    tokens: list[list[int]]
    q_lens: torch.Tensor
    prev: list[int]

    def on(self, cache: FallbackKVCache) -> FallbackBatch:
        """This batch for a companion of its cache (same sequences)."""
        if cache is self.cache:
            return self
        if not isinstance(cache, FallbackKVCache) or cache.group is not self.cache.group:
            raise ValueError("FallbackBatch.on: the cache is not a companion of this batch's cache")
        return FallbackBatch(cache, self.seq_ids, self.tokens, self.q_lens, self.prev)

    def run(self, model: torch.nn.Module, logits_to_keep: int | torch.Tensor | None = None, **extra: Any):
        """Run the batch's rows through ``model`` (its cache's model), one forward per row.
        Returns an object with ``.logits`` float [B, T, V] (rows right-padded with zeros) or,
        with a tensor ``logits_to_keep`` of positions, [B, len(logits_to_keep), V]."""
        return SimpleNamespace(logits=self.cache._run(model, self, logits_to_keep))

    def model_kwargs(self) -> dict[str, Any]:
        raise ValueError("a fallback batch runs one sequence at a time: call batch.run(model) instead of model(**kwargs)")


class FallbackKVCache:
    """Sequences run on the model's own transformers cache (see the module docstring).

    ``reason`` (why the paged path was refused) and ``mode`` (``"cache"``: the model's cache per
    sequence, forks share it until they diverge; ``"recompute"``: no cache, each forward runs
    the whole sequence) are reported by :meth:`stats`. ``block_size`` / ``num_blocks`` only
    express the token budget for admission control (``blocks_*`` counters); nothing is refused
    when it is exceeded.
    """

    def __init__(self, model: torch.nn.Module, reason: str, *, block_size: int = 16,
                 token_budget: int | None = None, group: _Group | None = None) -> None:
        self.model = model
        self.reason = reason
        self.block_size = int(block_size)
        budget = DEFAULT_TOKEN_BUDGET if token_budget is None else int(token_budget)
        self.num_blocks = max(1, math.ceil(budget / self.block_size))
        self.group = _Group() if group is None else group
        self.group.caches.append(self)
        self._primary = None if group is None else self.group.caches[0]
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        _restore_own_attention(model)
        self.mode = _mode_of(model)
        self._has_positions = "position_ids" in inspect.signature(model.forward).parameters
        if model not in _WARNED:
            _WARNED[model] = True
            warnings.warn(
                f"{reason}. Running {type(model).__name__} on transformers' own cache per sequence "
                f"({self.mode} mode): exact, but without prefix sharing or batching",
                RuntimeWarning, stacklevel=3,
            )

    # ---- sequences
    def new_sequence(self, tokens: Sequence[int]) -> tuple[int, int]:
        """A sequence for ``tokens``, none of them computed yet: returns (seq_id, 0)."""
        self._primary_only("new_sequence")
        sid = self.group.next_id
        self.group.next_id += 1
        self.group.seqs[sid] = _Seq([])
        self.group.counters["tokens_requested"] += len(tokens)
        return sid, 0

    def fork(self, seq_id: int, k: int) -> np.ndarray:
        """``k`` copies of ``seq_id`` (int32 [k]) sharing its caches until they run."""
        self._primary_only("fork")
        parent = self._seq(seq_id)
        out = []
        for _ in range(int(k)):
            sid = self.group.next_id
            self.group.next_id += 1
            child = _Seq(list(parent.tokens))
            for key, (holder, covered) in parent.holders.items():
                holder.refs += 1
                child.holders[key] = (holder, covered)
            self.group.seqs[sid] = child
            out.append(sid)
        return np.asarray(out, dtype=np.int32)

    def free(self, seq_ids: Sequence[int]) -> None:
        """Drop sequences (unknown ids are ignored)."""
        self._primary_only("free")
        for s in np.asarray(seq_ids, dtype=np.int64).tolist():
            seq = self.group.seqs.pop(int(s), None)
            if seq is not None:
                for holder, _ in seq.holders.values():
                    holder.refs -= 1

    def seq_lens(self, seq_ids: Sequence[int]) -> np.ndarray:
        return np.asarray([len(self._seq(s).tokens) for s in np.asarray(seq_ids).tolist()], dtype=np.int32)

    def stats(self) -> dict[str, int | str]:
        """The paged cache's counters (``tokens_from_cache``, ``cow_copies`` and ``evictions``
        stay 0; ``blocks_*`` count the tokens held by live sequences in ``block_size`` units,
        every sequence holding its own), plus ``tokens_recomputed`` (tokens run again in
        recompute mode), ``backend`` ("fallback"), ``mode`` and ``reason``."""
        held = sum(math.ceil(len(s.tokens) / self.block_size) for s in self.group.seqs.values())
        out: dict[str, int | str] = dict(self.group.counters)
        out.update(blocks_total=self.num_blocks, blocks_free=max(0, self.num_blocks - held), blocks_in_use=held,
                   blocks_cached=0, blocks_evictable=0, backend="fallback", mode=self.mode, reason=self.reason)
        return out

    def companion(self, model: torch.nn.Module) -> FallbackKVCache:
        """A fallback cache for a second model over these same sequences."""
        self._primary_only("companion")
        return FallbackKVCache(model, self.reason, block_size=self.block_size,
                               token_budget=self.num_blocks * self.block_size, group=self.group)

    # ---- batches
    def prepare(self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]]) -> FallbackBatch:
        """Append ``tokens[i]`` to sequence ``seq_ids[i]`` (at least one token each)."""
        self._primary_only("prepare")
        seq_ids = np.asarray(seq_ids, dtype=np.int64)
        if len(tokens) != len(seq_ids):
            raise ValueError(f"tokens has {len(tokens)} rows but seq_ids has {len(seq_ids)}")
        rows = [[int(t) for t in row] for row in tokens]
        if not rows or min(len(r) for r in rows) < 1:
            raise ValueError("every sequence in a batch must add at least one token")
        seqs = [self._seq(s) for s in seq_ids.tolist()]
        prev = [len(s.tokens) for s in seqs]
        for s, row in zip(seqs, rows):
            s.tokens.extend(row)
        self.group.counters["tokens_appended"] += sum(len(r) for r in rows)
        return FallbackBatch(self, seq_ids, rows, torch.tensor([len(r) for r in rows], dtype=torch.int64), prev)

    @torch.inference_mode()
    def forward(self, model: torch.nn.Module, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]],
                logits: str = "last") -> torch.Tensor:
        """As :meth:`ponder.hf.kv.PagedKVCache.forward`: ``"last"`` -> [B, V], ``"all"`` -> [B, T, V]."""
        if logits not in ("last", "all"):
            raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
        batch = self.prepare(seq_ids, tokens)
        out = batch.run(model).logits
        if logits == "last":
            return out[torch.arange(out.shape[0], device=out.device), (batch.q_lens - 1).to(out.device)]
        return out

    # ---- internals
    def _primary_only(self, what: str) -> None:
        if self._primary is not None:
            raise ValueError(f"this cache is a companion: call {what} on its primary cache")

    def _seq(self, seq_id: int) -> _Seq:
        seq = self.group.seqs.get(int(seq_id))
        if seq is None:
            raise KeyError(f"sequence {int(seq_id)} is not held by this cache")
        return seq

    def _run(self, model: torch.nn.Module, batch: FallbackBatch, logits_to_keep) -> torch.Tensor:
        if model is not self.model:
            raise ValueError("a fallback cache runs the model it was built for (use companion() for a second model)")
        rows = []
        for sid, prev, row in zip(batch.seq_ids.tolist(), batch.prev, batch.tokens):
            seq = self._seq(sid)
            end = prev + len(row)
            rows.append(self._run_row(seq, prev, end)[-len(row):])  # [q, V]
        T = max(r.shape[0] for r in rows)
        V = rows[0].shape[-1]
        out = rows[0].new_zeros((len(rows), T, V))
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
        if isinstance(logits_to_keep, torch.Tensor):
            out = out[:, logits_to_keep.to(out.device)]
        elif isinstance(logits_to_keep, int) and logits_to_keep > 0:
            out = out[:, -logits_to_keep:]
        return out

    @torch.inference_mode()
    def _run_row(self, seq: _Seq, prev: int, end: int) -> torch.Tensor:
        """Logits [n, V] of tokens ``start..end-1`` of ``seq`` (start: what this model's cache
        already covers), advancing this model's cache to ``end`` tokens."""
        key = id(self)
        holder, covered = seq.holders.get(key, (None, 0))
        if self.mode == "recompute" or holder is None:
            covered = 0
        ids = seq.tokens[covered:end]
        if self.mode == "recompute":
            self.group.counters["tokens_recomputed"] += prev
            return _full_logits(self.model, seq.tokens[:end], self.device)
        if holder is None:
            holder = _Holder(None)
        elif holder.refs > 1:  # shared with a fork: work on a copy
            holder.refs -= 1
            holder = _Holder(copy.deepcopy(holder.cache))
        logits, cache = _cached_step(self.model, holder.cache, ids, covered, self.device, self._has_positions)
        holder.cache = cache
        seq.holders[key] = (holder, end)
        return logits


def _full_logits(model: torch.nn.Module, tokens: list[int], device) -> torch.Tensor:
    return model(input_ids=torch.tensor([tokens], device=device), use_cache=False).logits[0]


def _cached_step(model, cache, ids: list[int], past: int, device, has_positions: bool):
    """One forward of ``ids`` after ``past`` cached tokens (``cache`` None when past is 0)."""
    kwargs: dict[str, Any] = {
        "input_ids": torch.tensor([ids], device=device),
        "attention_mask": torch.ones((1, past + len(ids)), dtype=torch.long, device=device),
        "use_cache": True,
    }
    if cache is not None:
        kwargs[_kv._cache_kwarg()] = cache  # `past_key_values` on transformers before the rename
    if has_positions:
        kwargs["position_ids"] = torch.arange(past, past + len(ids), device=device)[None]
    out = model(**kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    if new_cache is None:
        raise ValueError(f"{type(model).__name__} returned no cache")
    return out.logits[0], new_cache


@torch.inference_mode()
def _mode_of(model: torch.nn.Module) -> str:
    """``"cache"`` when the model's own cache reproduces its cache-free logits on a probe
    (prefill 7, fork by deep copy, steps of 1 and 3 tokens), else ``"recompute"``."""
    if model in _MODES:
        return _MODES[model]
    mode = "recompute"
    try:
        param = next(model.parameters())
        g = torch.Generator().manual_seed(20240612)
        toks = _kv._probe_tokens(model, g, 11)
        has_pos = "position_ids" in inspect.signature(model.forward).parameters
        ref = _full_logits(model, toks, param.device).float()
        logits, cache = _cached_step(model, None, toks[:7], 0, param.device, has_pos)
        parts = [logits.float()]
        twin = copy.deepcopy(cache)
        logits, cache = _cached_step(model, cache, toks[7:8], 7, param.device, has_pos)
        parts.append(logits.float())
        logits, cache = _cached_step(model, cache, toks[8:11], 8, param.device, has_pos)
        parts.append(logits.float())
        logits, _ = _cached_step(model, twin, toks[7:11], 7, param.device, has_pos)  # the copy runs on
        got = torch.cat(parts)
        scale = max(float(ref.abs().max()), 1e-6)
        tol = _kv._TOLERANCE.get(param.dtype, 5e-2) * scale
        if float((got - ref).abs().max()) <= tol and float((logits.float() - ref[7:]).abs().max()) <= tol:
            mode = "cache"
    except Exception:  # noqa: BLE001 - any failure of the model's cache means recompute
        mode = "recompute"
    _MODES[model] = mode
    return mode
