"""Diverse verifier tree search: N/M independent greedy subtrees per problem.

Per problem (all problems and subtrees advance together: one batched policy call and one
batched PRM call per iteration):

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
all, as search-and-learn returns them). The answer: ``vote`` (default weighted) with ``agg``
(compat: ``last``).
"""

from __future__ import annotations

import numpy as np

from .common import Run
from .config import SearchResult


def dvts(run: Run) -> list[SearchResult]:
    cfg = run.config
    m, subtrees = cfg.beam_width, cfg.n // cfg.beam_width
    roots = run.add_roots(subtrees)  # [problems, subtrees]
    p = run.num_problems
    keys = [(i, s) for i in range(p) for s in range(subtrees)]
    leaf = {key: int(roots[key]) for key in keys}
    final: dict[tuple[int, int], int] = {}
    last_candidates: dict[tuple[int, int], list[int]] = {}
    live = list(keys)

    for it in range(cfg.num_iterations):
        if not live:
            break
        last = it == cfg.num_iterations - 1
        children = run.step([leaf[k] for k in live], np.full(len(live), m), lookahead=0 if last else cfg.lookahead)
        ends = run.run_to_end(children) if last else children
        best = run.forest.select_dvts(ends, cfg.agg).tolist()
        # Candidates are grouped by subtree in ``live`` order, so select_dvts's groups are too.
        if len(best) != len(live):
            raise RuntimeError(f"select_dvts returned {len(best)} groups for {len(live)} subtrees")
        still = []
        for j, (key, b) in enumerate(zip(live, best)):
            group = ends[j * m : (j + 1) * m].tolist()
            ended = last or run.finished[b]
            if ended:
                final[key] = b
                last_candidates[key] = group
            else:
                leaf[key] = b
                still.append(key)
            if not (ended and run.compat):  # compat returns an ended subtree's candidates
                run.prune([x for x in group if x != b])
        live = still

    pools = []
    for i in range(p):
        if run.compat:
            pools.append([x for s in range(subtrees) for x in last_candidates[(i, s)]])
        else:
            pools.append([final[(i, s)] for s in range(subtrees)])
    return run.results(pools, cfg.final_vote, cfg.vote_agg)
