"""Best-of-N: N full solutions per problem, every step scored by the PRM.

* vanilla (``best_of_n``): the answer of the solution with the highest aggregated score
  (``agg``); ties go to the lower node id (the earlier sample).
* weighted (``weighted_best_of_n``): solutions grouped by normalized answer, each group's
  aggregated scores summed, the largest sum wins (ties: the answer seen first).

In both, solutions without a boxed answer abstain. The final vote aggregates with
``SearchConfig.vote_agg``. The sampling is majority's (``SampleSolutions``); only the vote differs.
"""

from __future__ import annotations

from .majority import SampleSolutions


class BestOfN(SampleSolutions):
    vote = "best"


class WeightedBestOfN(SampleSolutions):
    vote = "weighted"
