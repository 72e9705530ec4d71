"""ponder.methods.stopping: the Beta stopping rule and its stated error bound."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ponder.methods import stopping

thresholds = st.floats(min_value=0.5001, max_value=0.999)
counts = st.lists(st.integers(min_value=0, max_value=30), min_size=0, max_size=6)
weights = st.lists(st.floats(min_value=0.0, max_value=20.0), min_size=0, max_size=6)


def _posterior_numeric(a: float, b: float, grid: int = 20000) -> float:
    """P(Beta(a, b) > 1/2) by midpoint integration of the density (an independent check)."""
    logc = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    h = 1.0 / grid
    total = upper = 0.0
    for i in range(grid):
        x = (i + 0.5) * h
        d = math.exp(logc + (a - 1) * math.log(x) + (b - 1) * math.log(1 - x)) * h
        total += d
        if x > 0.5:
            upper += d
    return upper / total


@given(counts, thresholds)
@settings(max_examples=200, deadline=None)
def test_never_stops_while_the_runner_up_could_still_win_within_the_bound(votes, threshold):
    """Stop => the posterior probability that the runner-up is better supported is at most
    1 - threshold (checked with the binomial identity computed independently)."""
    if stopping.should_stop(votes, threshold):
        ordered = sorted(votes, reverse=True) + [0, 0]
        v1, v2 = ordered[0], ordered[1]
        m = v1 + v2 + 1
        p_runner_up = sum(math.comb(m, j) for j in range(v1 + 1, m + 1)) / 2**m
        assert p_runner_up <= 1 - threshold + 1e-12
        assert v1 > v2  # a tie is never settled


@given(weights, thresholds)
@settings(max_examples=40, deadline=None)
def test_weighted_bound_holds_against_numeric_integration(ws, threshold):
    p = stopping.leader_probability(ws)
    v1, v2 = stopping.top_two(ws)
    if v1 > 0:
        assert p == pytest.approx(_posterior_numeric(v1 + 1, v2 + 1, 4000), abs=2e-3)
    if stopping.should_stop(ws, threshold):
        assert _posterior_numeric(v1 + 1, v2 + 1, 4000) >= threshold - 2e-3


def test_incomplete_beta_agrees_with_the_binomial_sum():
    rnd = random.Random(3)
    for _ in range(200):
        a, b = rnd.randint(1, 40), rnd.randint(1, 40)
        exact = stopping.beta_sf_half(a, b)
        assert 1.0 - stopping._betainc_half(float(a), float(b)) == pytest.approx(exact, abs=1e-11)
    assert stopping.beta_sf_half(3.5, 3.5) == pytest.approx(0.5, abs=1e-12)  # symmetric


@pytest.mark.parametrize("threshold", [0.6, 0.8, 0.9, 0.95, 0.99, 0.999])
def test_unanimity_stops_at_once_exactly_when_the_rule_says_so(threshold):
    k = stopping.unanimity_samples(threshold)
    assert 1 - 2.0 ** -(k + 1) >= threshold > 1 - 2.0 ** -k  # the least such k
    assert stopping.stop_counts(["7"] * k, threshold)
    assert not stopping.stop_counts(["7"] * (k - 1), threshold)
    # abstentions do not count as votes, for or against
    assert stopping.stop_counts(["7"] * k + [None] * 5, threshold)
    assert stopping.unanimity_samples(0.95) == 4  # a first round of 4 agreeing samples stops


@given(counts, thresholds, thresholds)
@settings(max_examples=200, deadline=None)
def test_monotone_in_the_threshold(votes, t1, t2):
    lo, hi = min(t1, t2), max(t1, t2)
    if stopping.should_stop(votes, hi):
        assert stopping.should_stop(votes, lo)


@given(counts, st.integers(min_value=0, max_value=5), thresholds)
@settings(max_examples=200, deadline=None)
def test_more_votes_for_the_leader_never_unsettle_it(votes, extra, threshold):
    if not votes or max(votes) == 0:
        return
    if stopping.should_stop(votes, threshold):
        i = votes.index(max(votes))
        more = list(votes)
        more[i] += extra
        assert stopping.should_stop(more, threshold)


@given(st.lists(st.sampled_from(["1", "2", "3", None]), max_size=12), thresholds, st.data())
@settings(max_examples=100, deadline=None)
def test_weighted_rule_is_never_bolder_than_the_count_rule(answers, threshold, data):
    scores = [data.draw(st.floats(0.0, 1.0)) for _ in answers]
    if stopping.stop_weighted(answers, scores, threshold):
        # every weight <= 1, so the leader's posterior cannot exceed the one of full votes for it
        w = stopping.tally(answers, scores)
        c = stopping.tally(answers)
        leader = max(w, key=w.get)
        others = [v for a, v in w.items() if a != leader]
        assert stopping.leader_probability([c[leader], max(others, default=0.0)]) >= threshold - 1e-12


def test_no_vote_never_stops_and_bad_thresholds_are_refused():
    assert not stopping.should_stop([], 0.9)
    assert not stopping.stop_counts([None, None], 0.51)
    assert stopping.leader_probability({}) == 0.5
    for bad in (0.5, 1.5, -1, True, "0.9"):
        with pytest.raises(ValueError, match="threshold"):
            stopping.should_stop([3, 0], bad)
    with pytest.raises(ValueError, match="Beta"):
        stopping.beta_sf_half(0, 1)


# ----------------------------------------------------------------------------- futility


def _settle_probability_mc(votes: list[int], samples: int, remaining: int, threshold: float, alpha: float,
                           sims: int, rng: random.Random) -> float:
    """Monte Carlo of the model itself: a Polya urn (Dirichlet process, concentration alpha;
    abstentions as a category that never wins) run for ``remaining`` draws, the leader rule
    checked after every draw. An independent check of the union bound."""
    hits = 0
    abstain = samples - sum(votes)
    for _ in range(sims):
        counts = list(votes) + [abstain]  # the last category never wins
        m = samples
        settled = False
        for _ in range(remaining):
            u = rng.random() * (m + alpha)
            if u >= m:
                counts.insert(-1, 1)  # a new answer
            else:
                acc = 0.0
                for i, c in enumerate(counts):
                    acc += c
                    if u < acc:
                        counts[i] += 1
                        break
            m += 1
            if stopping.should_stop(counts[:-1], threshold):
                settled = True
                break
        hits += settled
    return hits / sims


@pytest.mark.parametrize("votes,samples,remaining", [
    ([1, 1, 1, 1], 4, 12), ([2, 1, 1], 4, 12), ([2, 2], 4, 12), ([1] * 6, 6, 10), ([1] * 8, 8, 8),
    ([3, 1], 4, 4), ([2, 1], 4, 12), ([1, 1], 4, 6), ([2, 1, 1, 1], 5, 12), ([1, 1, 1], 3, 20),
])
def test_settle_probability_is_the_models_and_the_union_bound_is_above_it(votes, samples, remaining):
    rng = random.Random(11)
    sims = 1500
    mc = _settle_probability_mc(votes, samples, remaining, 0.95, 1.0, sims, rng)
    sd = math.sqrt(max(mc * (1 - mc), 1e-3) / sims)
    exact = stopping.settle_probability(votes, samples, remaining, 0.95)
    bound = stopping.settle_probability_bound(votes, samples, remaining, 0.95)
    assert abs(exact - mc) <= 4 * sd
    assert bound >= exact - 1e-12
    # fractional votes take the union bound
    frac = [v - 0.25 for v in votes]
    assert stopping.settle_probability(frac, samples, remaining, 0.95) == stopping.settle_probability_bound(
        frac, samples, remaining, 0.95)


@given(st.lists(st.integers(min_value=0, max_value=10), max_size=5), st.integers(0, 6), st.integers(0, 14), thresholds,
       st.floats(0.01, 0.99))
@example([], 0, 1, 0.75, 0.5)  # no completion yet: the bound must reach the exact 1.0
@settings(max_examples=80, deadline=None)
def test_futility_properties(votes, extra_samples, remaining, threshold, futility):
    samples = sum(votes) + extra_samples  # extra: abstentions
    if stopping.should_stop(votes, threshold):
        return  # futility is asked only of a vote that is not settled
    p = stopping.settle_probability(votes, samples, remaining, threshold)
    bound = stopping.settle_probability_bound(votes, samples, remaining, threshold)
    assert 0.0 <= p <= bound + 1e-12 and bound <= 1.0
    # nothing left to sample: never futile (nothing to save), and nothing can settle
    assert not stopping.futile(votes, samples, 0, futility, threshold)
    assert stopping.settle_probability(votes, samples, 0, threshold) == 0.0
    # more samples left can only make settling more likely
    assert stopping.settle_probability(votes, samples, remaining + 3, threshold) >= p - 1e-12
    assert stopping.settle_probability_bound(votes, samples, remaining + 3, threshold) >= bound - 1e-12
    # futile exactly when the probability is within the futility level
    assert stopping.futile(votes, samples, remaining, futility, threshold) == (remaining > 0 and p <= futility)
    # a leader that settles with the remaining votes all its own is never written off at 0
    if votes and max(votes) > 0 and remaining > 0:
        v = sorted(votes, reverse=True) + [0]
        if stopping.should_stop([v[0] + remaining, v[1]], threshold):
            assert p > 0.0


def test_futility_writes_off_scattered_votes_but_not_a_forming_majority():
    # 4 different answers in 4 samples, 12 left: settles with probability 0.167 (bound 0.84)
    assert stopping.settle_probability([1] * 4, 4, 12) == pytest.approx(0.1668, abs=1e-3)
    assert stopping.futile([1] * 4, 4, 12, 0.2) and not stopping.futile([1] * 4, 4, 12, 0.1)
    # 8 different answers in 8 samples, 8 left: 0.012
    assert stopping.futile([1] * 8, 8, 8, 0.05)
    # 3 of 4 agree: more samples would likely settle it
    assert not stopping.futile([3, 1], 4, 12, 0.5)
    assert stopping.settle_probability([3, 1], 4, 12) > 0.6


def test_beta_binomial_tail():
    # a = b = 1: the count is uniform on 0..n
    for n in (0, 1, 5, 12):
        for x in range(n + 2):
            assert stopping.beta_binomial_sf(x, n, 1.0, 1.0) == pytest.approx(max(0, n - x + 1) / (n + 1), abs=1e-12)
    # against a direct mixture of binomials (numeric integration over the Beta density)
    a, b, n, x = 2.5, 4.0, 9, 4
    logc = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    grid = 20000
    num = 0.0
    for i in range(grid):
        p = (i + 0.5) / grid
        dens = math.exp(logc + (a - 1) * math.log(p) + (b - 1) * math.log(1 - p)) / grid
        num += dens * sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(x, n + 1))
    assert stopping.beta_binomial_sf(x, n, a, b) == pytest.approx(num, abs=1e-4)
    with pytest.raises(ValueError, match="Beta-binomial"):
        stopping.beta_binomial_sf(1, 3, 0.0, 1.0)


def test_bad_futility_is_refused():
    for bad in (0, 1, 1.5, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="futility"):
            stopping.EarlyStop(futility=bad).validate()
    assert stopping.as_early_stop({"threshold": 0.95, "round_size": 2, "futility": 0.1}) == stopping.EarlyStop(0.95, 2, 0.1)


def test_all_below_is_the_prm_gate():
    assert stopping.all_below([0.05, 0.09], 0.1)
    assert not stopping.all_below([0.05, 0.1], 0.1)  # at the level is not below it
    assert not stopping.all_below([], 0.1)  # nothing scored: the gate stays shut
    assert not stopping.all_below([0.01, float("nan")], 0.1)  # an unscored completion shuts it too
    assert stopping.all_below([0.99], 1.0)


def test_futility_score_is_checked():
    es = stopping.EarlyStop(0.95, 2, futility=0.25, futility_score=0.1)
    assert es.validate() is es
    assert stopping.as_early_stop({"threshold": 0.95, "round_size": 2, "futility": 0.25, "futility_score": 0.1}) == es
    for bad in (0, -0.1, 1.5, True, "0.1", float("nan")):
        with pytest.raises(ValueError, match="futility_score must be"):
            stopping.EarlyStop(futility=0.25, futility_score=bad).validate()
    with pytest.raises(ValueError, match="set futility too"):
        stopping.EarlyStop(futility_score=0.1).validate()
