"""Compute-optimal strategy tables: difficulty bin x budget -> method and settings.

``method="auto"`` (``ponder.methods.adaptive.Auto``) first samples a *probe* of ``k`` full
solutions, scores them with the PRM, and estimates the problem's difficulty from them
(``difficulty``: agreement and PRM confidence; never the gold answer). The difficulty falls in
one of a few bins (quantiles on a calibration set). The table says, for the bin and the
budget, what to do next:

* ``stop``: answer now, weighted vote over the probe;
* ``majority`` / ``best_of_n`` / ``weighted_best_of_n`` at n: sample ``n - k`` more solutions
  and vote over all n (the probe's included);
* ``beam_search`` / ``dvts`` at (n, beam_width): run that search from the prompt; its answer.

The table is **fit offline** (``fit``) on calibration records (``ProblemRecord``: per problem,
S sampled solutions with their answers, PRM scores and tokens, plus the outcome and tokens of
beam search / DVTS at several n) the way Snell et al. build the compute-optimal curve: every
cell (probe k, bin, option) holds the measured accuracy and mean policy tokens of that option
on the calibration problems of that bin. A *plan* for a budget picks one option per bin so
that the mean tokens over the calibration distribution of bins stay within the budget and the
mean accuracy is the largest (a multiple-choice knapsack, solved exactly on a grid of 1/400
of the budget, costs rounded up so the plan never exceeds it; of equally accurate plans the
cheapest). Compute moves from easy bins
(settled by the probe) and hopeless ones to the bins where more samples change the answer.

Budgets are in mean policy tokens per problem (prompt + generated). An n-equivalent budget B
is converted with ``reference_tokens``: the mean policy tokens of best-of-N at n = B on the
calibration set (log-linear interpolation between the measured n).

Files: ``StrategyTable.save`` / ``load`` (JSON, ``strategy.json``). The built-in models' table
is ``ponder/toy/strategy.json`` (``builtin_table``), fit on freshly generated ``builtin:arith``
problems (``ponder calibrate``), never on the held-out set.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import grading

SAMPLING = ("majority", "best_of_n", "weighted_best_of_n")
TREES = ("beam_search", "dvts")
OPTION_METHODS = ("stop", *SAMPLING, *TREES)
#: the vote each option answers with
OPTION_VOTE = {"stop": "weighted", "majority": "majority", "best_of_n": "best", "weighted_best_of_n": "weighted"}
VERSION = 2
#: table versions this ponder reads (1: difficulty bins only, no ``length_edges``)
READS = (1, 2)
BUILTIN_PATH = Path(__file__).resolve().parent.parent / "toy" / "strategy.json"


# ----------------------------------------------------------------------------- difficulty


def difficulty(answers: Sequence[str | None], scores: Sequence[float] | None) -> float:
    """A problem's estimated difficulty in [0, 1] from its probe: ``1 - W / k``.

    k: the probe's completions; W: the weighted vote of the leading answer, the sum of the
    aggregated PRM scores (clipped to [0, 1]; ``scores=None``: 1 each, plain agreement) of
    the completions with that answer (answers grouped by ``grading.normalize_answer``;
    unanswered completions weigh nothing). 0: every completion agrees and the PRM is sure;
    1: no answer, or the PRM gives every answer 0. Uses no gold answer."""
    k = len(answers)
    if k == 0:
        return 1.0
    groups: dict[str, float] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        s = 1.0 if scores is None else scores[i]
        s = 0.0 if not (s == s) else min(1.0, max(0.0, float(s)))
        key = grading.normalize_answer(a)
        groups[key] = groups.get(key, 0.0) + s
    return 1.0 - (max(groups.values()) if groups else 0.0) / k


def vote(answers: Sequence[str | None], scores: Sequence[float], how: str) -> int:
    """The index of the completion whose answer wins ``how`` (majority | best | weighted)
    over these completions (the forest's rules: unanswered abstain; majority and weighted
    group by normalized answer, ties to the answer seen first; best: highest score, ties to
    the earlier). -1 when none has an answer."""
    best_i, best_v = -1, -math.inf
    if how == "best":
        for i, (a, s) in enumerate(zip(answers, scores)):
            if a is not None and s > best_v:
                best_i, best_v = i, s
        return best_i
    groups: dict[str, list] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        g = groups.setdefault(grading.normalize_answer(a), [i, 0.0])
        g[1] += 1.0 if how == "majority" else float(scores[i])
    for first, v in groups.values():  # insertion order: first seen wins ties
        if v > best_v:
            best_i, best_v = first, v
    return best_i


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass
class ProblemRecord:
    """What calibration measured on one problem.

    prompt_tokens: the prompt (prefilled once per search). samples: S sampled solutions in
    order, each ``{"answer": str|None, "correct": bool, "score": float (aggregated PRM
    score), "tokens": int (generated)}``. trees: ``{method: {n: {"correct": bool, "tokens":
    int (generated), "beam_width": int}}}`` for beam search / DVTS. level: optional."""

    id: str
    prompt_tokens: int
    samples: list[dict]
    trees: dict[str, dict[int, dict]] = dataclasses.field(default_factory=dict)
    level: Any = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["trees"] = {m: {str(n): v for n, v in by.items()} for m, by in self.trees.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ProblemRecord:
        trees = {m: {int(n): v for n, v in by.items()} for m, by in d.get("trees", {}).items()}
        return cls(str(d["id"]), int(d["prompt_tokens"]), list(d["samples"]), trees, d.get("level"))

    def probe_difficulty(self, k: int) -> float:
        s = self.samples[:k]
        return difficulty([x["answer"] for x in s], [x["score"] for x in s])

    def probe_length(self, k: int) -> float:
        """The mean generated tokens of the first k samples (the probe's solution length)."""
        s = self.samples[:k]
        return sum(x["tokens"] for x in s) / max(1, len(s))

    def sampled_outcome(self, how: str, n: int) -> tuple[bool, int]:
        """(correct, policy tokens) of voting ``how`` over the first n samples."""
        s = self.samples[:n]
        i = vote([x["answer"] for x in s], [x["score"] for x in s], how)
        return (bool(s[i]["correct"]) if i >= 0 else False), self.prompt_tokens + sum(x["tokens"] for x in s)

    def outcome(self, k: int, option: Option) -> tuple[bool, int] | None:
        """(correct, policy tokens) of ``option`` after a probe of k samples; None when the
        record lacks what it needs."""
        if option.method == "stop":
            return self.sampled_outcome("weighted", k)
        if option.method in SAMPLING:
            if option.n > len(self.samples):
                return None
            return self.sampled_outcome(OPTION_VOTE[option.method], option.n)
        got = self.trees.get(option.method, {}).get(option.n)
        if got is None:
            return None
        probe = sum(x["tokens"] for x in self.samples[:k])
        return bool(got["correct"]), self.prompt_tokens + probe + int(got["tokens"])


# ----------------------------------------------------------------------------- options and plans


@dataclasses.dataclass(frozen=True)
class Option:
    """What to do after the probe: method (``OPTION_METHODS``), n (sampling: total
    completions, probe included; trees: the search's n; stop: the probe size), beam_width
    (trees only, else 0)."""

    method: str
    n: int
    beam_width: int = 0

    def label(self) -> str:
        if self.method == "stop":
            return "stop"
        return f"{self.method}@{self.n}" + (f"/m{self.beam_width}" if self.beam_width else "")


@dataclasses.dataclass
class Plan:
    """One budget's choice: probe size, an option per difficulty bin, and what the
    calibration set says it gives (mean accuracy and mean policy tokens per problem)."""

    budget_tokens: float
    probe: int
    options: list[Option]
    accuracy: float
    tokens: float

    def option_for(self, table: StrategyTable, d: float, length: float | None = None) -> tuple[int, Option]:
        """(bin, option) of a probe with difficulty ``d`` and mean generated tokens ``length``
        (needed only when the table splits by length)."""
        b = table.bin_of(self.probe, d, length)
        return b, self.options[b]


@dataclasses.dataclass
class StrategyTable:
    """The fitted table (see the module docstring). Fields, all JSON-able:

    probes: the probe sizes fitted. bin_edges[k]: the inner quantile edges of the
    difficulty at probe k (difficulty bin of d: the number of edges below d, so bin b is
    (e[b-1], e[b]]). length_edges[k]: the inner quantile edges of the probe's mean generated
    tokens per completion (its solution length; empty or absent: no length split); a bin is a
    cell of the grid, ``length group * (len(bin_edges[k]) + 1) + difficulty bin``.
    bin_fractions[k]: the share of calibration problems per bin. cells: every (probe, bin,
    option) measured: dicts with probe, bin, method, n, beam_width, accuracy, tokens, count
    (from ``fit`` also ``planning_accuracy`` when shrunk, ``pruned: True`` when plans may not
    choose it). reference_tokens: {n: mean
    policy tokens of best-of-N at n} (n-equivalent budgets). plans: precomputed plans
    {budget n: plan dict} for reading (``plan`` recomputes them from the cells for any budget).
    agg: the aggregation the scores were made with. meta: provenance (calibration data, models,
    seed)."""

    probes: list[int]
    bin_edges: dict[int, list[float]]
    bin_fractions: dict[int, list[float]]
    cells: list[dict]
    reference_tokens: dict[int, float]
    plans: dict[int, dict] = dataclasses.field(default_factory=dict)
    agg: str = "last"
    meta: dict = dataclasses.field(default_factory=dict)
    length_edges: dict[int, list[float]] = dataclasses.field(default_factory=dict)

    # -------------------------------------------------------------- file

    def to_dict(self) -> dict:
        return {
            "version": VERSION,
            "probes": list(self.probes),
            "bin_edges": {str(k): v for k, v in self.bin_edges.items()},
            "bin_fractions": {str(k): v for k, v in self.bin_fractions.items()},
            "length_edges": {str(k): v for k, v in self.length_edges.items()},
            "reference_tokens": {str(k): v for k, v in self.reference_tokens.items()},
            "agg": self.agg,
            "plans": {str(k): v for k, v in self.plans.items()},
            "cells": self.cells,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> StrategyTable:
        if d.get("version") not in READS:
            raise ValueError(f"strategy table version {d.get('version')!r}; this ponder reads versions {READS}")
        return cls(
            probes=[int(k) for k in d["probes"]],
            bin_edges={int(k): [float(x) for x in v] for k, v in d["bin_edges"].items()},
            bin_fractions={int(k): [float(x) for x in v] for k, v in d["bin_fractions"].items()},
            cells=list(d["cells"]),
            reference_tokens={int(k): float(v) for k, v in d["reference_tokens"].items()},
            plans={int(k): v for k, v in d.get("plans", {}).items()},
            agg=str(d.get("agg", "last")),
            meta=dict(d.get("meta", {})),
            length_edges={int(k): [float(x) for x in v] for k, v in d.get("length_edges", {}).items()},
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON (atomically); returns the path."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> StrategyTable:
        """Read a table ``save`` wrote (ValueError for another version or a bad file)."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not a strategy table: {exc}") from exc
        return cls.from_dict(d)

    # -------------------------------------------------------------- use

    def bin_of(self, probe: int, d: float, length: float | None = None) -> int:
        """The bin of a probe of size ``probe`` with difficulty ``d`` and mean generated tokens
        per completion ``length`` (ValueError when the table splits by length and it is None)."""
        db = bisect.bisect_left(self.bin_edges[probe], d)
        le = self.length_edges.get(probe)
        if not le:
            return db
        if length is None:
            raise ValueError("this strategy table bins by the probe's length: pass length=")
        return bisect.bisect_left(le, length) * (len(self.bin_edges[probe]) + 1) + db

    def num_bins(self, probe: int) -> int:
        return (len(self.bin_edges[probe]) + 1) * (len(self.length_edges.get(probe) or ()) + 1)

    def tokens_for_n(self, n: float) -> float:
        """Mean policy tokens of best-of-N at n on the calibration set, interpolated
        log-linearly between the measured n (linearly in n beyond the largest)."""
        ns = sorted(self.reference_tokens)
        if not ns:
            raise ValueError("the strategy table has no reference tokens")
        if n <= ns[0]:
            return self.reference_tokens[ns[0]] * n / ns[0]
        for lo, hi in zip(ns, ns[1:]):
            if n <= hi:
                t = (math.log(n) - math.log(lo)) / (math.log(hi) - math.log(lo))
                return self.reference_tokens[lo] + t * (self.reference_tokens[hi] - self.reference_tokens[lo])
        top = ns[-1]
        per = (self.reference_tokens[top] - self.reference_tokens[ns[-2]]) / (top - ns[-2]) if len(ns) > 1 else self.reference_tokens[top] / top
        return self.reference_tokens[top] + per * (n - top)

    def options(self, probe: int) -> list[Option]:
        seen = {}
        for c in self.cells:
            if c["probe"] == probe:
                o = Option(c["method"], int(c["n"]), int(c.get("beam_width", 0)))
                seen[o] = True
        return list(seen)

    def cell(self, probe: int, b: int, option: Option) -> dict | None:
        for c in self.cells:
            if (c["probe"], c["bin"], c["method"], int(c["n"]), int(c.get("beam_width", 0))) == (
                probe, b, option.method, option.n, option.beam_width
            ):
                return c
        return None

    def plan(self, budget_tokens: float) -> Plan:
        """The best plan within ``budget_tokens`` mean policy tokens per problem over every
        fitted probe size (see the module docstring). When even the cheapest options exceed
        the budget, the cheapest plan (its ``tokens`` then says by how much)."""
        best: Plan | None = None
        for k in self.probes:
            p = _knapsack(self, k, budget_tokens)
            if best is None or (p.tokens <= budget_tokens, p.accuracy, -p.tokens) > (
                best.tokens <= budget_tokens, best.accuracy, -best.tokens
            ):
                best = p
        assert best is not None
        return best

    def max_roots(self, plan: Plan) -> int:
        """The roots a search following ``plan`` may need after its probe (DVTS: n / m)."""
        return max([1] + [o.n // o.beam_width for o in plan.options if o.method == "dvts"])


def _knapsack(table: StrategyTable, k: int, budget: float, grid: int = 400) -> Plan:
    fractions = table.bin_fractions[k]
    nb = len(fractions)
    per_bin: list[list[tuple[Option, float, float]]] = []
    for b in range(nb):
        opts = []
        for c in table.cells:
            if c["probe"] == k and c["bin"] == b and c["count"] > 0 and not c.get("pruned"):
                acc = c.get("planning_accuracy", c["accuracy"])
                opts.append((Option(c["method"], int(c["n"]), int(c.get("beam_width", 0))), acc, c["tokens"]))
        # cheaper first: equal accuracy goes to the cheaper option
        opts.sort(key=lambda t: (t[2], OPTION_METHODS.index(t[0].method), t[0].n))
        per_bin.append(opts or [(Option("stop", k), 0.0, 0.0)])  # a bin no calibration problem fell in
    unit = max(budget, 1e-9) / grid
    neg = -math.inf
    dp = [0.0] * (grid + 1)  # dp[j]: the best accuracy of the bins so far within j units
    choice: list[list[int]] = []
    for b in range(nb):
        new = [neg] * (grid + 1)
        pick = [-1] * (grid + 1)
        for i, (_o, acc, tok) in enumerate(per_bin[b]):
            w = math.ceil(fractions[b] * tok / unit - 1e-9)
            if w > grid:
                continue
            # equal accuracy: the cheaper plan (a tie-break far below any accuracy difference)
            gain = fractions[b] * (acc - 1e-7 * tok / max(budget, 1e-9))
            for j in range(w, grid + 1):
                v = dp[j - w] + gain
                if v > new[j] + 1e-12:
                    new[j], pick[j] = v, i
        dp = new
        choice.append(pick)
    if dp[grid] == neg:  # nothing fits: the cheapest option of every bin
        options = [opts[0][0] for opts in per_bin]
    else:
        options = []
        j = grid
        for b in range(nb - 1, -1, -1):
            i = choice[b][j]
            o, _acc, tok = per_bin[b][i]
            options.append(o)
            j -= math.ceil(fractions[b] * tok / unit - 1e-9)
        options.reverse()
    acc = tokens = 0.0
    for b, o in enumerate(options):
        c = table.cell(k, b, o) or {"accuracy": 0.0, "tokens": 0.0}
        acc += fractions[b] * c["accuracy"]
        tokens += fractions[b] * c["tokens"]
    return Plan(float(budget), k, options, acc, tokens)


def plan_to_dict(plan: Plan) -> dict:
    return {
        "budget_tokens": plan.budget_tokens,
        "probe": plan.probe,
        "options": [dataclasses.asdict(o) for o in plan.options],
        "labels": [o.label() for o in plan.options],
        "accuracy": plan.accuracy,
        "tokens": plan.tokens,
    }


# ----------------------------------------------------------------------------- fitting


def default_options(max_samples: int, tree_ns: dict[str, dict[int, int]]) -> list[Option]:
    """The options a fit considers: stop; the three sampling votes at n = 2, 3, 4, 6, 8, 12,
    16, 24, 32, ... up to ``max_samples``; each tree method at the n it was measured
    (``tree_ns[method][n]``: its beam width)."""
    ns = sorted({n for n in (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if n <= max_samples})
    out = [Option("stop", 0)]
    out += [Option(m, n) for m in SAMPLING for n in ns]
    out += [Option(m, n, w) for m in TREES for n, w in sorted(tree_ns.get(m, {}).items())]
    return out


def fit(
    records: Sequence[ProblemRecord],
    *,
    probes: Sequence[int] = (1, 2, 4),
    bins: int = 5,
    budgets: Sequence[int] = (2, 4, 8, 16, 32),
    beam_width: int = 4,
    agg: str = "last",
    meta: dict | None = None,
    prior: float = 0.0,
    length_bins: int = 1,
    min_gain_se: float = 0.0,
) -> StrategyTable:
    """Fit a ``StrategyTable`` on calibration records (never the evaluation set).

    For every probe size k (at most the samples every record has): the difficulty of each
    record from its first k samples; ``bins`` quantile bins; for each bin and each option
    (``default_options`` up to the most samples any record has; sampling options with n > k
    only) the mean correctness and mean policy tokens over the bin's records that have it
    (``count``: how many; records with fewer samples than an option's n lack it).
    ``reference_tokens``: best-of-N's mean tokens at n = 1, 2, 4, ... up to the samples every
    record has. ``plans``: the plan of every budget in ``budgets`` (n-equivalents).

    ``length_bins`` > 1: the bins are a grid, ``length_bins`` quantile groups of the probe's mean
    generated tokens per completion (``length_edges``) times the difficulty bins (each a
    quantile of all records, so a group may leave some of its bins empty).

    ``prior`` > 0: plans use each cell's accuracy shrunk toward the same option's accuracy over
    all bins, ``(correct + prior * pooled) / (count + prior)`` (``planning_accuracy``; empirical
    Bayes against the noise of small bins); ``accuracy`` stays the measured one.

    ``min_gain_se`` > 0: in each bin, options are taken cheapest first, and one is ``pruned``
    (never planned) unless its accuracy exceeds that of every cheaper unpruned option by more
    than ``min_gain_se`` standard errors of the paired difference over the bin's records that
    measured both (a gain within the noise of the calibration set buys nothing)."""
    if not records:
        raise ValueError("fit needs at least one calibration record")
    smin = min(len(r.samples) for r in records)
    smax = max(len(r.samples) for r in records)
    tree_ns: dict[str, dict[int, int]] = {}
    for m in TREES:
        common = None
        for r in records:
            have = set(r.trees.get(m, {}))
            common = have if common is None else common & have
        first = records[0].trees.get(m, {})
        tree_ns[m] = {n: int(first[n].get("beam_width", min(beam_width, n))) for n in sorted(common or ())}
    probes = [k for k in probes if 1 <= k <= smin]
    if not probes:
        raise ValueError(f"no probe size fits the {smin} samples per record")
    options = default_options(smax, tree_ns)
    edges, lengths, fractions, cells = {}, {}, {}, []
    for k in probes:
        ds = sorted(r.probe_difficulty(k) for r in records)
        edges[k] = sorted({_quantile(ds, q / bins) for q in range(1, bins)})
        if length_bins > 1:
            ls = sorted(r.probe_length(k) for r in records)
            lengths[k] = sorted({_quantile(ls, q / length_bins) for q in range(1, length_bins)})
        grid = StrategyTable([k], {k: edges[k]}, {}, [], {}, length_edges={k: lengths.get(k, [])})
        which = [grid.bin_of(k, r.probe_difficulty(k), r.probe_length(k)) for r in records]
        nb = grid.num_bins(k)
        fractions[k] = [which.count(b) / len(records) for b in range(nb)]
        for b in range(nb):
            members = [r for r, w in zip(records, which) if w == b]
            measured = []
            for o in options:
                if o.method in SAMPLING and o.n <= k:
                    continue
                oo = Option(o.method, k) if o.method == "stop" else o
                got = {r.id: x for r in members if (x := r.outcome(k, oo))}
                if not got:
                    continue
                cells.append({
                    "probe": k, "bin": b, "method": o.method, "n": oo.n,
                    "beam_width": o.beam_width, "count": len(got),
                    "accuracy": sum(c for c, _ in got.values()) / len(got),
                    "tokens": sum(t for _, t in got.values()) / len(got),
                })
                measured.append((cells[-1], got))
            if min_gain_se > 0:
                _prune(measured, min_gain_se)
    if prior > 0:
        pooled: dict = {}
        for c in cells:
            key = (c["probe"], c["method"], c["n"], c["beam_width"])
            a = pooled.setdefault(key, [0.0, 0])
            a[0] += c["accuracy"] * c["count"]
            a[1] += c["count"]
        for c in cells:
            right, total = pooled[(c["probe"], c["method"], c["n"], c["beam_width"])]
            c["planning_accuracy"] = (c["accuracy"] * c["count"] + prior * right / total) / (c["count"] + prior)
    reference = {}
    n = 1
    while n <= smin:
        reference[n] = sum(r.sampled_outcome("best", n)[1] for r in records) / len(records)
        n *= 2
    meta = dict(meta or {})
    meta["prior"] = prior
    meta["length_bins"] = length_bins
    meta["min_gain_se"] = min_gain_se
    table = StrategyTable(list(probes), edges, fractions, cells, reference, {}, agg, meta,
                          {k: v for k, v in lengths.items()})
    for b in budgets:
        table.plans[int(b)] = plan_to_dict(table.plan(table.tokens_for_n(b)))
    return table


def _prune(measured: list[tuple[dict, dict]], z: float) -> None:
    """Mark ``pruned`` the cells of one bin whose gain over a cheaper kept cell is within ``z``
    standard errors of the paired difference (``fit``'s ``min_gain_se``)."""
    kept: list[tuple[dict, dict]] = []
    for cell, got in sorted(measured, key=lambda t: (t[0]["tokens"], OPTION_METHODS.index(t[0]["method"]), t[0]["n"])):
        for _cheap, other in kept:
            both = [r for r in got if r in other]
            if not both:
                continue
            diff = [float(got[r][0]) - float(other[r][0]) for r in both]
            m = sum(diff) / len(diff)
            var = sum((x - m) ** 2 for x in diff) / max(1, len(diff) - 1)
            if m <= z * math.sqrt(var / len(diff)):
                cell["pruned"] = True
                break
        else:
            kept.append((cell, got))


def simulate(table: StrategyTable, records: Sequence[ProblemRecord], budget_tokens: float) -> tuple[float, float]:
    """(accuracy, mean policy tokens) of ``auto`` at ``budget_tokens`` replayed on measured
    records (what the engine's ``Auto`` would do with these samples: the probe is the first k
    samples, the option's outcome as ``ProblemRecord.outcome``). For cross-validating a fit;
    records without an option's data count as wrong at the probe's cost."""
    plan = table.plan(budget_tokens)
    right = tokens = 0.0
    for r in records:
        _, o = plan.option_for(table, r.probe_difficulty(plan.probe), r.probe_length(plan.probe))
        got = r.outcome(plan.probe, Option(o.method, plan.probe) if o.method == "stop" else o)
        if got is None:
            got = (False, r.sampled_outcome("weighted", plan.probe)[1])
        right += got[0]
        tokens += got[1]
    return right / len(records), tokens / len(records)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    i = q * (len(sorted_values) - 1)
    lo = math.floor(i)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (i - lo) * (sorted_values[hi] - sorted_values[lo])


_CACHE: dict[tuple[str, float], StrategyTable] = {}


def load_cached(path: str | os.PathLike | None) -> StrategyTable:
    """``StrategyTable.load`` with a cache keyed by path and modification time; None: the
    built-in models' table (``BUILTIN_PATH``)."""
    p = Path(path) if path is not None else BUILTIN_PATH
    if not p.is_file():
        raise FileNotFoundError(
            f"strategy table {p} not found; fit one with `ponder calibrate --out {p.name}`"
            + (" (the built-in table ships with ponder: reinstall)" if path is None else "")
        )
    key = (str(p.resolve()), p.stat().st_mtime)
    if key not in _CACHE:
        _CACHE[key] = StrategyTable.load(p)
    return _CACHE[key]
