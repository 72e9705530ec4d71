"""Particle filtering (Puri et al. 2025; its_hub's ``ParticleFiltering``) on the shared forest.

Per problem, N particles (paths); one iteration per engine step (every live search advances
together: one batched policy call and one batched PRM call):

1. The root gets N children: N particles.
2. Every particle samples one step; the PRM scores it. Particles that finished (EOS or a boxed
   answer) are kept as completions; the other ``B = N - completions`` go on.
3. Weights: softmax(aggregated score / ``pf_temperature``) over the unfinished particles, or
   the raw aggregated score with ``pf_weights="raw"``. When the effective sample size
   ``(sum w)^2 / sum w^2`` is below ``pf_ess_threshold * B``, B particles are resampled from
   them (``Forest.children_counts`` with ``pf_resampling`` = ``multinomial`` or
   ``systematic``, seeded by the search's seed and the iteration): a particle drawn k times
   gets k children next iteration (they fork its cached prefix); one drawn 0 times is
   pruned. Otherwise every particle continues once.
4. The last iteration (``num_iterations``) runs every particle to its end (EOS, a boxed answer
   or ``max_steps`` steps).

Result: the completions in finishing order, then the unfinished particles of the last
iteration (abstaining from the vote). Answer: ``vote`` (default weighted) with ``agg``.
"""

from __future__ import annotations

import numpy as np

from ..twins.forest import count_weights
from .rebase import Rebase


def ess(weights: list[float]) -> float:
    """Effective sample size of unnormalized weights: (sum w)^2 / sum w^2 (float64, in order)."""
    s = sq = 0.0
    for w in weights:
        s += w
        sq += w * w
    return s * s / sq


def resample_seed(seed: int, iteration: int) -> int:
    """The ``children_counts`` seed of one iteration: a different stream per iteration."""
    return (int(seed) * 1_000_003 + iteration) % (2**63)


class ParticleFiltering(Rebase):
    def allocate(self, active: list[int], budget: int) -> list[int]:
        cfg = self.config
        ids = np.array(active, dtype=np.int32)
        temperature = 0.0 if cfg.pf_weights == "raw" else cfg.pf_temperature
        ranks = self.tree.forest.path_scores(ids, cfg.agg).tolist()  # float64, as children_counts ranks
        ranks = [-np.inf if x != x else x for x in ranks]
        if ess(count_weights(ranks, temperature)) >= cfg.pf_ess_threshold * len(active):
            return [1] * len(active)  # budget == len(active): every particle goes on once
        seed = resample_seed(self.search.params.seed, self.it)
        return self.tree.forest.children_counts(ids, budget, cfg.agg, cfg.pf_resampling, temperature, seed).tolist()
