"""Dynamic compute: early-stopped sampling and ``method="auto"``, as engine state machines.

* ``EarlyStopSampling`` (``SearchConfig(early_stop=...)`` on majority / best_of_n /
  weighted_best_of_n): the n solutions are sampled in rounds of ``round_size``; each round
  starts from its own root (a node is expanded once: the policy frees a parent after its
  children are sampled, so round j expands root j; the roots share the prompt, which a
  prefix-sharing policy computes once and the budget counts once). After every round the
  stopping rule of ``ponder.methods.stopping`` decides: majority on the answer counts, the
  best-of-N variants on the PRM-weighted votes (``vote_agg``); with ``EarlyStop.futility`` set,
  an unsettled vote that more samples are unlikely to settle stops too (``stopping.futile``),
  and with ``EarlyStop.futility_score`` also set, only while every completion's PRM score
  (``vote_agg``) is below it (``stopping.all_below``). The vote is the method's own.
* ``Auto`` (``method="auto"``): a probe of k solutions (k from the plan), the difficulty
  estimate from them (``strategy.difficulty``), then the option the strategy table's plan
  gives the difficulty's bin: stop, more samples for a sampling vote, or a beam search / DVTS
  run from a fresh root, whose state machine ``Auto`` then drives. The budget: ``budget_tokens``
  (mean policy tokens per problem) or the n-equivalent ``budget`` (default ``n``), converted
  with the table's ``reference_tokens``.

Both report ``difficulty`` and ``chosen`` in ``SearchResult`` (``report``). With
``early_stop=None`` and another method nothing here runs: results stay bit-identical.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from .. import grading
from .beam_search import BeamSearch
from .dvts import DVTS
from .method import Method
from .stopping import as_early_stop, decide, tally
from .strategy import OPTION_VOTE, SAMPLING, Plan, StrategyTable, difficulty, load_cached

TREE_CLASSES = {"beam_search": BeamSearch, "dvts": DVTS}


def _answers(tree, nodes) -> list[str | None]:
    return [tree.nodes[int(x)].answer for x in nodes]


def _mean_generated(tree, nodes) -> float:
    """The mean generated tokens of the paths to ``nodes`` (steps only, the root excluded):
    the probe's solution length, as ``ProblemRecord.probe_length`` measures it."""
    total = 0
    for x in nodes:
        path = tree.path_nodes(int(x))
        if path:
            total += int(tree.forest.nodes(np.array(path, dtype=np.int32))["num_tokens"].sum())
    return total / max(1, len(nodes))


class EarlyStopSampling(Method):
    """Sampled solutions in rounds with the stopping rule (see the module docstring).
    ``solutions``: the finished rounds' last nodes, in sampling order."""

    vote = "majority"

    def __init__(self, tree, search) -> None:
        super().__init__(tree, search)
        self.rule = as_early_stop(self.config.early_stop)
        n, r = self.config.n, self.rule.round_size
        self.sizes = [min(r, n - i) for i in range(0, n, r)]

    @property
    def subtrees(self) -> int:
        return len(self.sizes)

    @property
    def agg(self) -> str:
        return self.config.agg if self.vote == "majority" else self.config.vote_agg

    def start(self, roots: np.ndarray) -> None:
        self.roots = [int(x) for x in roots]
        self.round = 0
        self.solutions: list[int] = []
        self.first_round: list[int] = []
        self.settled = False
        self.futile = False

    def expansion(self):
        if self.done or self.round >= len(self.sizes):
            return [], [], 0
        return [self.roots[self.round]], [self.sizes[self.round]], 0

    def expanded(self, children: np.ndarray) -> None:
        self.to_end(children)

    def ended(self, ends: np.ndarray) -> None:
        got = ends.tolist()
        if self.round == 0:
            self.first_round = got
        self.solutions += got
        self.round += 1
        self.settled, self.futile = self._decide()
        self.done = self.settled or self.futile or self.round >= len(self.sizes)

    def _decide(self) -> tuple[bool, bool]:
        """(settled, futile) after this round: the leader rule, then (``rule.futility`` set and
        samples left) the futility rule, both on the method's votes, then (``futility_score``
        set) its PRM gate on the completions' scores."""
        answers = [None if a is None else grading.normalize_answer(a) for a in _answers(self.tree, self.solutions)]
        weights = None
        if self.vote != "majority" and self.search.scored:
            weights = [0.0 if not (s == s) else min(1.0, max(0.0, float(s)))
                       for s in self.tree.path_scores(self.solutions, self.agg)]
        # the PRM gate reads the paths' scores (the engine scores a gated search's paths, majority included)
        scores = (lambda: self.tree.path_scores(self.solutions, self.config.vote_agg)) if self.search.scored else None
        return decide(self.rule, tally(answers, weights), len(self.solutions), sum(self.sizes[self.round:]), scores)

    def final(self):
        return self.solutions, self.vote, self.agg

    def partial(self) -> list[int]:
        return self.solutions + self.ends_so_far

    def report(self) -> dict:
        first = self.first_round
        scores = self.tree.path_scores(first, self.agg) if self.search.scored else None
        return {
            "difficulty": difficulty(_answers(self.tree, first), scores) if first else None,
            "chosen": {
                "method": self.config.method, "n": len(self.solutions), "rounds": self.round,
                "early_stopped": bool((self.settled or self.futile) and self.round < len(self.sizes)),
                "stopped_by": "settled" if self.settled else ("futility" if self.futile else None),
                "threshold": self.rule.threshold, "futility": self.rule.futility,
                "futility_score": self.rule.futility_score,
            },
        }


class EarlyStopMajority(EarlyStopSampling):
    vote = "majority"


class EarlyStopBestOfN(EarlyStopSampling):
    vote = "best"


class EarlyStopWeightedBestOfN(EarlyStopSampling):
    vote = "weighted"


EARLY_STOP_CLASSES = {
    "majority": EarlyStopMajority,
    "best_of_n": EarlyStopBestOfN,
    "weighted_best_of_n": EarlyStopWeightedBestOfN,
}

# (id(table), budget) -> (table, plan): the entry holds its table, so the id cannot be reused
# by another table while the entry lives (a key of a bare id could return a freed table's plan)
_PLANS: dict[tuple[int, float], tuple[StrategyTable, Plan]] = {}
_PLANS_MAX = 256


def budget_tokens(config, table: StrategyTable) -> float:
    """The mean policy tokens per problem ``config`` allows ``auto``: ``budget_tokens``, else
    the table's tokens of best-of-N at n = ``budget`` (default ``n``)."""
    if config.budget_tokens is not None:
        return float(config.budget_tokens)
    return table.tokens_for_n(config.budget if config.budget is not None else config.n)


def plan_for(config, table: StrategyTable | None = None) -> Plan:
    """The plan ``auto`` follows for ``config`` (cached per table and budget)."""
    table = load_cached(config.strategy) if table is None else table
    t = budget_tokens(config, table)
    key = (id(table), round(t, 6))
    hit = _PLANS.get(key)
    if hit is None or hit[0] is not table:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        hit = _PLANS[key] = (table, table.plan(t))
    return hit[1]


class Auto(Method):
    """``method="auto"`` (see the module docstring). Roots: one for the probe, then as many
    as the plan's largest DVTS needs (a sampling continuation and beam search use one)."""

    def __init__(self, tree, search) -> None:
        super().__init__(tree, search)
        self.table = load_cached(self.config.strategy)
        self.plan = plan_for(self.config, self.table)
        self.k = self.plan.probe

    @property
    def subtrees(self) -> int:
        return 1 + self.table.max_roots(self.plan)

    def start(self, roots: np.ndarray) -> None:
        self.roots = [int(x) for x in roots]
        self.phase = "probe"
        self.probe: list[int] = []
        self.more: list[int] = []
        self.inner: Method | None = None
        self.option = None
        self.bin = -1
        self.difficulty: float | None = None
        self.length: float | None = None

    def wants(self):
        if self.inner is not None:
            return self.inner.wants()
        return super().wants()

    def scored(self, children: np.ndarray) -> None:
        if self.inner is not None:
            self.inner.scored(children)
            self.done = self.inner.done
        else:
            super().scored(children)

    def expansion(self):
        if self.phase == "probe":
            return [self.roots[0]], [self.k], 0
        if self.phase == "more":
            return [self.roots[1]], [self.option.n - self.k], 0
        return [], [], 0

    def expanded(self, children: np.ndarray) -> None:
        self.to_end(children)

    def ended(self, ends: np.ndarray) -> None:
        if self.phase == "more":
            self.more = ends.tolist()
            self.phase, self.done = "done", True
            return
        self.probe = ends.tolist()
        scores = self.tree.path_scores(self.probe, self.table.agg)
        self.difficulty = difficulty(_answers(self.tree, self.probe), scores)
        self.length = _mean_generated(self.tree, self.probe)
        self.bin, self.option = self.plan.option_for(self.table, self.difficulty, self.length)
        o = self.option
        if o.method == "stop" or (o.method in SAMPLING and o.n <= self.k):
            self.phase, self.done = "done", True
        elif o.method in SAMPLING:
            self.phase = "more"
        else:
            cfg = dataclasses.replace(
                self.config, method=o.method, n=o.n, beam_width=o.beam_width or min(self.config.beam_width, o.n),
            )
            inner_search = copy.copy(self.search)  # the same search; only its config differs
            inner_search.config = cfg
            self.inner = TREE_CLASSES[o.method](self.tree, inner_search)
            need = self.inner.subtrees
            self.inner.start(np.array(self.roots[1 : 1 + need], dtype=np.int32))
            self.phase = "inner"

    def final(self):
        if self.inner is not None:
            return self.inner.final()
        method = self.option.method if self.option is not None else "stop"
        agg = self.config.agg if method == "majority" else self.config.vote_agg
        return self.probe + self.more, OPTION_VOTE[method], agg

    def partial(self) -> list[int]:
        if self.inner is not None:
            return self.inner.partial()
        return self.probe + self.more + self.ends_so_far

    def report(self) -> dict:
        o = self.option
        return {
            "difficulty": self.difficulty,
            "chosen": None if o is None else {
                "method": o.method, "n": self.k if o.method == "stop" else o.n, "beam_width": o.beam_width,
                "probe": self.k, "bin": self.bin, "probe_length": self.length,
                "budget_tokens": self.plan.budget_tokens,
            },
        }


def method_class(config, registry: dict) -> type[Method]:
    """The state machine of ``config``: an early-stop one for a sampling method with
    ``early_stop`` set, else ``registry[config.method]`` (the engine's ``METHOD_CLASSES``)."""
    if config.method in EARLY_STOP_CLASSES and as_early_stop(config.early_stop) is not None:
        return EARLY_STOP_CLASSES[config.method]
    return registry[config.method]


def prm_gated(config) -> bool:
    """Whether ``config``'s early stop has a PRM gate (``EarlyStop.futility_score``): then even
    majority reads PRM scores (ValueError for a bad ``early_stop``)."""
    es = as_early_stop(config.early_stop)
    return es is not None and es.futility_score is not None


def validate_adaptive(config) -> None:
    """ValueError naming the first bad dynamic-compute field of a ``SearchConfig``."""
    es = as_early_stop(config.early_stop)
    if es is not None and config.method not in EARLY_STOP_CLASSES:
        raise ValueError(
            f"early_stop applies to majority, best_of_n and weighted_best_of_n; got method {config.method!r}"
        )
    b = config.budget
    if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0):
        raise ValueError(f"budget must be None or a number > 0 (an n-equivalent); got {b!r}")
    t = config.budget_tokens
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0):
        raise ValueError(f"budget_tokens must be None or a number > 0 (mean policy tokens per problem); got {t!r}")
    if config.method != "auto" and (b is not None or t is not None):
        raise ValueError(f"budget / budget_tokens apply to method 'auto'; got method {config.method!r}")
    if config.method == "auto":
        load_cached(config.strategy)  # FileNotFoundError / ValueError now, not mid-run
