"""Particle filtering and REBASE one problem at a time, with lists of ``Beam``s: the tests' oracle.

Written like ``oracle.py`` (same ``_Models`` Protocol driver, same ``Beam``, same
vote), so that ``ponder.search`` with ``method="particle_filtering"`` / ``"rebase"`` can be
compared with it call for call on deterministic scripted models. The selection arithmetic is
``twins.forest``'s (``count_weights``, ``counts_from_weights``: the specification of
``Forest.children_counts``); everything else is here.

Both methods, per problem: the root gets N children; each iteration every frontier path gets
its count of children (one sampled step each); the finished ones join the completions; the
budget ``B = N - completions`` is split over the unfinished ones (REBASE: by softmax(score
/ T), rounded by ``rebase_allocation``; particle filtering with ``pf_finished="keep"``: resampled at every step
with threshold 1, else when the ESS of the weights is below threshold * B, else one each);
the last iteration runs every path to its end. The result: completions in finishing order,
then the unfinished paths of the last iteration. Particle filtering with
``pf_finished="resample"`` (its_hub's) resamples all N particles, finished ones included (a
finished path held by m particles weighs m times), and returns the finished paths still held
at the end. Its vote defaults to ``best``.
"""

from __future__ import annotations

import math

from ..methods.particle_filtering import weight_args
from ..twins.forest import count_weights, counts_from_weights
from .oracle import Beam, OracleResult, _final_vote, _Models, _vote, aggregate_scores


def _ranks(beams: list[Beam], agg: str) -> list[float]:
    out = [aggregate_scores(b.all_scores, agg) for b in beams]
    return [-math.inf if math.isnan(x) else x for x in out]


def _rebase_counts(beams, budget, config, iteration, seed) -> list[int]:
    w = count_weights(_ranks(beams, config.agg), config.rebase_temperature)
    return counts_from_weights(w, [b.node for b in beams], budget, config.rebase_allocation, 0)


def _pf_counts(beams, budget, config, iteration, seed, mult=None) -> list[int]:
    temperature, weights = weight_args(config)
    w = count_weights(_ranks(beams, config.agg), temperature, weights, mult)
    m = mult or [1] * len(beams)
    s = sq = 0.0
    for x, k in zip(w, m):  # ESS over particles: a weight x held by k particles is k of x / k
        s += x
        sq += x * x / k
    if config.pf_ess_threshold < 1 and s * s / sq >= config.pf_ess_threshold * budget:  # 1: always
        return list(m)
    stream = (int(seed) * 1_000_003 + iteration) % (2**63)
    return counts_from_weights(w, [b.node for b in beams], budget, config.pf_resampling, stream)


def _pf_resample_one(problem: str, models: _Models, config) -> OracleResult:
    """Particle filtering with ``pf_finished="resample"``: all N particles are resampled."""
    n = config.n
    (root,) = models.start(problem, 1)
    frontier, counts = [Beam(prompt=problem, index=0, node=root)], [n]
    held: list[tuple[Beam, int]] = []  # finished paths in finishing order, particles holding each
    leftover: list[Beam] = []
    for i in range(config.num_iterations):
        last = i == config.num_iterations - 1
        parents = [b for b, c in zip(frontier, counts) for _ in range(c)]
        children = [c[0] for c in models.generate_k_steps(parents, 1, 0)]
        if last:
            children = models.run_to_end(children)
        held += [(b, 1) for b in children if b.completed]
        active = [b for b in children if not b.completed]
        if last:
            leftover = active
            break
        got = _pf_counts([b for b, _ in held] + active, n, config, i, models.params.seed,
                         [m for _, m in held] + [1] * len(active))
        rest = got[len(held):]
        held = [(b, c) for (b, _), c in zip(held, got) if c > 0]
        frontier = [b for b, c in zip(active, rest) if c > 0]
        counts = [c for c in rest if c > 0]
        if not frontier:
            break
    pool = [b for b, _ in held] + leftover
    return OracleResult(_vote(pool, config.vote or "best", _final_vote(config)[1]), pool)


def _one(problem: str, models: _Models, config, allocate, vote: str = "weighted") -> OracleResult:
    n = config.n
    (root,) = models.start(problem, 1)
    frontier, counts = [Beam(prompt=problem, index=0, node=root)], [n]
    completed: list[Beam] = []
    leftover: list[Beam] = []
    for i in range(config.num_iterations):
        last = i == config.num_iterations - 1
        parents = [b for b, c in zip(frontier, counts) for _ in range(c)]  # copies adjacent
        children = [c[0] for c in models.generate_k_steps(parents, 1, 0)]
        if last:
            children = models.run_to_end(children)
        completed += [b for b in children if b.completed]
        active = [b for b in children if not b.completed]
        if last:
            leftover = active
            break
        budget = n - len(completed)
        if not active or budget <= 0:
            break
        got = allocate(active, budget, config, i, models.params.seed)
        frontier = [b for b, c in zip(active, got) if c > 0]
        counts = [c for c in got if c > 0]
    pool = completed + leftover
    return OracleResult(_vote(pool, config.vote or vote, _final_vote(config)[1]), pool)


def rebase(problems, policy, prm, config) -> list[OracleResult]:
    """REBASE (Wu et al. 2024), one problem at a time."""
    models = _Models(policy, prm, config)
    return [_one(p, models, config, _rebase_counts) for p in problems]


def particle_filtering(problems, policy, prm, config) -> list[OracleResult]:
    """Particle filtering (Puri et al. 2025), one problem at a time."""
    models = _Models(policy, prm, config)
    if config.pf_finished == "resample":
        return [_pf_resample_one(p, models, config) for p in problems]
    return [_one(p, models, config, _pf_counts, "best") for p in problems]
