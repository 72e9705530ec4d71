"""Step-level beam search guided by the PRM, for every problem of the batch in one forest.

Per problem (all problems advance together: one batched policy call and one batched PRM call
per iteration):

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
   kept, the first ``N mod k`` of the k kept get one child more, as search-and-learn's
   ``(beams * repeats)[:N]`` does), and the next iteration starts.
6. The last iteration (``num_iterations``) samples its step and then runs every beam to its
   end (EOS, a boxed answer, or ``max_steps`` steps), without lookahead or selection.

The result: the completions (best first with ``sort_completed``, else in finishing order), cut
to N and padded to N by repetition; when no beam finished at all, the unfinished beams of the
last iteration stand in (they abstain from the vote). The answer: ``vote`` (default weighted)
over the distinct completions with ``agg`` (compat: ``last``).
"""

from __future__ import annotations

import numpy as np

from .common import Run
from .config import SearchResult


def copies(n: int, k: int) -> list[int]:
    """How many of the N next beams each of ``k`` kept beams gets: M each when k = N/M; else
    the first ``n % k`` get one more (search-and-learn's ``(beams * repeats)[:n]``)."""
    return [n // k + (1 if j < n % k else 0) for j in range(k)]


def finalize(run: Run, completed: list[int], leftover: list[int]) -> list[int]:
    """N completions of one problem: sorted (stably, best first) if asked, cut, padded."""
    cfg = run.config
    pool = completed or leftover
    if cfg.sort_completed:
        pool = sorted(pool, key=lambda x: -run.path_score(x))
    pool = pool[: cfg.n]
    if pool and len(pool) < cfg.n:
        pool = (pool * (cfg.n // len(pool) + 1))[: cfg.n]
    return pool


def beam_search(run: Run) -> list[SearchResult]:
    cfg = run.config
    n, keep = cfg.n, cfg.n // cfg.beam_width
    p = run.num_problems
    roots = run.add_roots(1)[:, 0]
    # frontier[problem] = (beams to expand, in beam order; how many children each gets)
    frontier: dict[int, tuple[list[int], list[int]]] = {i: ([int(roots[i])], [n]) for i in range(p)}
    completed: list[list[int]] = [[] for _ in range(p)]
    leftover: list[list[int]] = [[] for _ in range(p)]

    for it in range(cfg.num_iterations):
        if not frontier:
            break
        last = it == cfg.num_iterations - 1
        order = sorted(frontier)
        parents = [b for i in order for b in frontier[i][0]]
        counts = [c for i in order for c in frontier[i][1]]
        children = run.step(parents, counts, lookahead=0 if last else cfg.lookahead)
        ends = run.run_to_end(children) if last else children

        candidates: list[int] = []
        start = 0
        for i in order:
            mine = ends[start : start + sum(frontier[i][1])].tolist()
            start += sum(frontier[i][1])
            active = [x for x in mine if not run.finished[x]]
            completed[i].extend(x for x in mine if run.finished[x])
            if last:
                leftover[i] = active
            elif not active or (not cfg.sort_completed and len(completed[i]) >= n):
                run.prune(active)
            else:
                candidates.extend(active)

        frontier = {}
        if candidates and not last:
            kept = run.forest.select_beam(
                np.array(candidates, dtype=np.int32), keep, cfg.agg, cfg.filter_duplicates
            ).tolist()
            kept_set = set(kept)
            run.prune([x for x in candidates if x not in kept_set])
            by_problem: dict[int, list[int]] = {}
            for x in sorted(kept):  # beam order = node id order, as the beams were created
                by_problem.setdefault(run.problem[x], []).append(x)
            for i, beams in by_problem.items():
                frontier[i] = (beams, copies(n, len(beams)))

    pools = [finalize(run, completed[i], leftover[i]) for i in range(p)]
    return run.results(pools, cfg.final_vote, cfg.vote_agg)
