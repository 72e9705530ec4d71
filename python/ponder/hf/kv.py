"""A prefix-shared paged KV cache that unmodified Hugging Face models run on.

In tree search every candidate step shares the prompt and all earlier steps with its siblings.
``PagedKVCache`` keeps one pool of fixed-size KV blocks per layer; the C++ ``KVCacheManager``
(``ponder._core``) hands out blocks, shares full blocks between forked sequences, copies a shared
partial block on write, and remembers full blocks in a radix prefix index so that a prefix seen
before (the same prompt, the same path) is computed once.

How a Hugging Face model runs on it, through transformers' own extension points only:

* the cache is passed as ``cache=`` and transformers calls ``cache.update(k, v, layer_idx,
  kwargs=...)`` in every attention layer: ``update`` scatters the new tokens' K/V into their
  slots of the pool (``ponder.hf.kernels.write_kv``);
* the attention function ``"ponder_paged"`` is registered in ``transformers.AttentionInterface``
  (and its mask function in ``AttentionMaskInterface``); load the model with
  ``attn_implementation="ponder_paged"`` or call :func:`use_paged_attention`. With a
  :class:`PagedBatch` in the call it attends over the pool (a paged decode kernel when every
  sequence adds one token; gather + SDPA for multi-token chunks); without one it is plain SDPA,
  so the model still works everywhere else.

That is the *pool* layout. A model the load-time self-check finds wrong on it (attention in its
own code: BLOOM's and MPT's ALiBi, GPT-Neo's local layers; K/V or masks changed after
``update``) is tried on the *gathered* layout (:meth:`PagedBatch.gathered`): ``update`` returns
each row's whole K/V read from the pool, left-padded like transformers' own padded batches, and
the model runs on its own attention and builds its own masks (:func:`paged_mode` says which).

Typical use::

    kv = PagedKVCache.for_model(model, token_budget=65536)
    seq, cached = kv.new_sequence(prompt_ids)
    logits = kv.forward(model, [seq], [prompt_ids[cached:]])     # prefill once
    beams = kv.fork(seq, 16)                                      # share it 16 ways
    logits = kv.forward(model, beams, next_tokens)                # [16, vocab]
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import _core
from . import kernels

KVCacheFull = _core.KVCacheFull
ATTN_IMPLEMENTATION = "ponder_paged"
DEFAULT_TOKEN_BUDGET = 32768

__all__ = [
    "ATTN_IMPLEMENTATION",
    "KVCacheFull",
    "KVSpec",
    "PagedBatch",
    "PagedKVCache",
    "kv_spec_of",
    "paged_mode",
    "paged_refusal",
    "use_paged_attention",
]


# ----------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class KVSpec:
    """What one token costs in the KV pool of a model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


def kv_spec_of(config: Any) -> KVSpec:
    """Read the KV shape of a decoder-only transformers config; reject layouts the pool cannot hold.

    Raises ValueError for encoder-decoder models, hybrid / recurrent / linear-attention layers,
    GPT-Neo's local layers and latent-attention (MLA) models, which keep other state than full
    K/V per layer. Sliding-window layers are accepted: the pool keeps every token and the
    ponder_paged attention applies the window (the ``sliding_window`` its layer passes).
    """
    name = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name}: encoder-decoder models are not supported by PagedKVCache (decoder-only only)")
    if getattr(config, "kv_lora_rank", None):
        raise ValueError(f"{name}: latent attention (MLA) is not supported by PagedKVCache")
    layer_types = getattr(config, "layer_types", None)
    attention = {"full_attention", "sliding_attention"}  # sliding: the window is applied when attending
    if layer_types and any(t not in attention for t in layer_types):
        raise ValueError(
            f"{name}: layers of types {sorted(set(layer_types) - attention)} are not supported; "
            "PagedKVCache holds full- and sliding-window attention layers only"
        )
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        raise ValueError(f"{name}: config lacks num_hidden_layers / num_attention_heads / hidden_size")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return KVSpec(int(layers), int(kv_heads), int(head_dim))


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 62


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------- one forward pass

# The batch of the forward pass running in this thread (set by PagedBatch.run only).
_ACTIVE = threading.local()


def _active_batch(kwargs: dict | None = None) -> PagedBatch | None:
    batch = (kwargs or {}).get("ponder_batch")
    return batch if batch is not None else getattr(_ACTIVE, "batch", None)


@dataclass
class PagedBatch:
    """Everything one forward pass over several sequences needs. Shapes: B sequences, T the
    longest number of new tokens (rows are right-padded), L the longest sequence after the pass.

    input_ids, position_ids: int64 [B, T] (true positions: RoPE and learned position tables
    depend on them); attention_mask: bool [B, 1, T, L] (True = attend; causal within each
    sequence, padding excluded); slot_mapping: int64 [B * T] (-1 for padding);
    block_tables: int32 [B, max_blocks]; kv_lens: int64 [B]; q_lens: int64 [B].
    """

    cache: PagedKVCache
    seq_ids: np.ndarray
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    kv_lens: torch.Tensor
    q_lens: torch.Tensor
    decode: bool  # every sequence adds exactly one token: attend straight from the pool
    # prepare() checked slot_mapping / block_tables / kv_lens on the host (kernels.check_batch_indices),
    # so the per-layer kernel calls skip their own check (a host copy + sync per layer on CUDA).
    indices_checked: bool = False
    # Set by gathered() only (the layout for models that attend over what cache.update returns):
    # key_mask int64 [B, Lg] (0 = left padding), key_slots int64 [B, Lg] (the pool slot of each key).
    key_mask: torch.Tensor | None = None
    key_slots: torch.Tensor | None = None

    @property
    def key_length(self) -> int:
        """Keys per row the model sees: L (pool layout) or Lg (gathered layout)."""
        return int((self.key_mask if self.key_mask is not None else self.attention_mask).shape[-1])

    def gathered(self) -> PagedBatch:
        """This batch in the layout of transformers' own left-padded batches, for models that
        compute attention themselves from what ``cache.update`` returns (the Cache API contract:
        the layer's whole K/V). Each row's keys are left-padded to ``Lg = max(past) + T`` so that
        query t of every row is key index Lg - T + t; ``update`` then returns K/V [B, H, Lg, D]
        read from the pool, and the model builds its own causal / sliding-window / ALiBi masks
        from ``key_mask`` (passed as the 2-D ``attention_mask``) and ``position_ids``."""
        if self.key_slots is not None:
            return self
        T = self.input_ids.shape[1]
        prev = self.kv_lens - self.q_lens  # [B]
        Lg = int(prev.max()) + T
        j = torch.arange(Lg, device=prev.device)[None, :] - (Lg - T - prev)[:, None]  # key position, [B, Lg]
        key_mask = (j >= 0).long()  # the right end (padding queries' own keys) is never seen by a real query
        j = torch.where((j >= 0) & (j < self.kv_lens[:, None]), j, torch.zeros_like(j))  # padding reads key 0
        bs = self.cache.block_size
        blocks = self.block_tables.long().gather(1, j // bs)
        return dataclasses.replace(self, key_mask=key_mask, key_slots=blocks * bs + j % bs)

    def on(self, cache: PagedKVCache) -> PagedBatch:
        """This batch run against ``cache``'s pools: ``cache`` must be this batch's cache or one
        of its companions (same block manager, so the slots and block tables hold)."""
        if cache is self.cache:
            return self
        if cache.manager is not self.cache.manager:
            raise ValueError("PagedBatch.on: the cache does not share this batch's block manager (see PagedKVCache.companion)")
        if cache.device == self.cache.device:
            return dataclasses.replace(self, cache=cache)
        # index tensors follow the pools' device (a companion may live on another device)
        fields = ("input_ids", "position_ids", "attention_mask", "slot_mapping", "block_tables", "kv_lens", "q_lens",
                  "key_mask", "key_slots")
        moved = {f: getattr(self, f).to(cache.device) for f in fields if getattr(self, f) is not None}
        return dataclasses.replace(self, cache=cache, **moved)

    def run(self, model: torch.nn.Module, **extra: Any):
        """``model(**batch.model_kwargs(), **extra)`` with the batch *active*: attention layers
        that do not forward ``**kwargs`` to ``cache.update`` / the attention function (GPT-NeoX,
        StableLM, ...) and models that ask the cache for its length (Falcon, OPT) find it there.
        A model the self-check put on the gathered layout (:func:`paged_mode`: BLOOM, MPT,
        GPT-Neo, ...) runs on its own attention over :meth:`gathered`; any other on the
        ``ponder_paged`` attention. Returns the model's output."""
        own = _GATHERED.get(model)
        if own is None:
            use_paged_attention(model)
            batch = self
        else:
            _set_attention(model, own)
            batch = self.gathered()
        previous = getattr(_ACTIVE, "batch", None)
        _ACTIVE.batch = batch
        try:
            return model(**batch.model_kwargs(), **extra)
        finally:
            _ACTIVE.batch = previous

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model(**batch.model_kwargs())`` (pool layout: a 4-D bool mask
        and ``ponder_batch``; gathered layout: the 2-D ``key_mask``, run through :meth:`run`)."""
        if self.key_mask is not None:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": self.key_mask,
                    _cache_kwarg(): self.cache, "use_cache": True}
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": self.attention_mask,
            _cache_kwarg(): self.cache,
            "use_cache": True,
            "ponder_batch": self,
        }


def _cache_kwarg() -> str:
    """The model keyword that takes the cache: ``cache`` since transformers renamed it,
    ``past_key_values`` before (e.g. 5.17, the GPU machine's): an older release silently ignores
    ``cache=``, so the pool would never be written and the logits would be wrong."""
    global _CACHE_KWARG
    if _CACHE_KWARG is None:
        import inspect

        from transformers import LlamaModel

        _CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
    return _CACHE_KWARG


_CACHE_KWARG: str | None = None


# ----------------------------------------------------------------------------- the cache


def _check_fits(what: str, num_blocks: int, block_size: int, per_block: int, free: int, device, hint: str) -> None:
    """ValueError naming the sizes when ``num_blocks`` blocks of ``per_block`` bytes exceed ``free``."""
    if num_blocks * per_block > free:
        raise ValueError(
            f"{what} does not fit: {num_blocks} blocks x {block_size} tokens need "
            f"{_gib(num_blocks * per_block)} but {_gib(free)} is free on {device}; {hint}"
        )


def _refuse(model: torch.nn.Module, self_check: bool) -> None:
    reason = paged_refusal(model, self_check=self_check)
    if reason is not None:
        raise ValueError(f"{reason}; ponder.hf.kv_fallback.cache_for_model(model) runs it exactly on transformers' own cache")


class PagedKVCache:
    """Per-layer K/V pools of ``num_blocks`` blocks of ``block_size`` tokens, laid out
    ``[num_blocks, block_size, num_kv_heads, head_dim]``, plus the block manager.

    Build it with :meth:`for_model` (sized from a token budget or a fraction of free memory).
    """

    is_compileable = False  # read by transformers' mask code

    def __init__(
        self,
        spec: KVSpec,
        *,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        manager: _core.KVCacheManager | None = None,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        if manager is not None and (manager.num_blocks, manager.block_size) != (num_blocks, block_size):
            raise ValueError(
                f"the block manager has {manager.num_blocks} blocks of {manager.block_size} tokens, "
                f"not {num_blocks} of {block_size}"
            )
        self.spec = spec
        self.block_size = int(block_size)
        self.num_blocks = int(num_blocks)
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (self.num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(spec.num_layers)]
        self.manager = _core.KVCacheManager(self.num_blocks, self.block_size) if manager is None else manager
        self._companions: list[PagedKVCache] = []
        self._primary: PagedKVCache | None = None

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        *,
        block_size: int = 16,
        token_budget: int | None = None,
        memory_fraction: float | None = None,
        num_blocks: int | None = None,
        self_check: bool = True,
    ) -> PagedKVCache:
        """A cache shaped for ``model`` (its dtype and device).

        ``self_check``: first prove on a short probe that the model's logits on the pool equal
        its own cache-free forward (:func:`paged_refusal`, once per model); a model that fails
        raises ValueError naming its class (:func:`ponder.hf.kv_fallback.cache_for_model` runs such
        models exactly on transformers' own cache instead).

        Size: ``num_blocks`` if given, else ``token_budget`` tokens, else ``memory_fraction`` of the
        free memory of the model's device, else ``DEFAULT_TOKEN_BUDGET`` tokens. Raises ValueError
        naming the sizes when the pool does not fit in free memory.
        """
        spec = kv_spec_of(model.config)
        _refuse(model, self_check)
        param = next(model.parameters())
        dtype, device = param.dtype, param.device
        per_block = spec.bytes_per_token(dtype) * block_size
        free = _free_bytes(device)
        if sum(x is not None for x in (num_blocks, token_budget, memory_fraction)) > 1:
            raise ValueError("give at most one of num_blocks, token_budget, memory_fraction")
        if memory_fraction is not None:
            if not 0.0 < memory_fraction <= 1.0:
                raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
            num_blocks = int(free * memory_fraction) // per_block
            if num_blocks < 1:
                raise ValueError(
                    f"the KV cache does not fit: one block of {block_size} tokens needs {per_block} bytes but "
                    f"{memory_fraction} of the free memory on {device} is {int(free * memory_fraction)} bytes"
                )
        elif num_blocks is None:
            budget = DEFAULT_TOKEN_BUDGET if token_budget is None else int(token_budget)
            if budget < 1:
                raise ValueError(f"token_budget must be >= 1, got {budget}")
            num_blocks = math.ceil(budget / block_size)
        _check_fits("the KV cache", num_blocks, block_size, per_block, free, device,
                    "lower token_budget / num_blocks or use memory_fraction")
        return cls(spec, num_blocks=num_blocks, block_size=block_size, dtype=dtype, device=device)

    def companion(self, model: torch.nn.Module, *, self_check: bool = True) -> PagedKVCache:
        """K/V pools for a second model that runs over *the same sequences* as this cache (an
        implicit PRM's reference model reads exactly the PRM's tokens).

        The companion shares this cache's block manager, so ``new_sequence`` / ``fork`` / ``free``
        here apply to both and the block tables are one; it has its own pools shaped for ``model``
        (its dtype and device, ``num_blocks`` x ``block_size`` like this cache) and receives this
        cache's copy-on-write copies. Batches are prepared here only; run ``model`` on
        ``batch.on(companion)``. Raises ValueError when the pools do not fit in free memory.
        """
        if self._primary is not None:
            raise ValueError("a companion cache cannot have companions of its own: call companion() on the primary")
        spec = kv_spec_of(model.config)
        _refuse(model, self_check)
        param = next(model.parameters())
        _check_fits("the companion KV cache", self.num_blocks, self.block_size,
                    spec.bytes_per_token(param.dtype) * self.block_size, _free_bytes(param.device), param.device,
                    "lower the token budget")
        twin = PagedKVCache(spec, num_blocks=self.num_blocks, block_size=self.block_size,
                            dtype=param.dtype, device=param.device, manager=self.manager)
        twin._primary = self
        self._companions.append(twin)
        return twin

    # ---- sequences (ids are int32, never reused)
    def new_sequence(self, tokens: Sequence[int]) -> tuple[int, int]:
        """Start a sequence for ``tokens``; returns (seq_id, cached): the first ``cached`` tokens
        are already in the pool (a cached prefix), the caller computes the rest with
        :meth:`forward` (at least the last token, whose logits it needs)."""
        seq, cached = self.manager.new_sequence(np.asarray(tokens, dtype=np.int64))
        return int(seq), int(cached)

    def fork(self, seq_id: int, k: int) -> np.ndarray:
        """``k`` new sequences (int32 [k]) sharing every block of ``seq_id``."""
        return self.manager.fork(seq_id, k)

    def free(self, seq_ids: Sequence[int]) -> None:
        """Drop sequences; their full blocks stay cached for reuse until evicted."""
        self.manager.free(np.asarray(seq_ids, dtype=np.int64))

    def seq_lens(self, seq_ids: Sequence[int]) -> np.ndarray:
        return self.manager.seq_len(np.asarray(seq_ids, dtype=np.int64))

    def stats(self) -> dict[str, int]:
        """The manager's counters (tokens requested / from cache / appended, blocks, copies,
        evictions)."""
        return dict(self.manager.stats())

    # ---- batches
    def prepare(self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]]) -> PagedBatch:
        """Reserve slots for ``tokens[i]`` at the end of sequence ``seq_ids[i]`` (every sequence
        adds at least one token), apply copy-on-write copies, and build the batch tensors."""
        seq_ids = np.asarray(seq_ids, dtype=np.int64)
        if len(tokens) != len(seq_ids):
            raise ValueError(f"tokens has {len(tokens)} rows but seq_ids has {len(seq_ids)}")
        q_lens = np.array([len(t) for t in tokens], dtype=np.int64)
        if len(q_lens) == 0 or q_lens.min() < 1:
            raise ValueError("every sequence in a batch must add at least one token")
        flat = np.fromiter((int(t) for row in tokens for t in row), dtype=np.int64, count=int(q_lens.sum()))
        prev = self.manager.seq_len(seq_ids).astype(np.int64)
        if self._primary is not None:
            raise ValueError(
                "this cache is a companion: prepare batches on its primary cache and run the second "
                "model with batch.on(companion).model_kwargs()"
            )
        slots, src, dst = self.manager.append(seq_ids, q_lens, flat)
        if len(src):
            # copy-on-write applies to every pool laid out on these block tables
            src_t, dst_t = torch.from_numpy(src), torch.from_numpy(dst)
            for pools in (self, *self._companions):
                # index tensors on the pools' device (copy_blocks rejects CPU indices with CUDA pools)
                kernels.copy_blocks(pools.k, pools.v, src_t.to(pools.device), dst_t.to(pools.device))
        table, kv_lens = self.manager.block_table(seq_ids)
        kernels.check_batch_indices(self.num_blocks, self.block_size, slot_mapping=slots, block_tables=table,
                                    lengths=kv_lens)

        B, T = len(seq_ids), int(q_lens.max())
        L = int(kv_lens.max())
        valid = np.arange(T)[None, :] < q_lens[:, None]  # [B, T]
        input_ids = np.zeros((B, T), dtype=np.int64)
        input_ids[valid] = flat
        positions = np.where(valid, prev[:, None] + np.arange(T)[None, :], 0)
        slot_mapping = np.full((B, T), -1, dtype=np.int64)
        slot_mapping[valid] = slots
        # Query t of row b sits at position prev[b] + t and sees keys 0..prev[b] + t; a padding
        # query sees key 0 only, so its softmax stays finite (its output is never read).
        keys = np.arange(L)[None, None, :]
        mask = keys <= (prev[:, None] + np.arange(T)[None, :])[:, :, None]
        mask &= keys < kv_lens[:, None, None]
        mask |= (~valid[:, :, None]) & (keys == 0)

        dev = self.device
        return PagedBatch(
            cache=self,
            seq_ids=seq_ids,
            input_ids=torch.from_numpy(input_ids).to(dev),
            position_ids=torch.from_numpy(positions).to(dev),
            attention_mask=torch.from_numpy(mask[:, None]).to(dev),
            slot_mapping=torch.from_numpy(slot_mapping.reshape(-1)).to(dev),
            block_tables=torch.from_numpy(np.ascontiguousarray(table)).to(dev),
            kv_lens=torch.from_numpy(kv_lens.astype(np.int64)).to(dev),
            q_lens=torch.from_numpy(q_lens).to(dev),
            decode=T == 1,
            indices_checked=True,
        )

    @torch.inference_mode()
    def forward(
        self,
        model: torch.nn.Module,
        seq_ids: Sequence[int],
        tokens: Sequence[Sequence[int]],
        logits: str = "last",
    ) -> torch.Tensor:
        """Run ``model`` on the new ``tokens`` of each sequence (appending them to the cache).

        Returns float logits: ``"last"`` -> [B, vocab] at each sequence's last new token;
        ``"all"`` -> [B, T, vocab] (rows right-padded to the longest T).
        """
        if logits not in ("last", "all"):
            raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
        batch = self.prepare(seq_ids, tokens)
        if logits == "last":
            last = batch.q_lens - 1
            keep, where = torch.unique(last, return_inverse=True)
            out = batch.run(model, logits_to_keep=keep).logits  # [B, len(keep), V]
            return out[torch.arange(len(last), device=out.device), where]
        return batch.run(model).logits

    # ---- transformers Cache API (duck-typed: transformers' own paged cache is not a Cache either)
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, kwargs=None, **_):
        """Called by every attention layer with this step's K/V [B, Hkv, T, D]: write them into
        their slots. Pool layout: returns them unchanged (the ponder_paged attention reads the
        pool). Gathered layout (:meth:`PagedBatch.gathered`): returns the layer's whole K/V
        [B, Hkv, Lg, D] read from the pool, left-padded, for the model's own attention."""
        batch = _active_batch(kwargs) or _.get("ponder_batch")
        if batch is None or batch.cache is not self:
            raise ValueError(
                "PagedKVCache.update got no PagedBatch: run the model with "
                "model(**cache.prepare(seq_ids, tokens).model_kwargs()) or cache.forward(model, ...)"
            )
        B, H, T, D = key_states.shape
        kernels.write_kv(
            self.k[layer_idx],
            self.v[layer_idx],
            key_states.transpose(1, 2).reshape(B * T, H, D),
            value_states.transpose(1, 2).reshape(B * T, H, D),
            batch.slot_mapping,
            check_indices=not batch.indices_checked,
        )
        if batch.key_slots is not None:
            slots = batch.key_slots.reshape(-1)
            shape = (*batch.key_slots.shape, H, D)
            # contiguous like DynamicCache's K/V: some models .view() them
            return (self.k[layer_idx].view(-1, H, D)[slots].view(shape).transpose(1, 2).contiguous(),
                    self.v[layer_idx].view(-1, H, D)[slots].view(shape).transpose(1, 2).contiguous())
        return key_states, value_states

    # Most models ask a cache for its length only when a call lacks position_ids or a ready 4-D
    # mask. Some (Falcon, OPT, BLOOM, MPT, ...) always do: during PagedBatch.run the answer is
    # the batch's past length L - T, which keeps their mask sizes equal to the batch's mask (the
    # true positions ride in position_ids). Outside a batch there is no single length.
    def _batch_or_raise(self) -> PagedBatch:
        batch = getattr(_ACTIVE, "batch", None)
        if batch is None or batch.cache is not self:
            raise ValueError(
                "PagedKVCache holds many sequences of different lengths: run the model with "
                "cache.prepare(seq_ids, tokens).run(model) (a PagedBatch), or cache.forward(model, ...)"
            )
        return batch

    def get_seq_length(self, *_args, **_kwargs) -> int:
        batch = self._batch_or_raise()
        return batch.key_length - int(batch.input_ids.shape[1])

    get_query_offset = get_seq_length

    def get_mask_sizes(self, *_args, **_kwargs) -> tuple[int, int]:
        return self._batch_or_raise().key_length, 0


# ----------------------------------------------------------------------------- attention


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``ponder_paged`` attention function: query [B, Hq, T, D] -> ([B, T, Hq, D], None).

    With a PagedBatch in kwargs it attends over the layer's pool; otherwise it is transformers'
    SDPA attention, so a model switched to ponder_paged keeps working without the cache.
    """
    batch: PagedBatch | None = kwargs.pop("ponder_batch", None)
    if batch is None:
        batch = getattr(_ACTIVE, "batch", None)
    if batch is None:
        if kwargs.get("softcap") or kwargs.get("s_aux") is not None:  # SDPA has neither
            return _plain_attention(query, key, value, attention_mask, scaling, kwargs.get("softcap"), kwargs.get("s_aux"))
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    cache, layer = batch.cache, module.layer_idx
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    window = kwargs.get("sliding_window") or None
    softcap = kwargs.get("softcap") or None
    sinks = kwargs.get("s_aux")
    if window is not None or softcap is not None or sinks is not None:
        return _windowed_attention(batch, cache, layer, query, scale, window, softcap, sinks), None
    if batch.decode:
        out = kernels.paged_decode_attention(
            query[:, :, 0, :], cache.k[layer], cache.v[layer], batch.block_tables, batch.kv_lens, scale,
            check_indices=not batch.indices_checked,
        )
        return out.unsqueeze(1), None
    L = batch.attention_mask.shape[-1]
    k, v = kernels.gather_kv(cache.k[layer], cache.v[layer], batch.block_tables, batch.kv_lens, max_len=L,
                             check_indices=not batch.indices_checked)
    out = F.scaled_dot_product_attention(
        query,
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=batch.attention_mask,
        scale=scale,
        enable_gqa=query.shape[1] != k.shape[2],
    )
    return out.transpose(1, 2), None


def _softmax_attention(query, k, v, mask, scale, softcap, sinks) -> torch.Tensor:
    """softmax(softcap(q k^T * scale) masked, [sinks]) v. query [B, Hq, T, D], k / v [B, Hkv, L, D],
    mask bool [B, 1, T, L] (True = attend) or additive float -> [B, T, Hq, D]."""
    if k.shape[1] != query.shape[1]:
        k = k.repeat_interleave(query.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(query.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(query, k.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.float()
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    return torch.matmul(probs.to(v.dtype), v).transpose(1, 2).contiguous()


def _plain_attention(query, key, value, attention_mask, scaling, softcap, sinks):
    """Attention without a PagedBatch for the variants SDPA lacks (soft-capping, sinks)."""
    T, L = query.shape[2], key.shape[2]
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    mask = attention_mask
    if mask is None:  # causal, queries aligned to the last T keys
        mask = torch.ones(T, L, dtype=torch.bool, device=query.device).tril(L - T)[None, None]
    return _softmax_attention(query, key, value, mask[..., :L], scale, softcap, sinks), None


def _windowed_attention(batch, cache, layer, query, scale, window, softcap, sinks) -> torch.Tensor:
    """Gather + explicit softmax for the variants SDPA and the decode kernel lack: a sliding
    window (key j is seen from position p when p - window < j <= p, transformers' convention),
    tanh soft-capping of the scores (Gemma 2) and per-head attention sinks (``s_aux``, GPT-OSS).
    query [B, Hq, T, D] -> [B, T, Hq, D]."""
    mask = batch.attention_mask  # [B, 1, T, L]
    L = mask.shape[-1]
    k, v = kernels.gather_kv(cache.k[layer], cache.v[layer], batch.block_tables, batch.kv_lens, max_len=L,
                             check_indices=not batch.indices_checked)
    if window is not None:
        keys = torch.arange(L, device=mask.device)
        mask = mask & (keys[None, None, None, :] > batch.position_ids[:, None, :, None] - int(window))
        # a padding query whose window excludes key 0 still needs one visible key
        mask = mask | (~mask.any(-1, keepdim=True) & (keys == 0))
    return _softmax_attention(query, k.transpose(1, 2), v.transpose(1, 2), mask, scale, softcap, sinks)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    # Importing GPT-Neo's module probes for flash-attention kernels; offline, the `kernels`
    # package logs a warning per probe, which must not reach a user who never asked for GPT-Neo.
    kernels_log = logging.getLogger("kernels")
    level = kernels_log.level
    kernels_log.setLevel(logging.ERROR)
    try:  # GPT-Neo picks its attention class by name: loading it as ponder_paged gets its eager
        # class (the self-check then refuses the paged path and it runs on the fallback)
        from transformers.models.gpt_neo import modeling_gpt_neo

        classes = modeling_gpt_neo.GPT_NEO_ATTENTION_CLASSES
        classes.setdefault(ATTN_IMPLEMENTATION, classes["eager"])
    except (ImportError, AttributeError, KeyError):  # pragma: no cover - other transformers layouts
        pass
    finally:
        kernels_log.setLevel(level)


# ----------------------------------------------------------------------------- the self-check

# Largest |paged - reference| accepted, relative to the reference's largest |logit|.
_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
_PROBE_WINDOW = 5  # sliding windows are shrunk to this during the probe so that it crosses them
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> refusal (None: exact)
# Models on the gathered layout -> the attention implementation they run with (their own).
_GATHERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def paged_refusal(model: torch.nn.Module, *, self_check: bool = True) -> str | None:
    """Why ``model`` cannot run on :class:`PagedKVCache`, as one line naming its class, or None
    when it can.

    The reason is a layout :func:`kv_spec_of` rejects or, with ``self_check``, a failed probe:
    two sequences of different lengths are prefilled in one batch, one is forked twice, then
    two steps run (one token per row; then 3, 1 and 2 tokens) on a small pool of 4-token
    blocks (so forks copy on write), with sliding windows (and Doge's dynamic-mask window)
    shrunk to 5 tokens; every logit
    must equal the model's own cache-free forward within ``1e-4`` (float32; 2e-2 float16,
    5e-2 bfloat16) of the reference's largest |logit|, and no step may raise. The probe runs
    once per model object (the answer is remembered); afterwards the model uses
    ``ponder_paged`` attention when it passed and its own attention otherwise.
    """
    name = type(model).__name__
    try:
        kv_spec_of(model.config)
    except Exception as exc:  # noqa: BLE001 - e.g. per-layer configs that refuse global head_dim
        return f"{name}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]}"
    if not self_check:
        return None
    if model not in _CHECKED:
        _CHECKED[model] = _probe(model)
    return _CHECKED[model]


def _own_attention(model: torch.nn.Module) -> str:
    impl = getattr(model.config, "_attn_implementation", None)
    if impl and impl != ATTN_IMPLEMENTATION:
        return impl
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def _set_attention(model: torch.nn.Module, impl: str) -> None:
    if getattr(model.config, "_attn_implementation", None) != impl:
        model.set_attn_implementation(impl)
    if impl != ATTN_IMPLEMENTATION and getattr(model.config, "_attn_implementation", impl) != impl:
        # A model that cannot switch (GPT-Neo picks its attention classes at init and ignores the
        # call) still builds its masks for the implementation its config names: name its own.
        model.config._attn_implementation = impl


# Window sizes a short probe would never reach: sliding windows, Doge's dynamic-mask window.
_WINDOW_ATTRS = ("sliding_window", "keep_window_size")


@contextlib.contextmanager
def _small_windows(model: torch.nn.Module, window: int):
    """Shrink every integer window (``_WINDOW_ATTRS``) of the model's configs and modules to
    ``window``, so that the probe crosses it."""
    saved = []
    configs = [model.config]
    text = getattr(model.config, "get_text_config", None)
    if callable(text) and text() is not model.config:
        configs.append(text())
    for obj in (*configs, *model.modules()):
        for attr in _WINDOW_ATTRS:
            value = getattr(obj, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > window:
                saved.append((obj, attr, value))
                setattr(obj, attr, window)
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def _probe_tokens(model: torch.nn.Module, generator: torch.Generator, n: int) -> list[int]:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if emb is not None and getattr(emb, "weight", None) is not None:
        vocab = min(vocab, int(emb.weight.shape[0])) if vocab else int(emb.weight.shape[0])
    low = min(3, max(vocab - 1, 0))
    special = {getattr(model.config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    out = []
    while len(out) < n:
        t = int(torch.randint(low, max(vocab, low + 1), (1,), generator=generator))
        if t not in special or vocab - low <= len(special):
            out.append(t)
    return out


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"


@torch.inference_mode()
def _probe(model: torch.nn.Module) -> str | None:
    """Try the pool layout (ponder_paged attention), then the gathered layout (the model's own
    attention over the K/V ``update`` returns); None when one is exact, else the reasons."""
    name = type(model).__name__
    own = _own_attention(model)
    passed = False
    try:
        if "local" in (getattr(model.config, "attention_layers", None) or ()):
            # GPT-Neo builds its local window into a buffer at init: the probe could not shrink it,
            # and ponder_paged would not apply it; its own attention does, on the gathered layout
            pool = f"{name}: GPT-Neo's local-attention layers need the model's own attention"
        else:
            pool = _probe_run(model, own, gathered=False)
        if pool is None:
            passed = True
            return None
        _GATHERED[model] = own
        gathered = _probe_run(model, own, gathered=True)
        if gathered is None:
            return None
        del _GATHERED[model]
        return f"{pool}; on the gathered layout: {gathered[len(name) + 2:].removeprefix('the paged KV path ')}"
    finally:
        with contextlib.suppress(Exception):
            _set_attention(model, ATTN_IMPLEMENTATION if passed else own)


@torch.inference_mode()
def _probe_run(model: torch.nn.Module, own: str, *, gathered: bool) -> str | None:
    name = type(model).__name__
    param = next(model.parameters())
    g = torch.Generator().manual_seed(20240611)
    paths: dict[int, list[int]] = {}
    got: list[tuple[int, int, torch.Tensor]] = []  # (seq, length after the step, logits [n, V])
    with _small_windows(model, _PROBE_WINDOW):
        try:
            cache = PagedKVCache(kv_spec_of(model.config), num_blocks=32, block_size=4,
                                 dtype=param.dtype, device=param.device)
            a, b = _probe_tokens(model, g, 7), _probe_tokens(model, g, 5)
            sa, _ = cache.new_sequence(a)
            sb, _ = cache.new_sequence(b)
            paths = {sa: list(a), sb: list(b)}
            out = cache.forward(model, [sa, sb], [a, b], logits="all")
            got += [(sa, 7, out[0, :7]), (sb, 5, out[1, :5])]
            kids = [int(k) for k in cache.fork(sa, 2)]
            rows = [kids[0], kids[1], sb]
            for chunk, mode in (((1, 1, 1), "last"), ((3, 1, 2), "all")):
                new = [_probe_tokens(model, g, n) for n in chunk]
                for s, t in zip(rows, new):
                    paths[s] = paths.get(s, paths[sa]) + t
                out = cache.forward(model, rows, new, logits=mode)
                for i, (s, n) in enumerate(zip(rows, chunk)):
                    got.append((s, len(paths[s]), out[i][None] if mode == "last" else out[i, :n]))
        except Exception as exc:  # any failure of the paged path is a refusal
            return f"{name}: the paged KV path fails on a probe ({_first_line(exc)})"
        err = scale = 0.0
        try:
            _set_attention(model, own)
            for s, length, logits in got:
                ref = model(input_ids=torch.tensor([paths[s][:length]], device=param.device),
                            use_cache=False).logits[0, length - logits.shape[0]: length].float()
                err = max(err, float((logits.float() - ref).abs().max()))
                scale = max(scale, float(ref.abs().max()))
        except Exception as exc:  # no reference, no proof: refuse
            return f"{name}: the model's own cache-free forward fails on a probe ({_first_line(exc)})"
    tol = _TOLERANCE.get(param.dtype, 5e-2) * max(scale, 1e-6)
    if not math.isfinite(err) or err > tol:
        return (f"{name}: the paged KV path does not reproduce the model's own logits "
                f"(max error {err:.3g} > tolerance {tol:.3g})")
    return None


def paged_mode(model: torch.nn.Module) -> str:
    """How ``model`` runs on :class:`PagedKVCache`: ``"pool"`` (the ``ponder_paged`` attention
    reads the pool) or ``"gathered"`` (the self-check found the model exact only on its own
    attention over the K/V ``update`` returns, :meth:`PagedBatch.gathered`). A model never
    probed (``self_check=False``) is ``"pool"``."""
    return "gathered" if model in _GATHERED else "pool"


def use_paged_attention(model: torch.nn.Module) -> None:
    """Switch ``model`` to the ``ponder_paged`` attention (no-op if it already uses it)."""
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


_register()
