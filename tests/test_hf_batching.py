"""``ponder.hf._batching``: forward batches that cover every row once, respect the token limit
and pad least (the dynamic program against brute force on small inputs)."""

from __future__ import annotations

import itertools
import random

from ponder.hf._batching import sorted_token_batches, token_batches


def cost(lengths, ranges, overhead):
    return sum(overhead + (j - i) * max(lengths[i:j]) for i, j in ranges)


def all_partitions(n):
    """Every split of 0..n-1 into consecutive ranges."""
    for cuts in itertools.product([False, True], repeat=n - 1):
        ranges, start = [], 0
        for k, cut in enumerate(cuts, start=1):
            if cut:
                ranges.append((start, k))
                start = k
        yield ranges + [(start, n)]


def test_token_batches_is_the_cheapest_partition_within_the_limit():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 8)
        lengths = [rng.randint(1, 40) for _ in range(n)]
        limit = rng.choice([16, 50, 120, 1000])
        overhead = rng.choice([0, 8, 32, 64])
        got = list(token_batches(lengths, limit, overhead))
        # every row once, in order
        assert [x for i, j in got for x in range(i, j)] == list(range(n))
        # within the limit (a longer row alone)
        assert all((j - i) * max(lengths[i:j]) <= limit or j - i == 1 for i, j in got)
        feasible = [p for p in all_partitions(n) if all((j - i) * max(lengths[i:j]) <= limit or j - i == 1 for i, j in p)]
        assert cost(lengths, got, overhead) == min(cost(lengths, p, overhead) for p in feasible)


def test_sorted_batches_cover_every_row_and_pad_little():
    rng = random.Random(1)
    lengths = [rng.randint(1, 40) for _ in range(300)]
    groups = sorted_token_batches(lengths, 1024, 32)
    assert sorted(r for g in groups for r in g) == list(range(300))
    padded = sum(len(g) * max(lengths[r] for r in g) for g in groups)
    assert padded <= 1.1 * sum(lengths)
    assert all(len(g) * max(lengths[r] for r in g) <= 1024 for g in groups)
    assert list(token_batches([], 10)) == []
