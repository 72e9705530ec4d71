"""Diverse verifier tree search: N/M independent greedy subtrees per problem.

Per problem, one iteration per engine step (every live search and subtree advances together:
one batched policy call and one batched PRM call per step):

1. N/M roots, one per subtree (``Forest.add_roots`` with subtree ids 0..N/M-1).
2. Every live subtree samples M candidate next steps (+ ``lookahead`` greedy steps the PRM
   scores but the search does not keep); in the last iteration every candidate is then run
   to its end (EOS, a boxed answer or ``max_steps`` steps).
3. The PRM scores them; ``Forest.select_dvts`` keeps each subtree's best candidate by
   aggregated score (ties: the earlier candidate); its siblings are pruned.
4. A subtree ends when its best step finished (EOS or a boxed answer; compat: also cut off)
   or after the last iteration.

The result: each subtree's final path, N/M completions per problem, unfinished ones
abstaining from the vote (compat: the M candidates of each subtree's last expansion, N in
all). The answer: ``vote`` (default weighted) with ``SearchConfig.vote_agg``.
"""

from __future__ import annotations

import numpy as np

from .method import IterativeMethod


class DVTS(IterativeMethod):
    @property
    def subtrees(self) -> int:
        return self.config.n // self.config.beam_width

    def start(self, roots: np.ndarray) -> None:
        self.it = 0
        self.live = list(range(roots.size))  # subtrees still searching
        self.leaf = {s: int(r) for s, r in enumerate(roots.tolist())}
        self.final_node: dict[int, int] = {}
        self.last_candidates: dict[int, list[int]] = {}

    def expansion(self):
        if not self.live:
            return [], [], 0
        m = self.config.beam_width
        return [self.leaf[s] for s in self.live], [m] * len(self.live), 0 if self.last else self.config.lookahead

    def ended(self, ends: np.ndarray) -> None:
        m, tree = self.config.beam_width, self.tree
        best = tree.forest.select_dvts(ends, self.config.agg).tolist()
        # Candidates are grouped by subtree in ``live`` order, so select_dvts's groups are too.
        if len(best) != len(self.live):
            raise RuntimeError(f"select_dvts returned {len(best)} groups for {len(self.live)} subtrees")
        still = []
        for j, (s, b) in enumerate(zip(self.live, best)):
            group = ends[j * m : (j + 1) * m].tolist()
            over = self.last or tree.nodes[b].finished
            if over:
                self.final_node[s] = b
                self.last_candidates[s] = group
            else:
                self.leaf[s] = b
                still.append(s)
            if not (over and self.search.compat):  # compat returns an ended subtree's candidates
                tree.prune([x for x in group if x != b])
        self.live = still
        self.it += 1
        self.done = not self.live or self.it >= self.config.num_iterations

    def final(self):
        k = self.subtrees
        if self.search.compat:
            pool = [x for s in range(k) for x in self.last_candidates[s]]
        else:
            pool = [self.final_node[s] for s in range(k)]
        return pool, self.config.final_vote, self.config.vote_agg

    def partial(self) -> list[int]:
        return [self.final_node.get(s, self.leaf[s]) for s in range(self.subtrees)]
