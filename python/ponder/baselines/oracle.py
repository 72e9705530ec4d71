"""Beam search and DVTS the way huggingface/search-and-learn writes them: the tests' oracle.

One problem at a time, lists of ``Beam`` objects holding their text and step scores, no
forest. The models are driven through the same Protocol calls as ``ponder.search`` (the
Protocols name paths by node id, so the oracle hands out its own ids), which makes the two
comparable call for call with a deterministic policy whose steps depend only on a path's
content and the sample's index among its siblings.

Where search-and-learn is undefined or ponder deliberately differs, the oracle does what
ponder does: docs/search_and_learn_differences.md lists every such point (ties, the order of
a kept beam's copies, what ends a path, the last iteration, lookahead, abstentions, the final
vote's aggregation, DVTS's result). It shares no search code with ``ponder.methods``.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

from ..grading import extract_answer, normalize_answer


@dataclass
class Beam:
    prompt: str
    index: int
    node: int  # the Protocol id of the path so far
    current_text: str = ""
    history: list[str] = field(default_factory=list)  # the steps
    all_scores: list[float] = field(default_factory=list)  # the PRM score of each step
    completed: bool = False
    truncated: bool = False
    pruned: bool = False
    answer: str | None = None
    candidates: list[Beam] = field(default_factory=list)  # DVTS: the last expansion


@dataclass
class OracleResult:
    answer: str | None
    completions: list[Beam]


def aggregate_scores(scores: list[float], agg: str) -> float:
    """search-and-learn's ``aggregate_scores`` (float64; ``agg``: last | min | prod | mean).

    The oracle's own on purpose: it is what the forest's aggregation (``Forest.path_scores``)
    is checked against. Written step by step in path order like the forest's running
    aggregates (numpy's pairwise sum could round a mean differently). ``scores`` non-empty."""
    if agg == "last":
        return scores[-1]
    if agg == "min":
        return min(scores)
    if agg == "prod":
        value = 1.0
        for s in scores:
            value *= s
        return value
    total = 0.0
    for s in scores:
        total += s
    return total / len(scores)


class _Models:
    """The Protocol calls: a policy and a PRM behind search-and-learn-like helpers."""

    def __init__(self, policy, prm, config):
        self.policy, self.prm, self.config = policy, prm, config
        seed = config.sampling.seed if config.sampling.seed is not None else config.seed
        self.params = replace(config.sampling, seed=seed)
        self.ids = itertools.count()

    def start(self, problem: str, count: int) -> list[int]:
        roots = [next(self.ids) for _ in range(count)]
        self.policy.start(roots, [problem] * count)
        self.prm.start(roots, [problem] * count)
        return roots

    def generate_k_steps(self, beams: list[Beam], k: int, lookahead: int) -> list[list[Beam]]:
        """Each beam's ``k`` sampled next steps (+ greedy lookahead), scored: new Beams."""
        parents = [b.node for b in beams for _ in range(k)]
        children = [next(self.ids) for _ in parents]
        steps = self.policy.sample_steps(parents, children, self.params)
        out = []
        for i, (parent, child, step) in enumerate(zip(parents, children, steps)):
            src = beams[i // k]  # a copy of the beam, minus DVTS's record of its candidates
            beam = replace(src, history=list(src.history), all_scores=list(src.all_scores), candidates=[])
            beam.node = child
            beam.current_text += step.text
            beam.history.append(step.text)
            ended = step.eos or not step.tokens or extract_answer(step.text) is not None
            cut = step.truncated or (len(beam.history) >= self.config.max_steps and not ended)
            beam.completed = ended or (self.config.compat_search_and_learn and cut)
            beam.truncated = cut
            out.append(beam)
        la = None
        if lookahead > 0:
            la = [[] for _ in out]
            open_ = [j for j, b in enumerate(out) if not b.completed]
            if open_:
                rolled = self.policy.rollout([out[j].node for j in open_], lookahead, replace(self.params, temperature=0.0))
                for j, r in zip(open_, rolled):
                    la[j] = [s.text for s in r]
        scores = self.prm.score_steps(parents, children, [s.text for s in steps], la)
        for beam, score in zip(out, scores):
            beam.all_scores.append(float(score))
            if beam.completed:
                beam.answer = extract_answer(beam.current_text)
        return [out[j * k : (j + 1) * k] for j in range(len(beams))]

    def run_to_end(self, beams: list[Beam]) -> list[Beam]:
        """The last iteration: every open beam takes steps until it ends or hits max_steps."""
        beams = list(beams)
        while True:
            open_ = [j for j, b in enumerate(beams) if not b.completed and len(b.history) < self.config.max_steps]
            if not open_:
                return beams
            nxt = self.generate_k_steps([beams[j] for j in open_], 1, 0)
            for j, (b,) in zip(open_, nxt):
                beams[j] = b


def _vote(beams: list[Beam], how: str, agg: str) -> str | None:
    """search-and-learn's final answer over distinct beams; beams without an answer abstain."""
    distinct = list({id(b): b for b in beams}.values())
    voters = [b for b in distinct if b.answer is not None]
    if not voters:
        return None
    keys = [normalize_answer(b.answer) for b in voters]
    scores = [aggregate_scores(b.all_scores, agg) for b in voters]
    if how == "majority":  # Counter keeps first-seen order among equal counts
        winner = Counter(keys).most_common(1)[0][0]
        return voters[keys.index(winner)].answer
    if how == "best":
        j = min(range(len(voters)), key=lambda i: (-scores[i], voters[i].node))
        return voters[j].answer
    sums = defaultdict(float)
    for key, s in zip(keys, scores):
        sums[key] += s
    winner = max(sums, key=sums.get)  # first seen wins a tie
    group = [i for i, key in enumerate(keys) if key == winner]
    return voters[min(group, key=lambda i: (-scores[i], voters[i].node))].answer


def _final_vote(config) -> tuple[str, str]:
    return config.vote or "weighted", "last" if config.compat_search_and_learn else config.agg


def _beam_search_one(problem: str, models: _Models, config) -> OracleResult:
    n, m = config.n, config.beam_width
    (root,) = models.start(problem, 1)
    active = [Beam(prompt=problem, index=i, node=root) for i in range(n)]
    completed: list[Beam] = []
    leftover: list[Beam] = []
    for i in range(config.num_iterations):
        if i > 0:
            active = [b for b in active if not b.pruned]
            if len(active) != n:  # copies of each kept beam, adjacent
                k = len(active)
                active = [copy.deepcopy(b) for j, b in enumerate(active) for _ in range(n // k + (j < n % k))]
        last = i == config.num_iterations - 1
        active = [c[0] for c in models.generate_k_steps(active, 1, 0 if last else config.lookahead)]
        if last:
            active = models.run_to_end(active)
        completed += [b for b in active if b.completed]
        active = [b for b in active if not b.completed]
        if last:
            leftover = active
            break
        if not active:
            break
        if not config.sort_completed and len(completed) >= n:
            break
        if config.filter_duplicates:
            unique = {}
            for j, b in enumerate(active):
                unique.setdefault(b.current_text, j)
            active = [active[j] for j in unique.values()]
        agg_scores = [aggregate_scores(b.all_scores, config.agg) for b in active]
        top = sorted(range(len(active)), key=lambda j: (-agg_scores[j], j))[: n // m]
        for j, b in enumerate(active):
            if j not in top:
                b.pruned = True
    pool = completed or leftover
    if config.sort_completed:
        pool = sorted(pool, key=lambda b: aggregate_scores(b.all_scores, config.agg), reverse=True)
    pool = pool[:n]
    if pool and len(pool) != n:
        pool = (pool * (n // len(pool) + 1))[:n]
    return OracleResult(_vote(pool, *_final_vote(config)), pool)


def _dvts_one(problem: str, models: _Models, config) -> OracleResult:
    m = config.beam_width
    roots = models.start(problem, config.n // m)
    beams = [Beam(prompt=problem, index=i, node=r) for i, r in enumerate(roots)]
    for i in range(config.num_iterations):
        gen_beams = [b for b in beams if not b.pruned]
        if not gen_beams:
            break
        last = i == config.num_iterations - 1
        expansions = models.generate_k_steps(gen_beams, m, 0 if last else config.lookahead)
        if last:
            flat = models.run_to_end([c for cands in expansions for c in cands])
            expansions = [flat[j * m : (j + 1) * m] for j in range(len(gen_beams))]
        for beam, cands in zip(gen_beams, expansions):
            agg_scores = [aggregate_scores(c.all_scores, config.agg) for c in cands]
            # np.argmax: the first best. Ties go to the lower node id, which is the first
            # candidate, except in the last iteration: there the one that ended first.
            best = cands[min(range(m), key=lambda j: (-agg_scores[j], cands[j].node))]
            beam.node, beam.current_text = best.node, best.current_text
            beam.history, beam.all_scores = best.history, best.all_scores
            beam.completed, beam.truncated, beam.answer = best.completed, best.truncated, best.answer
            beam.candidates = cands
            if best.completed or last:
                beam.pruned = True
    if config.compat_search_and_learn:
        out = [c for b in beams for c in b.candidates]
    else:
        out = beams
    return OracleResult(_vote(out, *_final_vote(config)), out)


def beam_search(problems, policy, prm, config) -> list[OracleResult]:
    """search-and-learn's ``_beam_search``, one problem at a time (its batch size 1)."""
    models = _Models(policy, prm, config)
    return [_beam_search_one(p, models, config) for p in problems]


def dvts(problems, policy, prm, config) -> list[OracleResult]:
    """search-and-learn's ``_dvts``, one problem at a time."""
    models = _Models(policy, prm, config)
    return [_dvts_one(p, models, config) for p in problems]
