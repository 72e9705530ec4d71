"""When is a vote settled? Adaptive-consistency's stopping rule, with its error bound stated.

Adaptive-Consistency (Aggarwal et al. 2023, arXiv 2305.11860) samples until a posterior over
the answer frequencies says the current leader stays the leader. ponder uses its Beta form:

* Model: the leader's and the runner-up's shares of the vote among the two are ``p`` and
  ``1 - p``; with a uniform prior and ``v1`` votes for the leader, ``v2`` for the runner-up,
  the posterior of ``p`` is ``Beta(v1 + 1, v2 + 1)``.
* ``leader_probability`` is ``P(p > 1/2)`` under it: the probability that the leader is the
  answer more samples would keep choosing (the runner-up wins with the rest: ``1 -`` that).
* **Bound**: ``should_stop`` stops only when ``P(p > 1/2) >= threshold``, i.e. when the
  posterior probability that the runner-up (and, the runner-up being the strongest rival,
  any other answer) is the better-supported answer is at most ``1 - threshold`` (0.05 at
  the default 0.95). It never stops without a vote.

For integer counts this is exact: ``P(p > 1/2) = P(Binomial(v1 + v2 + 1, 1/2) <= v1)``.
Unanimity of ``k`` votes gives ``1 - 2^-(k+1)``: at 0.95 four agreeing samples stop, three do
not. Completions without an answer abstain (they move no count).

PRM-weighted version (weighted best-of-N, whose vote sums each answer's aggregated PRM
scores): each completion is a fractional vote of its score (in [0, 1]), so the posterior is
``Beta(w1 + 1, w2 + 1)`` with ``w1``, ``w2`` the leader's and runner-up's summed scores;
``P(p > 1/2)`` is the regularized incomplete beta function, computed here without scipy. The
posterior grows with the leader's weight and shrinks with the rival's; a score below 1 counts
less than a vote, so the leader is never more settled than its full count of votes would make
it against the same rival weight. (A rival the PRM scores low weighs little: that is the point.)

Futility (optional, ``EarlyStop(futility=eps)``): the leader rule alone never stops a vote
that stays scattered (a weak policy on a problem beyond it: every sample a different answer),
and those problems are the long ones. ``futile`` stops once an upper bound on the posterior
predictive probability that the remaining samples (up to the cap) would settle the vote is at
most ``eps`` (``settle_probability``: a Dirichlet-process model of the answers; exact for
answer counts, a union bound ``settle_probability_bound`` for PRM-weighted votes). **Bound**: a
futility stop happens only when, under that model, continuing to the cap would settle the vote
with probability at most ``eps``; the answer is then the vote so far. (The union bound is
conservative: for 4 different answers in 4 samples with 12 left it gives 0.84 where the exact
model probability is 0.17.)

PRM gate (optional, ``EarlyStop(futility=eps, futility_score=s)``): futility may stop a search
only while every completion so far has an aggregated PRM score below ``s`` (``all_below``):
the verifier finds nothing plausible among them. A scattered vote whose completions the PRM
rates plausibly (a weak policy on a problem within its reach, whose right answer has not yet
repeated) keeps sampling. It reads the completions' scores, so it needs a PRM (majority then
scores its completions; the answer is still the plain vote). It only narrows the futility
rule: its bound holds unchanged.

All functions are pure (no state, no randomness) and take plain Python numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

DEFAULT_THRESHOLD = 0.95


def top_two(values: Iterable[float]) -> tuple[float, float]:
    """The largest and second largest of ``values`` (0 for a missing one)."""
    first = second = 0.0
    for v in values:
        v = float(v)
        if v > first:
            first, second = v, first
        elif v > second:
            second = v
    return first, second


def tally(answers: Sequence[Hashable | None], weights: Sequence[float] | None = None) -> dict:
    """Votes per answer (``None`` abstains): counts, or summed ``weights`` when given.
    Insertion order is the order answers were first seen."""
    out: dict = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        out[a] = out.get(a, 0.0) + (1.0 if weights is None else float(weights[i]))
    return out


def beta_sf_half(a: float, b: float) -> float:
    """``P(X > 1/2)`` for ``X ~ Beta(a, b)``, a, b > 0; i.e. ``1 - I_{1/2}(a, b)``.

    Integer a, b: the exact binomial sum. Otherwise the continued fraction of the regularized
    incomplete beta function (Numerical Recipes' ``betacf``; absolute error < 1e-12)."""
    if not (a > 0 and b > 0):
        raise ValueError(f"Beta parameters must be > 0; got a={a!r}, b={b!r}")
    if float(a).is_integer() and float(b).is_integer():
        ia, ib = int(a), int(b)
        m = ia + ib - 1
        # I_{1/2}(a, b) = P(Binomial(a + b - 1, 1/2) >= a)
        return sum(math.comb(m, j) for j in range(ia)) / 2.0**m
    return 1.0 - _betainc_half(float(a), float(b))


def _betainc_half(a: float, b: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` at x = 1/2."""
    x = 0.5
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)
    front = math.exp(log_front)
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def leader_probability(votes: dict | Iterable[float]) -> float:
    """Posterior probability that the current leader is the better-supported answer:
    ``P(p > 1/2)`` with ``p ~ Beta(v1 + 1, v2 + 1)``, v1 / v2 the largest and second largest
    vote (counts or summed weights; a dict from ``tally`` or the bare values). 0.5 with no
    vote at all (nothing is known)."""
    values = votes.values() if isinstance(votes, dict) else votes
    v1, v2 = top_two(values)
    if v1 <= 0:
        return 0.5
    return beta_sf_half(v1 + 1.0, v2 + 1.0)


def should_stop(votes: dict | Iterable[float], threshold: float = DEFAULT_THRESHOLD) -> bool:
    """Stop sampling: some answer has a vote and ``leader_probability(votes) >= threshold``.

    Guarantee: when it returns True the posterior probability that another answer (the
    runner-up) is better supported than the leader is at most ``1 - threshold``. threshold
    must be in (0.5, 1]; at 1 it stops only once the rival's probability rounds to 0 in
    float64 (about 53 unanimous votes)."""
    check_threshold(threshold)
    values = list(votes.values() if isinstance(votes, dict) else votes)
    if not values or max(values) <= 0:
        return False
    return leader_probability(values) >= threshold


def stop_counts(answers: Sequence[Hashable | None], threshold: float = DEFAULT_THRESHOLD) -> bool:
    """``should_stop`` on the answer counts of majority voting (``None`` abstains)."""
    return should_stop(tally(answers), threshold)


def stop_weighted(
    answers: Sequence[Hashable | None], scores: Sequence[float], threshold: float = DEFAULT_THRESHOLD
) -> bool:
    """``should_stop`` on the summed PRM scores per answer (weighted best-of-N's vote).
    Scores are clipped to [0, 1]; NaN counts 0."""
    clipped = [0.0 if not (s == s) else min(1.0, max(0.0, float(s))) for s in scores]
    return should_stop(tally(answers, clipped), threshold)


def unanimity_samples(threshold: float = DEFAULT_THRESHOLD) -> int:
    """The fewest unanimous votes that stop: the least k with ``1 - 2^-(k+1) >= threshold``."""
    check_threshold(threshold)
    k = 1
    while 1.0 - 2.0 ** -(k + 1) < threshold:
        k += 1
        if k > 1100:
            raise ValueError(f"threshold {threshold!r} is never reached")
    return k


# ----------------------------------------------------------------------------- futility


def beta_binomial_sf(x: int, n: int, a: float, b: float) -> float:
    """``P(X >= x)`` for ``X ~ BetaBinomial(n, a, b)`` (a, b > 0): the count of successes in n
    draws whose success probability is ``Beta(a, b)``-distributed. Exact sum of the pmf."""
    if not (a > 0 and b > 0):
        raise ValueError(f"Beta-binomial parameters must be > 0; got a={a!r}, b={b!r}")
    if x <= 0:
        return 1.0
    if x > n:
        return 0.0
    lbeta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    total = 0.0
    for k in range(int(x), n + 1):
        log_pmf = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                   + math.lgamma(k + a) + math.lgamma(n - k + b) - math.lgamma(n + a + b) - lbeta)
        total += math.exp(log_pmf)
    return min(1.0, total)


def _votes_to_settle(have: float, rival: float, remaining: int, threshold: float) -> int | None:
    """The fewest further votes x <= remaining (each worth at most 1) after which an answer
    with ``have`` votes can lead a rival with ``rival`` at ``threshold``; None when none do."""
    for x in range(remaining + 1):
        if have + x > 0 and beta_sf_half(have + x + 1.0, rival + 1.0) >= threshold:
            return x
    return None


def settle_probability_bound(
    votes: dict | Iterable[float], samples: int, remaining: int, threshold: float = DEFAULT_THRESHOLD,
    concentration: float = 1.0,
) -> float:
    """An upper bound on the posterior predictive probability that sampling ``remaining`` more
    solutions would let ``should_stop`` fire (at any point up to the cap).

    Model (Dirichlet process, concentration ``alpha``): the policy's answers are draws from an
    unknown distribution; given ``samples`` completions so far (abstentions included) of which
    answer j holds ``c_j`` votes (counts, or PRM-weighted votes in [0, 1] each: the rest of a
    completion's unit goes to "rejected", which never wins), answer j's share of future votes
    is ``Beta(c_j, samples - c_j + alpha)`` and all answers not yet voted for share
    ``Beta(alpha, samples)``; a future completion adds at most 1 to one answer's votes.

    Bound: answer j can be the settled leader only once ``c_j + X_j`` reaches the fewest votes
    that lead the strongest *current* rival at ``threshold`` (rivals' votes only grow), X_j its
    future votes, ``X_j ~ BetaBinomial(remaining, c_j, samples - c_j + alpha)``; summing that
    tail over the answers, plus the same for the not-yet-seen answers together against the
    current leader, bounds the probability from above (a union bound). Capped at 1."""
    check_threshold(threshold)
    if remaining <= 0:
        return 0.0
    if not concentration > 0:
        raise ValueError(f"concentration must be > 0; got {concentration!r}")
    values = sorted((float(v) for v in (votes.values() if isinstance(votes, dict) else votes) if v > 0), reverse=True)
    m = max(float(samples), sum(values))
    total = 0.0
    for i, c in enumerate(values):
        rival = values[1] if i == 0 and len(values) > 1 else (values[0] if i > 0 else 0.0)
        x = _votes_to_settle(c, rival, remaining, threshold)
        if x is not None:
            total += beta_binomial_sf(x, remaining, c, max(m - c, 0.0) + concentration)
    x = _votes_to_settle(0.0, values[0] if values else 0.0, remaining, threshold)
    if x is not None:
        # no completion yet (m = 0): every future vote goes to a not-yet-seen answer, the
        # b -> 0 limit of BetaBinomial(remaining, alpha, b) (all its mass at remaining)
        total += beta_binomial_sf(x, remaining, concentration, m) if m > 0 else float(x <= remaining)
    return min(1.0, total)


#: the most urn states ``settle_probability`` visits exactly before it takes the union bound
EXACT_MAX_STATES = 5_000


class _TooManyStates(Exception):
    pass


def settle_probability(
    votes: dict | Iterable[float], samples: int, remaining: int, threshold: float = DEFAULT_THRESHOLD,
    concentration: float = 1.0,
) -> float:
    """The posterior predictive probability, under the model of ``settle_probability_bound``,
    that ``should_stop`` would fire at some point within ``remaining`` more samples.

    Integer votes (answer counts): exact, by recursion over the Polya urn's states (counts
    sorted, abstentions apart; the rule checked after every sample, so for rounds of several
    samples it is an upper bound of the chance of settling at a round's end), unless that
    needs more than ``EXACT_MAX_STATES`` states. Fractional (PRM-weighted) votes, or too many
    states: ``settle_probability_bound`` (an upper bound). Either way never below the model's
    probability of settling at a round's end."""
    check_threshold(threshold)
    if remaining <= 0:
        return 0.0
    if not concentration > 0:
        raise ValueError(f"concentration must be > 0; got {concentration!r}")
    values = [float(v) for v in (votes.values() if isinstance(votes, dict) else votes) if v > 0]
    if all(v.is_integer() for v in values) and samples >= sum(values):
        counts = tuple(sorted((int(v) for v in values), reverse=True))
        try:
            return _settle_exact_from(counts, int(samples) - sum(counts), int(remaining), float(threshold),
                                      float(concentration))
        except _TooManyStates:
            pass
    return settle_probability_bound(values, samples, remaining, threshold, concentration)


@functools.lru_cache(maxsize=65_536)
def _settle_exact_from(counts: tuple[int, ...], abstain: int, remaining: int, threshold: float, alpha: float) -> float:
    """``_settle_exact`` from one urn state with a fresh memo, cached: a pure function of its
    arguments, and searches (and replays over many records) meet the same states again.
    ``_TooManyStates`` propagates (an exception is not cached)."""
    return _settle_exact(counts, abstain, remaining, threshold, alpha, {})


def _leads(counts: tuple[int, ...], threshold: float) -> bool:
    v1 = counts[0] if counts else 0
    v2 = counts[1] if len(counts) > 1 else 0
    return v1 > 0 and beta_sf_half(v1 + 1, v2 + 1) >= threshold


def _settle_exact(counts: tuple[int, ...], abstain: int, remaining: int, threshold: float, alpha: float,
                  memo: dict) -> float:
    """P(the leader rule fires within ``remaining`` draws) from this urn state (not settled now)."""
    if remaining == 0:
        return 0.0
    key = (counts, abstain, remaining)
    if key in memo:
        return memo[key]
    if len(memo) >= EXACT_MAX_STATES:
        raise _TooManyStates
    v1 = counts[0] if counts else 0
    v2 = counts[1] if len(counts) > 1 else 0
    if beta_sf_half(v1 + remaining + 1, v2 + 1) < threshold:
        memo[key] = 0.0  # not even every remaining vote for the leader settles it; no other answer does better
        return 0.0
    z = sum(counts) + abstain + alpha
    total, seen = 0.0, set()
    for i, c in enumerate(counts):
        if c in seen:
            continue
        seen.add(c)
        nxt = tuple(sorted(counts[:i] + (c + 1,) + counts[i + 1:], reverse=True))
        p = c * counts.count(c) / z
        total += p * (1.0 if _leads(nxt, threshold) else _settle_exact(nxt, abstain, remaining - 1, threshold, alpha, memo))
    if abstain:
        total += abstain / z * _settle_exact(counts, abstain + 1, remaining - 1, threshold, alpha, memo)
    nxt = counts + (1,)
    total += alpha / z * (1.0 if _leads(nxt, threshold) else _settle_exact(nxt, abstain, remaining - 1, threshold, alpha, memo))
    memo[key] = min(1.0, total)
    return memo[key]


def futile(
    votes: dict | Iterable[float], samples: int, remaining: int, futility: float,
    threshold: float = DEFAULT_THRESHOLD, concentration: float = 1.0,
) -> bool:
    """Stop for futility: ``settle_probability(...) <= futility``. Guarantee: under the model of
    ``settle_probability_bound``, when it returns True the posterior predictive probability that
    the remaining samples would settle the vote is at most ``futility`` (exact for counts, a
    union bound for PRM-weighted votes). Never with nothing left to sample (nothing to save)."""
    check_futility(futility)
    if remaining <= 0:
        return False
    return settle_probability(votes, samples, remaining, threshold, concentration) <= futility


def all_below(scores: Iterable[float], level: float) -> bool:
    """True when there is at least one score and every score is a number below ``level``
    (a NaN, an unscored completion, is not below anything: the gate stays shut)."""
    seen = False
    for s in scores:
        s = float(s)
        if not s < level:  # also False for NaN
            return False
        seen = True
    return seen


def decide(rule: EarlyStop, votes: dict, samples: int, remaining: int,
           scores: Callable[[], Iterable[float]] | None = None) -> tuple[bool, bool]:
    """(settled, futile) after a round: ``should_stop`` at ``rule.threshold``; else, with
    ``rule.futility`` set and ``remaining`` samples left, ``futile``; and, with
    ``rule.futility_score`` set, only if ``all_below(scores(), rule.futility_score)``
    (``scores``: the completions' aggregated PRM scores, asked for only then; None: none, the
    gate stays shut). The one decision of the early-stop state machine and of its replays."""
    if should_stop(votes, rule.threshold):
        return True, False
    if rule.futility is None or remaining <= 0:
        return False, False
    if not futile(votes, samples, remaining, rule.futility, rule.threshold):
        return False, False
    if rule.futility_score is None:
        return False, True
    return False, all_below(scores() if scores is not None else (), rule.futility_score)


def check_futility(futility: float) -> None:
    """ValueError unless futility is a number in (0, 1)."""
    if isinstance(futility, bool) or not isinstance(futility, (int, float)) or not 0.0 < futility < 1.0:
        raise ValueError(f"early-stop futility must be None or a number in (0, 1); got {futility!r}")


def check_threshold(threshold: float) -> None:
    """ValueError unless threshold is a number in (0.5, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.5 < threshold <= 1.0:
        raise ValueError(f"early-stop threshold must be a number in (0.5, 1]; got {threshold!r}")


@dataclass(frozen=True)
class EarlyStop:
    """``SearchConfig.early_stop`` for majority / best-of-N / weighted best-of-N: sample in
    rounds of ``round_size`` solutions (every live search's round advances in the same engine
    steps) and stop once ``should_stop`` holds at ``threshold`` after a round (majority: the
    answer counts; best-of-N and weighted best-of-N: the PRM-weighted votes), or, with
    ``futility`` in (0, 1) set, once ``futile`` holds at that level (the vote is unlikely to
    settle before the cap), or after n. ``futility=None`` (the default): the leader rule only.
    ``futility_score`` in (0, 1] (needs ``futility``, and a PRM): a futility stop only while
    every completion's aggregated PRM score (``SearchConfig.vote_agg``) is below it."""

    threshold: float = DEFAULT_THRESHOLD
    round_size: int = 4
    futility: float | None = None
    futility_score: float | None = None

    def validate(self) -> EarlyStop:
        check_threshold(self.threshold)
        if self.futility is not None:
            check_futility(self.futility)
        fs = self.futility_score
        if fs is not None:
            if isinstance(fs, bool) or not isinstance(fs, (int, float)) or not 0.0 < fs <= 1.0:
                raise ValueError(f"early_stop.futility_score must be None or a number in (0, 1]; got {fs!r}")
            if self.futility is None:
                raise ValueError("early_stop.futility_score gates the futility rule: set futility too "
                                 "(e.g. EarlyStop(futility=0.25, futility_score=0.1))")
        r = self.round_size
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"early_stop.round_size must be an integer >= 1; got {r!r}")
        return self


def as_early_stop(value) -> EarlyStop | None:
    """``SearchConfig.early_stop`` as an ``EarlyStop``: None / False: off; True: the
    defaults; a number: that threshold; a mapping: its fields (a config read back from
    JSON); an ``EarlyStop``: itself. ValueError for anything else or bad fields."""
    if value is None or value is False:
        return None
    if value is True:
        return EarlyStop()
    if isinstance(value, EarlyStop):
        return value.validate()
    if isinstance(value, (int, float)):
        return EarlyStop(threshold=float(value)).validate()
    if isinstance(value, dict):
        try:
            return EarlyStop(**value).validate()
        except TypeError as exc:
            raise ValueError(f"early_stop: {exc}") from exc
    raise ValueError(f"early_stop must be None, a threshold in (0.5, 1] or an EarlyStop; got {value!r}")
