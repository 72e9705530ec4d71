"""Particle filtering (Puri et al. 2025; its_hub's ``ParticleFiltering``) on the shared forest.

Per problem, N particles (paths); one iteration per engine step (every live search advances
together: one batched policy call and one batched PRM call):

1. The root gets N children: N particles.
2. Every unfinished particle samples one step; the PRM scores it. A particle that finished
   (EOS or a boxed answer) stops generating.
3. Weights (``pf_weights``): ``logit`` (default) softmax(logit(score) / ``pf_temperature``),
   the odds r / (1 - r) of the aggregated score r at T=1 (r clamped to [1e-7, 1 - 1e-7]);
   ``softmax``: softmax(score / ``pf_temperature``); ``raw``: the score itself.
   ``pf_finished="resample"`` (default): the candidates are all N particles, finished ones
   included; a finished path held by m particles counts m times. ``"keep"``: only the
   ``B = N - completions`` unfinished particles; finished ones stay completions for good.
4. With ``pf_ess_threshold`` 1 (default, its_hub's) at every step, else when the effective
   sample size ``(sum w)^2 / sum w^2`` (over particles) is below ``pf_ess_threshold`` times
   their number, the particles are resampled (``Forest.children_counts``
   with ``pf_resampling`` = ``multinomial`` or ``systematic``, seeded by the search's seed and
   the iteration): an unfinished particle drawn k times gets k children next iteration (they
   fork its cached prefix), a finished one drawn k times is held by k particles, one drawn 0
   times is dropped (unfinished: pruned). Otherwise every particle goes on as it is. With
   ``"resample"`` this also happens after the step where the last particles finish.
5. The last iteration (``num_iterations``) runs every particle to its end (EOS, a boxed
   answer or ``max_steps`` steps), without resampling after it.

Result: the finished paths still held by particles, in finishing order (each once), then the
unfinished particles of the last iteration (abstaining from the vote). Answer: ``vote``, by
default ``best`` (its_hub's argmax: the completion with the highest ``agg`` score; ties to the
lower node id), with ``agg``.
"""

from __future__ import annotations

import numpy as np

from ..twins.forest import count_weights
from .rebase import Rebase


def ess(weights: list[float], multiplicity: list[int] | None = None) -> float:
    """Effective sample size (sum w)^2 / sum w^2 of unnormalized per-particle weights (float64,
    in order). ``weights`` may be per candidate already multiplied by its multiplicity m
    (``count_weights``): a candidate of weight W = m * w stands for m particles of weight w."""
    s = sq = 0.0
    for k, w in enumerate(weights):
        m = 1 if multiplicity is None else multiplicity[k]
        s += w
        sq += w * w / m
    return s * s / sq


def resample_seed(seed: int, iteration: int) -> int:
    """The ``children_counts`` seed of one iteration: a different stream per iteration."""
    return (int(seed) * 1_000_003 + iteration) % (2**63)


def weight_args(cfg) -> tuple[float, str]:
    """(temperature, weights) of ``Forest.children_counts`` for ``cfg.pf_weights``."""
    if cfg.pf_weights == "raw":
        return 0.0, "softmax"
    return cfg.pf_temperature, cfg.pf_weights


class ParticleFiltering(Rebase):
    def start(self, roots: np.ndarray) -> None:
        super().start(roots)
        self.held: dict[int, int] = {}  # pf_finished="resample": finished node -> particles holding it

    def allocate(self, active: list[int], budget: int, multiplicity: list[int] | None = None) -> list[int]:
        cfg = self.config
        ids = np.array(active, dtype=np.int32)
        temperature, weights = weight_args(cfg)
        ranks = self.tree.forest.path_scores(ids, cfg.agg).tolist()  # float64, as children_counts ranks
        ranks = [-np.inf if x != x else x for x in ranks]
        w = count_weights(ranks, temperature, weights, multiplicity)
        if cfg.pf_ess_threshold < 1 and ess(w, multiplicity) >= cfg.pf_ess_threshold * budget:
            return [1] * len(active) if multiplicity is None else list(multiplicity)  # every particle goes on
        seed = resample_seed(self.search.params.seed, self.it)
        mult = None if multiplicity is None else np.array(multiplicity, dtype=np.int32)
        counts = self.tree.forest.children_counts(ids, budget, cfg.agg, cfg.pf_resampling, temperature, seed,
                                                  weights, mult)
        return counts.tolist()

    def next_frontier(self, active: list[int]) -> tuple[list[int], list[int]]:
        if self.config.pf_finished == "keep":
            return super().next_frontier(active)
        finished = list(self.completed)  # in finishing order; this step's new ones are held once
        mult = [self.held.get(x, 1) for x in finished] + [1] * len(active)
        counts = self.allocate(finished + active, self.config.n, mult)
        kept = [(x, c) for x, c in zip(finished, counts) if c > 0]
        self.completed = [x for x, _ in kept]
        self.held = dict(kept)
        rest = counts[len(finished):]
        self.tree.prune([x for x, c in zip(active, rest) if c == 0])
        return [x for x, c in zip(active, rest) if c > 0], [c for c in rest if c > 0]

    def final(self):
        return self.completed + self.leftover, self.config.vote or "best", self.config.vote_agg
