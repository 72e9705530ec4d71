"""Batching shared by ``HFPolicy`` and ``HFPRM``: token-budget forward batches, and a prefill
that computes each distinct token row once and forks it for its duplicates."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

# How many new tokens a prefill forward may hold on an accelerator: bounds the gathered K/V and
# the [B, 1, T, L] mask.
PREFILL_BATCH_TOKENS = 16384
# On CPU large forwards run fewer tokens/s (activations leave the caches): docs/prm.md.
CPU_PREFILL_BATCH_TOKENS = 1024


def prefill_batch_tokens(device: torch.device | str) -> int:
    """The new-token budget of one prefill forward on ``device``: ``CPU_PREFILL_BATCH_TOKENS``
    on CPU, ``PREFILL_BATCH_TOKENS`` elsewhere."""
    return CPU_PREFILL_BATCH_TOKENS if torch.device(device).type == "cpu" else PREFILL_BATCH_TOKENS


def token_batches(lengths: Sequence[int], limit: int) -> Iterator[tuple[int, int]]:
    """Consecutive (i, j) row ranges of ``lengths`` (new tokens per row), every row in exactly
    one range, in order. A range holds at most ``limit`` tokens (one row at least) and ends
    before a row that would make its padded size (rows x longest row) more than 1.25x its
    tokens + 64: rows are padded to the longest, so mixed lengths waste compute (callers that
    sort rows by length get few ranges)."""
    i, n = 0, len(lengths)
    while i < n:
        j, total, longest = i, 0, 0
        while j < n:
            m = int(lengths[j])
            if j > i and (total + m > limit or (j - i + 1) * max(longest, m) > 1.25 * (total + m) + 64):
                break
            total, longest = total + m, max(longest, m)
            j += 1
        yield i, j
        i = j


def prefill_distinct(kv, rows: Sequence[Sequence[int]], run: Callable[[list[int], list[list[int]]], Sequence[Any]]
                     ) -> tuple[list[int], list[Any]]:
    """One KV sequence per token row (each non-empty), computing each distinct row once.

    The first row of each distinct content gets ``kv.new_sequence`` (over its cached prefix) and
    its uncached tokens run in one ``run(seqs, new_tokens)`` call, which returns one result per
    such row; every later duplicate forks that row's sequence and shares its result. Returns
    (sequence id per row, result per row). On an error every sequence made is freed."""
    first: dict[tuple[int, ...], int] = {}
    for i, r in enumerate(rows):
        first.setdefault(tuple(r), i)
    owners = sorted(first.values())
    seqs: dict[int, int] = {}
    created: list[int] = []
    try:
        news = []
        for i in owners:
            seq, cached = kv.new_sequence(rows[i])  # cached <= len - 1: the last token is computed
            created.append(int(seq))
            seqs[i] = int(seq)
            news.append(list(rows[i][cached:]))
        got = list(run([seqs[i] for i in owners], news)) if owners else []
        result = dict(zip(owners, got))
        out_seqs, out = [], []
        for i, r in enumerate(rows):
            owner = first[tuple(r)]
            if owner == i:
                out_seqs.append(seqs[i])
            else:
                (seq,) = kv.fork(seqs[owner], 1)
                created.append(int(seq))
                out_seqs.append(int(seq))
            out.append(result[owner])
    except BaseException:
        kv.free(created)
        raise
    return out_seqs, out
