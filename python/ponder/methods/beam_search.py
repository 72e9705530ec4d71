"""Step-level beam search guided by the PRM, for every problem of the batch in one forest.

Per problem, one iteration per engine step (every live search advances together: one batched
policy call and one batched PRM call per step):

1. Start with N copies of the prompt: the root gets N children.
2. Every active beam samples one step (+ ``lookahead`` greedy steps the PRM scores but the
   search does not keep); the PRM scores every new step.
3. Beams that finished (EOS or a boxed answer; compat: also cut off) leave the active set and
   join the completions. A problem with no active beam left is done; so is one with N
   completions when ``sort_completed`` is off (more could not change its first N).
4. Of the rest keep the top N/M by aggregated score (``Forest.select_beam``; with
   ``filter_duplicates`` a step that repeats a sibling's step counts once). Ties go to the
   earlier beam.
5. Kept beams, in beam order, are copied back to N: each into M children (with fewer than N/M
   kept, the first ``N mod k`` of the k kept get one child more: ``copies``), and the next
   iteration starts.
6. The last iteration (``num_iterations``) samples its step and then runs every beam to its
   end (EOS, a boxed answer, or ``max_steps`` steps), without lookahead or selection.

The result: the completions (best first with ``sort_completed``, else in finishing order), cut
to N and padded to N by repetition; when no beam finished at all, the unfinished beams of the
last iteration stand in (they abstain from the vote). The answer: ``vote`` (default weighted)
over the distinct completions with ``SearchConfig.vote_agg``.
"""

from __future__ import annotations

import numpy as np

from .frontier import FrontierSearch


def copies(n: int, k: int) -> list[int]:
    """How many of the N next beams each of ``k`` kept beams gets: M each when k = N/M; else
    the first ``n % k`` get one more (the order of ``(beams * repeats)[:n]``)."""
    return [n // k + (1 if j < n % k else 0) for j in range(k)]


class BeamSearch(FrontierSearch):
    def lookahead(self) -> int:
        return 0 if self.last else self.config.lookahead

    def next_frontier(self, active: list[int]) -> tuple[list[int], list[int]]:
        cfg, tree = self.config, self.tree
        if not active or (not cfg.sort_completed and len(self.completed) >= cfg.n):
            tree.prune(active)
            return [], []
        kept = tree.forest.select_beam(
            np.array(active, dtype=np.int32), cfg.n // cfg.beam_width, cfg.agg, cfg.filter_duplicates
        ).tolist()
        kept_set = set(kept)
        tree.prune([x for x in active if x not in kept_set])
        beams = sorted(kept)  # beam order = node id order, as the beams were created
        return beams, copies(cfg.n, len(beams))

    def _pool(self, completed: list[int], leftover: list[int]) -> list[int]:
        """N completions: sorted (stably, best first) if asked, cut, padded."""
        cfg = self.config
        pool = completed or leftover
        if cfg.sort_completed:
            scores = self.tree.path_scores(pool, cfg.agg)
            pool = [x for _, x in sorted(zip(scores, pool), key=lambda t: -t[0])]
        pool = pool[: cfg.n]
        if pool and len(pool) < cfg.n:
            pool = (pool * (cfg.n // len(pool) + 1))[: cfg.n]
        return pool

    def final(self):
        return self._pool(self.completed, self.leftover), self.config.final_vote, self.config.vote_agg

    def partial(self) -> list[int]:
        return self._pool(self.completed, self.ends_so_far or list(self.frontier))
