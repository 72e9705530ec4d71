"""REBASE (Wu et al. 2024, reward-balanced search): a tree that widens under good nodes.

Per problem, one iteration per engine step (every live search advances together):

1. The root gets N children (the budget).
2. Every frontier node's children sample one step each; the PRM scores them. Children that
   finished (EOS or a boxed answer) join the completions and use up one unit of the budget
   each.
3. The remaining budget ``B = N - completions`` is split over the unfinished children by
   ``Forest.children_counts(children, B, agg, rebase_allocation, rebase_temperature)``:
   child j's share is ``B * softmax(score / T)_j``, rounded with ``rebase_allocation``:
   ``ceil`` (default, the released code's: best first, ties to the lower id, each gets the
   ceiling of its share of what the better ones left) or ``proportional`` (largest
   remainder, ties to the lower id). Children given none are pruned; the others form the
   next frontier.
4. The last iteration (``num_iterations``) runs every frontier path to its end (EOS, a boxed
   answer or ``max_steps`` steps) without allocation. A problem stops early when its budget
   is spent or no unfinished path is left.

Every iteration spends at most B paths, so a problem never grows more than N paths at a
depth. Result: the completions in finishing order followed by the unfinished paths of the
last iteration (which abstain from the vote). Answer: ``vote`` (default weighted) with ``agg``.
``ParticleFiltering`` is this machine with resampling instead of proportional allocation;
the frontier bookkeeping is ``frontier.FrontierSearch``'s.
"""

from __future__ import annotations

import numpy as np

from .frontier import FrontierSearch


class Rebase(FrontierSearch):
    def allocate(self, active: list[int], budget: int) -> list[int]:
        """Children per active node, summing to ``budget``."""
        cfg = self.config
        ids = np.array(active, dtype=np.int32)
        return self.tree.forest.children_counts(ids, budget, cfg.agg, cfg.rebase_allocation, cfg.rebase_temperature,
                                                0).tolist()

    def next_frontier(self, active: list[int]) -> tuple[list[int], list[int]]:
        budget = self.config.n - len(self.completed)
        if not active or budget <= 0:
            self.tree.prune(active)
            return [], []
        counts = self.allocate(active, budget)
        self.tree.prune([x for x, c in zip(active, counts) if c == 0])
        return [x for x, c in zip(active, counts) if c > 0], [c for c in counts if c > 0]

    def final(self):
        return self.completed + self.leftover, self.config.final_vote, self.config.vote_agg

    def partial(self) -> list[int]:
        return self.completed + (self.ends_so_far or list(self.frontier))
