"""Forest.children_counts: the selection step of REBASE (proportional allocation) and particle
filtering (multinomial / systematic resampling).

1. Twins: random forests built the same way in ``ponder.twins.Forest`` and
   ``ponder._core.Forest`` give bit-identical counts (or the same exception type) for random
   candidates, totals, aggregations, modes, temperatures and seeds.
2. Properties on each implementation: counts sum to the total per problem; proportional
   counts (and systematic ones, up to rounding) are within one of the quota total * w / sum(w),
   ceil counts never favour a lighter candidate over a heavier one
   (w: softmax, or the odds r / (1 - r) to the power 1 / T for ``weights="logit"``, times the
   multiplicity); candidates of weight 0 get nothing; results are deterministic in the seed.
3. The generator is splitmix64 (checked against its published first output) and the
   multinomial frequencies follow the weights.
4. Bad inputs raise ValueError / IndexError naming the argument, and change nothing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ponder.testing.forest import IMPLS, add_roots, assert_unchanged_after_raise, children_with_scores, expand, set_steps
from ponder.twins.forest import SplitMix64, count_weights

MODES = ("proportional", "ceil", "multinomial", "systematic")
WEIGHTS = ("softmax", "logit")
AGGS = ("last", "min", "prod", "mean")
SCORES = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.5, 1.0]), st.floats(-1, 1, width=32))
PROBS = st.one_of(st.sampled_from([0.0, 1e-9, 0.25, 0.5, 0.5, 1.0 - 1e-9, 1.0]), st.floats(0, 1, width=32))
TEMPS = st.one_of(st.sampled_from([0.0, 0.05, 0.1, 1.0, 10.0]), st.floats(1e-3, 100))
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def plan(data, scores_st=SCORES):
    """A random forest as a list of build steps: per problem, root children and grandchildren."""
    problems = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True), label="problems")
    out = []
    for p in problems:
        k = data.draw(st.integers(1, 6), label="children")
        scores = data.draw(st.lists(scores_st, min_size=k, max_size=k), label="scores")
        finished = data.draw(st.lists(st.booleans(), min_size=k, max_size=k), label="finished")
        deeper = data.draw(st.lists(st.integers(0, 3), min_size=k, max_size=k), label="grandchildren")
        sub = [data.draw(st.lists(scores_st, min_size=d, max_size=d), label="grandchild scores") for d in deeper]
        pruned = data.draw(st.lists(st.booleans(), min_size=k, max_size=k), label="pruned")
        out.append((p, scores, finished, sub, pruned))
    return out


def build(Forest, steps):
    """Build the planned forest; returns (forest, selectable ids: scored and not pruned)."""
    f = Forest()
    selectable = []
    for p, scores, finished, sub, pruned in steps:
        (root,) = add_roots(f, [p], [[1, 2]])
        kids = children_with_scores(f, root, [[3]] * len(scores), scores, finished)
        for kid, done, grand, cut in zip(kids, finished, sub, pruned):
            if grand and not done:
                g = expand(f, [kid], [len(grand)])
                set_steps(f, g, [[4]] * len(grand), grand)
                selectable += g
            if cut:
                f.prune([kid])
            else:
                selectable.append(kid)
    return f, selectable


def draw_call(data, selectable):
    ids = data.draw(st.lists(st.sampled_from(selectable), unique=True, max_size=10), label="candidates") if selectable else []
    multiplicity = data.draw(st.one_of(st.none(), st.lists(st.integers(1, 5), min_size=len(ids), max_size=len(ids))),
                             label="multiplicity")
    return dict(
        candidate_ids=np.array(ids, dtype=np.int64),
        total_per_problem=data.draw(st.integers(0, 12), label="total"),
        how=data.draw(st.sampled_from(AGGS), label="how"),
        mode=data.draw(st.sampled_from(MODES), label="mode"),
        temperature=data.draw(TEMPS, label="temperature"),
        seed=data.draw(st.integers(-(2**63), 2**63 - 1), label="seed"),
        weights=data.draw(st.sampled_from(WEIGHTS), label="weights"),
        multiplicity=None if multiplicity is None else np.array(multiplicity, dtype=np.int32),
    )


@SETTINGS
@given(data=st.data(), probabilities=st.booleans())
def test_twins_agree(data, probabilities):
    # probabilities: scores in [0, 1] (PRM outputs), so that weights="logit" accepts them
    steps = plan(data, PROBS if probabilities else SCORES)
    (ref, sel), (core, _) = build(IMPLS["reference"], steps), build(IMPLS["core"], steps)
    kwargs = draw_call(data, sel)
    outcomes = []
    for f in (ref, core):
        try:
            outcomes.append(f.children_counts(**kwargs))
        except (ValueError, IndexError) as e:
            outcomes.append(type(e))
    if isinstance(outcomes[0], type):
        assert outcomes[1] is outcomes[0]
    else:
        assert isinstance(outcomes[1], np.ndarray) and outcomes[1].dtype == np.int32
        np.testing.assert_array_equal(outcomes[1], outcomes[0], strict=True)


def odds_weights(ranks, temperature):
    """weights="logit" written another way: (odds / best odds) ** (1 / T), odds of the clamped score."""
    odds = [0.0 if r == -math.inf else min(max(r, 1e-7), 1 - 1e-7) / (1 - min(max(r, 1e-7), 1 - 1e-7)) for r in ranks]
    top = max(odds)
    return [(o / top) ** (1 / temperature) if top > 0 else 0.0 for o in odds]


def quotas(f, ids, how, total, temperature, weights="softmax", multiplicity=None):
    """Expected share of each candidate: total * w / sum(w), per problem (float64)."""
    fields = f.nodes(ids)
    values = [float(v) for v in f.aggregate(ids, how)] if len(ids) else []
    mult = [1] * len(ids) if multiplicity is None else [int(m) for m in multiplicity]
    groups = {}
    for i, p in enumerate(fields["problem"].tolist()):
        groups.setdefault(p, []).append(i)
    q = [0.0] * len(ids)
    for members in groups.values():
        ranks = [-math.inf if math.isnan(values[i]) else values[i] for i in members]
        w = odds_weights(ranks, temperature) if weights == "logit" else count_weights(ranks, temperature)
        w = [x * mult[i] for i, x in zip(members, w)]
        w = w if sum(w) > 0 else [float(mult[i]) for i in members]
        s = sum(w)
        for i, x in zip(members, w):
            q[i] = total * x / s
    return groups, q


@pytest.mark.parametrize("name", list(IMPLS))
@SETTINGS
@given(data=st.data())
def test_counts_properties(name, data):
    f, sel = build(IMPLS[name], plan(data, PROBS))  # scores in [0, 1]: every weighting accepts them
    kwargs = draw_call(data, sel)
    kwargs["temperature"] = max(kwargs["temperature"], 0.05)
    ids = kwargs["candidate_ids"]
    counts = f.children_counts(**kwargs)
    assert counts.dtype == np.int32 and counts.shape == ids.shape
    groups, q = quotas(f, ids, kwargs["how"], kwargs["total_per_problem"], kwargs["temperature"], kwargs["weights"],
                       kwargs["multiplicity"])
    for members in groups.values():
        assert sum(int(counts[i]) for i in members) == kwargs["total_per_problem"]
    if kwargs["mode"] in ("proportional", "systematic"):  # float32 aggregates in quotas(): a hair of slack
        for i in range(len(ids)):
            assert abs(counts[i] - q[i]) < 1 + 1e-6, (counts.tolist(), q)
    if kwargs["mode"] == "ceil":  # the heaviest gets at least its quota; a heavier one never gets fewer
        for members in groups.values():
            top = max(members, key=lambda i: q[i])
            assert counts[top] >= math.floor(q[top] - 1e-6)
            for i in members:
                for j in members:
                    if q[i] > q[j] * (1 + 1e-5) + 1e-9:
                        assert counts[i] >= counts[j], (counts.tolist(), q)
    for i in range(len(ids)):
        if q[i] == 0.0:
            assert counts[i] == 0
    again = f.children_counts(**kwargs)
    np.testing.assert_array_equal(again, counts)


def test_splitmix64_matches_the_published_sequence():
    # splitmix64.c (Vigna): seed 0 -> first outputs 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4
    g = SplitMix64(0)
    assert g.next() == 0xE220A8397B1DCDAF
    assert g.next() == 0x6E789E6AA1B965F4
    u = SplitMix64(123).uniform()
    assert 0.0 <= u < 1.0


@pytest.mark.parametrize("name", list(IMPLS))
def test_multinomial_frequencies_follow_softmax(name):
    f = IMPLS[name]()
    (root,) = add_roots(f, [0], [[1]])
    kids = children_with_scores(f, root, [[2], [3], [4]], [0.0, 0.5, 1.0])
    total = 3000 if name == "reference" else 30000
    counts = f.children_counts(kids, total, "last", "multinomial", 0.5, 7)
    w = np.exp(np.array([0.0, 0.5, 1.0]) / 0.5)
    expected = total * w / w.sum()
    chi2 = float((((counts - expected) ** 2) / expected).sum())
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001
    # seeds give different draws, and the same seed the same ones
    other = f.children_counts(kids, total, "last", "multinomial", 0.5, 8)
    assert other.tolist() != counts.tolist()
    np.testing.assert_array_equal(f.children_counts(kids, total, "last", "multinomial", 0.5, 7), counts)


@pytest.mark.parametrize("name", list(IMPLS))
def test_proportional_and_raw_weights(name):
    f = IMPLS[name]()
    (root,) = add_roots(f, [0], [[1]])
    kids = children_with_scores(f, root, [[2], [3], [4]], [0.2, 0.3, 0.5])
    # raw weights: quotas 2, 3, 5 of 10
    assert f.children_counts(kids, 10, "last", "proportional", 0.0).tolist() == [2, 3, 5]
    # quotas 0.8, 1.2, 2.0 of 4 -> floors 0, 1, 2, one left for the largest remainder (0.8)
    assert f.children_counts(kids, 4, "last", "proportional", 0.0).tolist() == [1, 1, 2]
    # equal scores, remainder ties go to the lower id
    (r2,) = add_roots(f, [1], [[1]])
    same = children_with_scores(f, r2, [[2], [3], [4]], [0.5, 0.5, 0.5])
    assert f.children_counts(same, 4, "last", "proportional", 1.0).tolist() == [2, 1, 1]
    # both problems at once: each gets its own total, in input order
    both = f.children_counts(kids + same, 4, "last", "proportional", 0.0).tolist()
    assert both == [1, 1, 2, 2, 1, 1]
    # a low temperature concentrates on the best
    assert f.children_counts(kids, 4, "last", "systematic", 1e-3, 1).tolist() == [0, 0, 4]
    # ceil (REBASE's released code): the best gets ceil(4 * .5) = 2, the next ceil(2 * .3 / .5) = 2
    assert f.children_counts(kids, 4, "last", "ceil", 0.0).tolist() == [0, 2, 2]
    assert f.children_counts(same, 2, "last", "ceil", 1.0).tolist() == [1, 1, 0]  # ties: the lower id first


@pytest.mark.parametrize("name", list(IMPLS))
def test_logit_weights_are_the_odds(name):
    f = IMPLS[name]()
    (root,) = add_roots(f, [0], [[1]])
    kids = children_with_scores(f, root, [[2], [3], [4]], [0.2, 0.5, 0.8])
    # odds 1/4, 1, 4: quotas 1, 4, 16 of 21; at T=0.5 the squares 1/16, 1, 16: 1, 16, 256 of 273
    assert f.children_counts(kids, 21, "last", "proportional", 1.0, 0, "logit").tolist() == [1, 4, 16]
    assert f.children_counts(kids, 273, "last", "proportional", 0.5, 0, "logit").tolist() == [1, 16, 256]
    # multiplicity: 4 particles of odds 1/4 weigh as much as one of odds 1
    assert f.children_counts(kids, 12, "last", "proportional", 1.0, 0, "logit", [4, 1, 1]).tolist() == [2, 2, 8]
    assert f.children_counts(kids, 12, "last", "proportional", 1.0, 0, "softmax", [1, 1, 1]).tolist() == \
        f.children_counts(kids, 12, "last", "proportional", 1.0, 0).tolist()
    # 0 and 1 are clamped to [1e-7, 1 - 1e-7]: odds 1e-7 / (1 - 1e-7) and its inverse, both finite
    (r2,) = add_roots(f, [1], [[1]])
    edge = children_with_scores(f, r2, [[2], [3], [4]], [0.0, 1.0, 1.0])
    assert f.children_counts(edge, 10, "last", "proportional", 1.0, 0, "logit").tolist() == [0, 5, 5]
    # all-zero (raw) weights: each candidate weighs its multiplicity
    (r3,) = add_roots(f, [2], [[1]])
    zero = children_with_scores(f, r3, [[2], [3]], [0.0, 0.0])
    assert f.children_counts(zero, 4, "last", "proportional", 0.0, 0, "softmax", [3, 1]).tolist() == [3, 1]
    # multinomial draws follow the odds (chi-square, 2 degrees of freedom, p = 0.001)
    total = 3000 if name == "reference" else 30000
    counts = f.children_counts(kids, total, "last", "multinomial", 1.0, 11, "logit")
    expected = total * np.array([0.25, 1.0, 4.0]) / 5.25
    assert float((((counts - expected) ** 2) / expected).sum()) < 13.8


@pytest.mark.parametrize("name", list(IMPLS))
def test_bad_inputs_raise_and_change_nothing(name):
    f = IMPLS[name]()
    (root,) = add_roots(f, [0], [[1]])
    kids = children_with_scores(f, root, [[2], [3]], [-0.5, 0.5])
    (unscored,) = expand(f, [kids[1]], [1])
    f.prune([kids[0]])
    good = [kids[1]]
    cases = [
        (ValueError, "how", dict(how="best")),
        (ValueError, "mode", dict(mode="stratified")),
        (ValueError, "total_per_problem", dict(total_per_problem=-1)),
        (ValueError, "temperature", dict(temperature=-1.0)),
        (ValueError, "temperature", dict(temperature=float("nan"))),
        (ValueError, "temperature", dict(temperature=float("inf"))),
        (ValueError, "candidate_ids", dict(candidate_ids=[kids[0]])),  # pruned
        (ValueError, "candidate_ids", dict(candidate_ids=[unscored])),
        (ValueError, "candidate_ids", dict(candidate_ids=[kids[1], kids[1]])),
        (IndexError, "candidate_ids", dict(candidate_ids=[999])),
        (ValueError, "candidate_ids", dict(candidate_ids=[[kids[1]]])),
    ]
    for exc, match, change in cases:
        kwargs = dict(candidate_ids=good, total_per_problem=3, how="last", mode="multinomial", temperature=1.0, seed=0)
        kwargs.update(change)
        assert_unchanged_after_raise(f, exc, match, f.children_counts, **kwargs)
    # raw weights need non-negative scores
    g = IMPLS[name]()
    (r,) = add_roots(g, [0], [[1]])
    neg = children_with_scores(g, r, [[2], [3]], [-0.5, 0.5])
    assert_unchanged_after_raise(g, ValueError, "negative", g.children_counts, neg, 3, "last", "proportional", 0.0, 0)
    # logit weights: scores in [0, 1], temperature > 0; weights and multiplicity checked
    probs = children_with_scores(g, r, [[4], [5]], [0.5, 0.25])
    logit_cases = [
        (ValueError, r"outside \[0, 1\]", dict(candidate_ids=neg[1:] + probs + neg[:1])),
        (ValueError, "temperature", dict(temperature=0.0)),
        (ValueError, "weights", dict(weights="odds")),
        (ValueError, "multiplicity", dict(multiplicity=[1])),
        (ValueError, "multiplicity", dict(multiplicity=[1, 0])),
        (ValueError, "multiplicity", dict(multiplicity=[1.0, 2.0])),
        (ValueError, "multiplicity", dict(multiplicity=[1, 2, 3])),
    ]
    for exc, match, change in logit_cases:
        kwargs = dict(candidate_ids=probs, total_per_problem=3, how="last", mode="multinomial", temperature=1.0,
                      seed=0, weights="logit")
        kwargs.update(change)
        assert_unchanged_after_raise(g, exc, match, g.children_counts, **kwargs)
