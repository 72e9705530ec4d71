"""Majority voting: N full solutions per problem, the most frequent (normalized) answer wins.

No PRM is involved. Ties go to the answer seen first (sampling order); solutions without a
boxed answer abstain.
"""

from __future__ import annotations

import numpy as np

from .common import Run
from .config import SearchResult


def sample_solutions(run: Run) -> list[list[int]]:
    """N solutions per problem, sampled step by step, all problems in one batch per step.

    The first stage gives each root N children (the policy's samples 0..N-1 of the prompt);
    then every unfinished path takes one more step per stage until it ends (EOS, a boxed
    answer) or has ``max_steps`` steps. Returns per problem the N last nodes, in sample order.
    """
    n = run.config.n
    roots = run.add_roots(1)[:, 0]
    first = run.step(roots, np.full(roots.size, n, dtype=np.int32))
    ends = run.run_to_end(first)
    return [ends[p * n : (p + 1) * n].tolist() for p in range(run.num_problems)]


def majority(run: Run) -> list[SearchResult]:
    return run.results(sample_solutions(run), "majority", run.config.agg)
