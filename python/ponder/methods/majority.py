"""Majority voting: N full solutions per problem, the most frequent (normalized) answer wins.

No PRM is involved. Ties go to the answer seen first (sampling order); solutions without a
boxed answer abstain.
"""

from __future__ import annotations

import numpy as np

from .method import Method


class SampleSolutions(Method):
    """N solutions, sampled step by step: the root gets N children (the policy's samples
    0..N-1 of the prompt), then every unfinished path takes one more step per engine step until
    it ends (EOS, a boxed answer) or has ``max_steps`` steps. ``solutions``: the N last nodes,
    in sample order."""

    vote = "majority"

    def start(self, roots: np.ndarray) -> None:
        self.root = int(roots[0])
        self.solutions: list[int] = []
        self._first = True

    def expansion(self):
        if self._first:
            return [self.root], [self.config.n], 0
        return [], [], 0

    def expanded(self, children: np.ndarray) -> None:
        self._first = False
        self.to_end(children)

    def ended(self, ends: np.ndarray) -> None:
        self.solutions = ends.tolist()
        self.done = True

    def final(self):
        agg = self.config.agg if self.vote == "majority" else self.config.vote_agg
        return self.solutions, self.vote, agg

    def partial(self) -> list[int]:
        return self.solutions or self.ends_so_far


class Majority(SampleSolutions):
    vote = "majority"
