"""REBASE (Wu et al. 2024, reward-balanced search): a tree that widens under good nodes.

Per problem, one iteration per engine step (every live search advances together):

1. The root gets N children (the budget).
2. Every frontier node's children sample one step each; the PRM scores them. Children that
   finished (EOS or a boxed answer) join the completions and use up one unit of the budget
   each.
3. The remaining budget ``B = N - completions`` is split over the unfinished children:
   ``Forest.children_counts(children, B, agg, "proportional", rebase_temperature)`` gives
   child j ``B * softmax(score / T)_j`` children (largest-remainder rounding, ties to the
   lower id). Children given none are pruned; the others form the next frontier.
4. The last iteration (``num_iterations``) runs every frontier path to its end (EOS, a boxed
   answer or ``max_steps`` steps) without allocation. A problem stops early when its budget
   is spent or no unfinished path is left.

Every iteration spends at most B paths, so a problem never grows more than N paths at a
depth. Result: the completions in finishing order followed by the unfinished paths of the
last iteration (which abstain from the vote). Answer: ``vote`` (default weighted) with ``agg``.
``ParticleFiltering`` (particle_filtering.py) is this machine with resampling instead of
proportional allocation.
"""

from __future__ import annotations

import numpy as np

from .method import Method


class Rebase(Method):
    def start(self, roots: np.ndarray) -> None:
        self.it = 0
        self.frontier, self.counts = [int(roots[0])], [self.config.n]
        self.completed: list[int] = []
        self.leftover: list[int] = []

    @property
    def last(self) -> bool:
        return self.it == self.config.num_iterations - 1

    def expansion(self):
        if not self.frontier:
            return [], [], 0
        return list(self.frontier), list(self.counts), 0

    def expanded(self, children: np.ndarray) -> None:
        if self.last:
            self.to_end(children)
        else:
            self.ended(children)

    def allocate(self, active: list[int], budget: int) -> list[int]:
        """Children per active node, summing to ``budget``."""
        cfg = self.config
        ids = np.array(active, dtype=np.int32)
        return self.tree.forest.children_counts(ids, budget, cfg.agg, "proportional", cfg.rebase_temperature, 0).tolist()

    def ended(self, ends: np.ndarray) -> None:
        tree = self.tree
        mine = ends.tolist()
        active = [x for x in mine if not tree.nodes[x].finished]
        self.completed.extend(x for x in mine if tree.nodes[x].finished)
        self.frontier, self.counts = [], []
        budget = self.config.n - len(self.completed)
        if self.last:
            self.leftover = active
        elif not active or budget <= 0:
            tree.prune(active)
        else:
            counts = self.allocate(active, budget)
            tree.prune([x for x, c in zip(active, counts) if c == 0])
            self.frontier = [x for x, c in zip(active, counts) if c > 0]
            self.counts = [c for c in counts if c > 0]
        self.it += 1
        self.done = not self.frontier or self.it >= self.config.num_iterations

    def final(self):
        return self.completed + self.leftover, self.config.final_vote, self.config.vote_agg

    def partial(self) -> list[int]:
        return self.completed + (self.ends_so_far or list(self.frontier))
