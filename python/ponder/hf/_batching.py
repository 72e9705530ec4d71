"""Batching shared by ``HFPolicy`` and ``HFPRM``: token-budget forward batches, and a prefill
that computes each distinct token row once and forks it for its duplicates."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
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


# What one more forward costs beyond its tokens, in padded new tokens (the split-or-pad trade-off
# of :func:`token_batches`). On CPU a forward of the built-in models costs ~30 (the implicit PRM's
# two models) to ~65 (the policy) tokens' worth of fixed overhead (benchmarks/bench_engine_profile.py);
# on an accelerator a forward is launch-bound, so padding is cheap and batches stay large.
CPU_FORWARD_OVERHEAD_TOKENS = 32
FORWARD_OVERHEAD_TOKENS = 1024


def forward_overhead_tokens(device: torch.device | str) -> int:
    """The fixed cost of one forward on ``device`` in padded new tokens:
    ``CPU_FORWARD_OVERHEAD_TOKENS`` on CPU, ``FORWARD_OVERHEAD_TOKENS`` elsewhere."""
    return CPU_FORWARD_OVERHEAD_TOKENS if torch.device(device).type == "cpu" else FORWARD_OVERHEAD_TOKENS


def token_batches(lengths: Sequence[int], limit: int, overhead: int = 64) -> Iterator[tuple[int, int]]:
    """Consecutive (i, j) row ranges of ``lengths`` (new tokens per row), every row in exactly
    one range, in order. Rows are padded to the longest of their range, so a range costs
    ``overhead + rows x longest`` (padded tokens; ``overhead``: one forward's fixed cost in
    tokens, :func:`forward_overhead_tokens`); the ranges minimise the total cost (exactly, by
    dynamic programming) subject to ``rows x longest <= limit`` (a longer row alone is a range).
    Callers that sort rows by length get few ranges and little padding."""
    m = np.asarray([int(x) for x in lengths], dtype=np.int64)
    n = len(m)
    if n == 0:
        return
    cost = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        lo = max(0, j - max(1, int(limit)))  # a range of more rows than limit exceeds it
        longest = np.maximum.accumulate(m[lo:j][::-1])  # longest[k]: of rows j-1-k .. j-1
        padded = np.arange(1, len(longest) + 1) * longest
        k = max(1, int(np.searchsorted(padded, limit, side="right")))  # padded is non-decreasing
        total = cost[j - 1 - np.arange(k)] + padded[:k]
        best = int(np.argmin(total))
        cost[j] = total[best] + overhead
        start[j] = j - 1 - best
    ranges = []
    j = n
    while j > 0:
        ranges.append((int(start[j]), j))
        j = int(start[j])
    yield from reversed(ranges)


def sorted_token_batches(lengths: Sequence[int], limit: int, overhead: int) -> list[list[int]]:
    """:func:`token_batches` over the rows sorted by length (stable): lists of row indices, one
    per forward, shortest rows first. Every row is in exactly one list."""
    order = sorted(range(len(lengths)), key=lambda i: int(lengths[i]))
    return [order[i:j] for i, j in token_batches([lengths[i] for i in order], limit, overhead)]


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
