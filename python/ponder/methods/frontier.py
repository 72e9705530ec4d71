"""The frontier searches (beam search, REBASE, particle filtering): one tree per problem grown
from a frontier of open paths, each with the number of children it gets next.

Per iteration (one engine step): every frontier node gets its children, each samples one step
(+ lookahead where the method uses it) and the PRM scores it; finished children join
``completed``, the unfinished ones go to ``next_frontier``, which returns the new frontier
(nodes, children each) and prunes the rest. The last iteration (``num_iterations``) runs every
child to its end instead (``Method.to_end``) and its unfinished paths become ``leftover``.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from .method import IterativeMethod


class FrontierSearch(IterativeMethod):
    """``frontier``: node ids, ``counts``: children each (the root gets N). ``completed``: the
    finished paths in finishing order; ``leftover``: the unfinished paths of the last iteration."""

    def start(self, roots: np.ndarray) -> None:
        self.it = 0
        self.frontier, self.counts = [int(roots[0])], [self.config.n]
        self.completed: list[int] = []
        self.leftover: list[int] = []

    def lookahead(self) -> int:
        """Greedy steps rolled out after each sampled step this iteration (scored, not kept)."""
        return 0

    def expansion(self):
        if not self.frontier:
            return [], [], 0
        return list(self.frontier), list(self.counts), self.lookahead()

    def ended(self, ends: np.ndarray) -> None:
        mine = ends.tolist()
        active = [x for x in mine if not self.tree.nodes[x].finished]
        self.completed.extend(x for x in mine if self.tree.nodes[x].finished)
        if self.last:
            self.frontier, self.counts = [], []
            self.leftover = active
        else:
            self.frontier, self.counts = self.next_frontier(active)
        self.it += 1
        self.done = not self.frontier or self.it >= self.config.num_iterations

    @abstractmethod
    def next_frontier(self, active: list[int]) -> tuple[list[int], list[int]]:
        """The next frontier (node ids, children each, counts >= 1) chosen among ``active``
        (this iteration's unfinished children, in expansion order); prunes the others."""
        ...
