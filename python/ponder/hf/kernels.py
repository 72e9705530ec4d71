"""Paged KV-cache data-plane kernels on torch tensors (CPU and CUDA).

Thin wrappers over ``ponder._core.write_kv`` / ``copy_blocks`` / ``gather_kv`` /
``paged_decode_attention``, which take any DLPack tensors. These wrappers add what torch users
expect: inputs are ``.detach()``-ed, CUDA work is enqueued on torch's current stream of the
tensors' device (under ``torch.cuda.device``), and outputs are allocated when not given.

Pool layout (one layer): ``k_cache`` and ``v_cache`` are each
``[num_blocks, block_size, num_kv_heads, head_dim]``, contiguous, float32 / float16 / bfloat16.
Token slot ``s`` is block ``s // block_size``, offset ``s % block_size``. All data tensors of a
call share one dtype and one device; index tensors are int32 or int64.

``check_indices=True`` (the default) checks index *values* before running (slots and block ids
in range, lengths within the block table, ...) and raises ``ValueError``; for CUDA tensors this
copies the index tensors to the host and synchronizes the stream. Pass ``False`` in a hot loop
or under CUDA-graph capture: the kernels still never touch memory out of bounds (a bad slot is
skipped, a bad block id reads as an absent token, lengths are clamped).

Duplicates are undefined unless checked: a slot given twice to ``write_kv``, a block given twice
in ``copy_blocks``' ``dst``, or a block both a source and a destination. On CUDA (and on the CPU
when a call runs multithreaded) which write lands is then unspecified. ``check_indices`` rejects
them; callers passing ``check_indices=False`` must rule them out (``KVCacheManager`` does).

Hot loops check once per batch on the host instead (:func:`check_batch_indices`, on the numpy
arrays before they are copied to the device) and then call the kernels with
``check_indices=False`` (``ponder.hf.kv.PagedKVCache`` does this for every forward pass).

torch is imported on first use only; ``import ponder`` does not import it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import _core

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["write_kv", "copy_blocks", "gather_kv", "paged_decode_attention", "check_batch_indices"]


def _torch():
    import torch

    return torch


def _launch(fn, device, *args, check_indices: bool):
    """Run ``fn(*args)`` for tensors on ``device``: current stream and device guard for CUDA."""
    torch = _torch()
    if device.type == "cuda":
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            return fn(*args, stream=stream, check_indices=check_indices)
    return fn(*args, check_indices=check_indices)


def _d(t):
    """Detach torch tensors (others pass through: numpy arrays are fine for _core)."""
    return t.detach() if hasattr(t, "detach") and hasattr(t, "requires_grad") else t


def _device(t, name: str):
    dev = getattr(t, "device", None)
    if dev is None or not hasattr(dev, "type"):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return dev


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    check_indices: bool = True,
) -> None:
    """Scatter new tokens' keys and values into one layer's paged pool, in place.

    Args:
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, contiguous,
            float32 / float16 / bfloat16.
        k_new, v_new: ``[T, num_kv_heads, head_dim]``, same dtype and device; any strides
            (e.g. a slice of a fused QKV projection).
        slot_mapping: int64 (or int32) ``[T]``: token ``t`` goes to slot
            ``block * block_size + offset``; a negative slot skips the token (padding).
        check_indices: check the slot values first (see the module docstring).
    """
    _launch(
        _core.write_kv,
        _device(k_cache, "k_cache"),
        _d(k_cache),
        _d(v_cache),
        _d(k_new),
        _d(v_new),
        _d(slot_mapping),
        check_indices=check_indices,
    )


def copy_blocks(
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    src: torch.Tensor,
    dst: torch.Tensor,
    *,
    check_indices: bool = True,
) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` in every layer's K and V pool (copy-on-write).

    Args:
        k_caches, v_caches: one pool per layer, each ``[num_blocks, block_size, num_kv_heads,
            head_dim]`` contiguous; all of one shape, dtype and device.
        src, dst: int32 / int64 ``[m]`` block ids on the pools' device. With ``check_indices``,
            ids must be in ``[0, num_blocks)``, ``dst`` entries distinct and no block both a
            source and a destination.
    """
    k_caches = [_d(t) for t in k_caches] if isinstance(k_caches, (list, tuple)) else k_caches
    v_caches = [_d(t) for t in v_caches] if isinstance(v_caches, (list, tuple)) else v_caches
    device = _device(src, "src")
    _launch(_core.copy_blocks, device, k_caches, v_caches, _d(src), _d(dst), check_indices=check_indices)


def gather_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    out_k: torch.Tensor | None = None,
    out_v: torch.Tensor | None = None,
    *,
    max_len: int | None = None,
    check_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each sequence's cached keys and values into dense, zero-padded tensors.

    ``out_k[b, t] = k_cache[block_tables[b, t // block_size], t % block_size]`` for
    ``t < lengths[b]``; positions ``t >= lengths[b]`` are zero.

    Args:
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` pools.
        block_tables: int32 (or int64) ``[B, max_blocks]``.
        lengths: int64 (or int32) ``[B]``.
        out_k, out_v: ``[B, L, num_kv_heads, head_dim]`` contiguous outputs with
            ``L >= max(lengths)``; allocated when ``None`` (with ``L = max_len`` if given, else
            ``max(lengths)``, which reads ``lengths`` on the host).

    Returns:
        ``(out_k, out_v)``.
    """
    torch = _torch()
    if (out_k is None) != (out_v is None):
        raise ValueError("pass both out_k and out_v, or neither")
    if out_k is None:
        if max_len is None:
            max_len = int(lengths.max().item()) if lengths.numel() else 0
            max_len = max(max_len, 0)
        shape = (block_tables.shape[0], int(max_len), k_cache.shape[2], k_cache.shape[3])
        out_k = torch.empty(shape, dtype=k_cache.dtype, device=k_cache.device)
        out_v = torch.empty(shape, dtype=k_cache.dtype, device=k_cache.device)
    _launch(
        _core.gather_kv,
        _device(k_cache, "k_cache"),
        _d(k_cache),
        _d(v_cache),
        _d(block_tables),
        _d(lengths),
        _d(out_k),
        _d(out_v),
        check_indices=check_indices,
    )
    return out_k, out_v


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    *,
    check_indices: bool = True,
) -> torch.Tensor:
    """Decode attention: one query token per sequence over its paged K/V cache.

    ``out[b, h] = softmax(scale * q[b, h] @ K_b^T) @ V_b`` where ``K_b, V_b`` are the first
    ``lengths[b]`` cached tokens of sequence ``b`` (already including the current token) for kv
    head ``h // (num_q_heads // num_kv_heads)`` (GQA / MQA). Accumulates in float32 (online
    softmax); ``lengths[b] == 0`` gives zeros.

    Args:
        q: ``[B, num_q_heads, head_dim]``, any strides, same dtype as the pools.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` pools;
            ``num_q_heads % num_kv_heads == 0``.
        block_tables: int32 (or int64) ``[B, max_blocks]``.
        lengths: int64 (or int32) ``[B]``, ``lengths[b] <= max_blocks * block_size``.
        scale: softmax scale; default ``1 / sqrt(head_dim)``.
        out: ``[B, num_q_heads, head_dim]`` contiguous output; allocated when ``None``.

    Returns:
        ``out`` (``[B, num_q_heads, head_dim]``, dtype of ``q``).
    """
    torch = _torch()
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch(
        _core.paged_decode_attention,
        _device(q, "q"),
        _d(out),
        _d(q),
        _d(k_cache),
        _d(v_cache),
        _d(block_tables),
        _d(lengths),
        float(scale),
        check_indices=check_indices,
    )
    return out


def check_batch_indices(
    num_blocks: int,
    block_size: int,
    *,
    slot_mapping=None,
    block_tables=None,
    lengths=None,
) -> None:
    """Check a batch's index values on the host, once, with the same rules as ``check_indices``.

    Inputs are numpy arrays (or anything ``numpy.asarray`` reads without a device copy), checked
    before they are moved to the pools' device, so the per-layer kernel calls can pass
    ``check_indices=False`` without a host copy and synchronization per layer.

    Args:
        num_blocks, block_size: the pools' first two dimensions.
        slot_mapping: int ``[T]``: every slot ``< num_blocks * block_size`` (negative = padding)
            and no slot twice (the ``write_kv`` rule).
        block_tables, lengths: int ``[B, max_blocks]`` and ``[B]`` (both or neither):
            ``0 <= lengths[b] <= max_blocks * block_size`` and the block ids of the first
            ``ceil(lengths[b] / block_size)`` entries of row ``b`` in ``[0, num_blocks)`` (the
            ``gather_kv`` / ``paged_decode_attention`` rule).

    Raises:
        ValueError naming the first bad entry.
    """
    import numpy as np

    if slot_mapping is not None:
        slots = np.asarray(slot_mapping).reshape(-1).astype(np.int64, copy=False)
        bad = np.flatnonzero(slots >= num_blocks * block_size)
        if len(bad):
            t = int(bad[0])
            raise ValueError(
                f"slot_mapping[{t}] = {int(slots[t])} is out of range: the pool has {num_blocks * block_size} slots"
            )
        used = slots[slots >= 0]
        uniq, counts = np.unique(used, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"slot {int(uniq[counts > 1][0])} is given twice in slot_mapping")
    if (block_tables is None) != (lengths is None):
        raise ValueError("pass both block_tables and lengths, or neither")
    if block_tables is not None:
        table = np.asarray(block_tables).astype(np.int64, copy=False)
        lens = np.asarray(lengths).reshape(-1).astype(np.int64, copy=False)
        if table.ndim != 2 or table.shape[0] != len(lens):
            raise ValueError(f"block_tables {table.shape} and lengths {lens.shape} do not describe one batch")
        capacity = table.shape[1] * block_size
        bad = np.flatnonzero((lens < 0) | (lens > capacity))
        if len(bad):
            b = int(bad[0])
            raise ValueError(f"lengths[{b}] = {int(lens[b])} is outside [0, {capacity}] (max_blocks x block_size)")
        used = np.arange(table.shape[1])[None, :] < -(-lens // block_size)[:, None]
        bad_ids = used & ((table < 0) | (table >= num_blocks))
        if bad_ids.any():
            b, j = (int(x) for x in np.argwhere(bad_ids)[0])
            raise ValueError(f"block_tables[{b}, {j}] = {int(table[b, j])} is out of range [0, {num_blocks})")
