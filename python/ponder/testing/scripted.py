"""Scripted Policy / PRM implementations: deterministic, model-free, protocol-checking.

Tokens are characters (one token per character, ``ord``). Every model here implements the
``ponder.protocols`` Policy / PRM protocol. Determinism contracts:

* ``ScriptedPolicy``: a step is a deterministic function of (problem, path text so far, depth,
  variant), the variant being ``stable_hash("variant", params.seed, k) % variants`` for the k-th
  child of a parent within one ``sample_steps`` call (``"greedy"`` for rollouts). So the search
  engine and the oracle, which number their nodes differently, sample the same steps.
* ``ScriptedPRM``: a score is a deterministic function of (problem, scored text) in (0, 1).
* ``SeededScriptedPolicy``: ``ScriptedPolicy`` whose ``sample_steps_seeded`` samples each row
  with its own stream's seed (a sibling's index counts among the rows of its own stream).
* ``TablePolicy`` / ``TablePRM``: steps and scores read from tables.
* ``VotePolicy`` / ``VotePRM``: answers drawn from ``DISTRIBUTIONS`` with each stream's own
  ``random.Random(seed)``, scored by ``SCORES``.

Scripted models assert the protocol where they keep state: no use of a released node, no
double release (``AssertionError``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
from collections import Counter

from ponder.methods.config import SearchConfig
from ponder.protocols import SamplingParams, Step, check_restore_args

__all__ = [
    "DISTRIBUTIONS", "GOLD", "LIMIT", "MIXED_SEARCHES", "PROBLEMS", "SCORES",
    "ScriptedPRM", "ScriptedPolicy", "SeededScriptedPolicy", "TablePRM", "TablePolicy", "VotePRM", "VotePolicy",
    "assert_matches_oracle", "char_tokens", "result_signature", "scripted_config", "search_alone", "stable_hash",
]

#: the problems of the scripted runs (any string is a problem for the scripted models)
PROBLEMS = ["alpha", "beta", "gamma"]
#: ``max_step_tokens`` of the scripted runs
LIMIT = 40


def stable_hash(*parts) -> int:
    """A 64-bit hash of ``repr(parts)`` that is the same in every process (blake2b)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def char_tokens(text: str) -> list[int]:
    """One token per character: ``[ord(c) for c in text]``."""
    return [ord(c) for c in text]


def scripted_config(**kw) -> SearchConfig:
    """``SearchConfig(num_iterations=5, max_steps=8, sampling=SamplingParams(max_step_tokens=LIMIT), **kw)``
    (``kw`` overrides those defaults)."""
    base = dict(num_iterations=5, max_steps=8, sampling=SamplingParams(max_step_tokens=LIMIT))
    base.update(kw)
    return SearchConfig(**base)


# ----------------------------------------------------------------------------- hash-driven models


class ScriptedPolicy:
    """Steps from a hash of (problem, path text, variant).

    ``variant`` is the sampled variant ``stable_hash("variant", seed, index among siblings) %
    variants`` (so siblings often repeat a step: duplicates to filter) or "greedy" for
    rollouts. A step ends the path (EOS and/or a boxed answer, sometimes EOS without an answer)
    with a probability growing with depth; some steps are truncated (exactly
    ``max_step_tokens`` characters, no delimiter; a few of them hold a boxed answer).
    ``end_at``: every step at that depth ends with EOS + a boxed answer and none before it
    ends or is truncated (for counting calls). ``truncation=False``: no truncated steps.

    Records what it did: ``paths`` (id -> (problem, text, depth)), ``step_text``,
    ``step_flags`` (id -> (eos, truncated)), ``parent``, ``released``, ``prompt_tokens``,
    ``tokens_generated``, ``sample_calls`` ((parents, children) per call), ``rollout_calls``.
    """

    num_parameters = 1000

    def __init__(self, variants: int = 3, end_at: int | None = None, truncation: bool = True):
        self.variants, self.end_at, self.truncation = variants, end_at, truncation
        self.paths: dict[int, tuple[str, str, int]] = {}  # id -> (problem, text, depth)
        self.step_text: dict[int, str] = {}
        self.step_flags: dict[int, tuple[bool, bool]] = {}  # id -> (eos, truncated)
        self.parent: dict[int, int] = {}
        self.released: set[int] = set()
        self.prompt_tokens: dict[int, int] = {}
        self.tokens_generated = 0
        self.sample_calls: list[tuple[list[int], list[int]]] = []
        self.rollout_calls: list[list[int]] = []
        self.restored: list[list[int]] = []

    def start(self, root_ids, problems):
        out = []
        for r, p in zip(root_ids, problems):
            assert r not in self.paths
            self.paths[r] = (p, "", 0)
            out.append(char_tokens("Q: " + p))
            self.prompt_tokens[r] = len(out[-1])
        return out

    def make_step(self, problem: str, text: str, depth: int, variant, params: SamplingParams) -> Step:
        g = stable_hash("step", problem, text, variant)
        answer = (g >> 20) % 4
        limit = params.max_step_tokens
        if self.end_at is not None:
            if depth >= self.end_at:
                body, eos = f"Done: \\boxed{{{answer}}}", True
            else:
                body, eos = f"s{depth}.{g % 1000}\n\n", False
            return Step(char_tokens(body[:limit]), body[:limit], eos=eos, truncated=len(body) > limit)
        r = g % 100
        p_end = 10 + 15 * depth
        if r < p_end:
            kind = (g >> 8) % 4
            body, eos = [
                (f"So the answer is \\boxed{{{answer}}}.", True),
                (f"Thus \\boxed{{{answer}}}\n\n", False),
                ("I give up.", True),
                (f"The answer is $\\boxed{{ {answer}.0 }}$", True),
            ][kind]
        elif self.truncation and r < p_end + 15:
            fill = f"\\boxed{{{answer}}} " if (g >> 12) % 5 == 0 else ""
            body = (fill + "t" * limit)[:limit]
            return Step(char_tokens(body), body, eos=False, truncated=True)
        else:
            body, eos = f"s{depth}.{g % 1000}\n\n", False
        if len(body) > limit:
            return Step(char_tokens(body[:limit]), body[:limit], eos=False, truncated=True)
        return Step(char_tokens(body), body, eos=eos)

    def _path(self, node: int) -> tuple[str, str, int]:
        assert node in self.paths, f"unknown node {node}"
        assert node not in self.released, f"node {node} used after release"
        return self.paths[node]

    def sample_steps(self, parent_ids, child_ids, params):
        assert len(parent_ids) == len(child_ids)
        self.sample_calls.append((list(parent_ids), list(child_ids)))
        seen = Counter()
        out = []
        for p, c in zip(parent_ids, child_ids):
            problem, text, depth = self._path(p)
            k = seen[p]
            seen[p] += 1
            variant = stable_hash("variant", params.seed, k) % self.variants
            st = self.make_step(problem, text, depth + 1, variant, params)
            assert c not in self.paths
            self.paths[c] = (problem, text + st.text, depth + 1)
            self.step_text[c] = st.text
            self.step_flags[c] = (st.eos, st.truncated)
            self.parent[c] = p
            self.tokens_generated += len(st.tokens)
            out.append(st)
        return out

    def greedy_rollout(self, problem, text, depth, num_steps, params) -> list[Step]:
        """The steps ``rollout`` returns from a node with this (problem, text, depth)."""
        out = []
        for _ in range(num_steps):
            st = self.make_step(problem, text, depth + 1, "greedy", params)
            out.append(st)
            text, depth = text + st.text, depth + 1
            if st.eos:
                break
        return out

    def rollout(self, node_ids, num_steps, params):
        assert params.temperature == 0.0
        self.rollout_calls.append(list(node_ids))
        out = []
        for node in node_ids:
            problem, text, depth = self._path(node)
            steps = self.greedy_rollout(problem, text, depth, num_steps, params)
            self.tokens_generated += sum(len(s.tokens) for s in steps)
            out.append(steps)
        return out

    def release(self, node_ids):
        for node in node_ids:
            assert node in self.paths, f"release of unknown node {node}"
            assert node not in self.released, f"node {node} released twice"
            self.released.add(node)

    def restore(self, node_ids, paths):
        """``Resumable.restore``: hold released (or unknown) nodes again from their paths;
        returns the paths' token counts (this model keeps no cache: it would run them all).
        Records ``restored`` (the ids of each call)."""
        check_restore_args({x for x in self.paths if x not in self.released}, "policy", node_ids, paths)
        self.restored.append([int(x) for x in node_ids])
        for x, p in zip(node_ids, paths):
            self.paths[int(x)] = (p.problem, "".join(p.steps), len(p.steps))
            self.released.discard(int(x))
        return sum(len(p.tokens) for p in paths)


class SeededScriptedPolicy(ScriptedPolicy):
    """ScriptedPolicy with ``sample_steps_seeded``: row i samples with seed ``streams[i][1]``
    (a sibling's index counts among the rows of its own stream). ``seeded_calls`` counts the
    calls; ``close_streams`` does nothing (no per-stream state)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seeded_calls = 0

    def sample_steps_seeded(self, parent_ids, child_ids, params, streams):
        self.seeded_calls += 1
        out = [None] * len(child_ids)
        by_stream: dict = {}
        for i, (sid, seed) in enumerate(streams):
            by_stream.setdefault((sid, seed), []).append(i)
        for (_sid, seed), rows in by_stream.items():
            got = self.sample_steps([parent_ids[i] for i in rows], [child_ids[i] for i in rows],
                                    dataclasses.replace(params, seed=seed))
            for i, s in zip(rows, got):
                out[i] = s
        return out

    def close_streams(self, ids):
        pass


class ScriptedPRM:
    """Score = hash of (problem, scored text) in (0, 1); ``levels`` quantizes it (ties).

    The scored text is the path's text + the step + the lookahead steps' texts (if any).
    Records ``tokens_scored`` (characters), ``calls`` (the child ids of each call), ``released``.
    """

    num_parameters = 100

    def __init__(self, levels: int | None = None):
        self.levels = levels
        self.paths: dict[int, tuple[str, str]] = {}
        self.released: set[int] = set()
        self.tokens_scored = 0
        self.calls: list[list[int]] = []
        self.restored: list[list[int]] = []

    def value(self, problem: str, text: str) -> float:
        """The score of ``text`` (the whole scored path) under ``problem``."""
        u = (stable_hash("prm", problem, text) % 1_000_003 + 1) / 1_000_005
        if self.levels:
            u = (math.floor(u * self.levels) + 0.5) / self.levels
        return u

    def start(self, root_ids, problems):
        for r, p in zip(root_ids, problems):
            self.paths[r] = (p, "")

    def score_steps(self, parent_ids, child_ids, steps, lookahead=None):
        self.calls.append(list(child_ids))
        out = []
        for i, (p, c, s) in enumerate(zip(parent_ids, child_ids, steps)):
            assert p not in self.released, f"PRM node {p} used after release"
            problem, text = self.paths[p]
            self.paths[c] = (problem, text + s)
            extra = list(lookahead[i]) if lookahead is not None else []
            self.tokens_scored += len(s) + sum(len(x) for x in extra)
            out.append(self.value(problem, text + s + "".join(extra)))
        return out

    def release(self, node_ids):
        for node in node_ids:
            assert node not in self.released, f"PRM node {node} released twice"
            self.released.add(node)

    def restore(self, node_ids, paths):
        """``Resumable.restore``: hold released (or unknown) nodes again from their paths;
        returns the characters of their texts (no cache: it would run them all). Records
        ``restored`` (the ids of each call)."""
        check_restore_args({x for x in self.paths if x not in self.released}, "PRM", node_ids, paths)
        self.restored.append([int(x) for x in node_ids])
        for x, p in zip(node_ids, paths):
            self.paths[int(x)] = (p.problem, "".join(p.steps))
            self.released.discard(int(x))
        return sum(len(p.problem) + len("".join(p.steps)) for p in paths)


# ----------------------------------------------------------------------------- table-driven models


class TablePolicy:
    """Problem ``q``'s sample k (of the root) is the k-th solution of ``table[q]``: a list of
    steps (text, eos, truncated). Later steps follow the path's own solution. The prompt is the
    problem's characters; rollouts return no steps."""

    def __init__(self, table: dict[str, list[list[tuple[str, bool, bool]]]]):
        self.table = table
        self.where: dict[int, tuple[str, int, int]] = {}  # id -> (problem, solution, depth)

    def start(self, root_ids, problems):
        for r, p in zip(root_ids, problems):
            self.where[r] = (p, -1, 0)
        return [char_tokens(p) for p in problems]

    def sample_steps(self, parent_ids, child_ids, params):
        seen = Counter()
        out = []
        for p, c in zip(parent_ids, child_ids):
            problem, k, depth = self.where[p]
            if k < 0:
                k = seen[p]
                seen[p] += 1
            text, eos, truncated = self.table[problem][k][depth]
            self.where[c] = (problem, k, depth + 1)
            out.append(Step(char_tokens(text), text, eos=eos, truncated=truncated))
        return out

    def rollout(self, node_ids, num_steps, params):
        return [[] for _ in node_ids]

    def release(self, node_ids):
        pass


class TablePRM:
    """The score of a step is ``scores[step text]`` (``KeyError`` for a text not in it)."""

    def __init__(self, scores: dict[str, float]):
        self.scores = scores

    def start(self, root_ids, problems):
        pass

    def score_steps(self, parent_ids, child_ids, steps, lookahead=None):
        return [self.scores[s] for s in steps]

    def release(self, node_ids):
        pass


# ----------------------------------------------------------------------------- answer-distribution models

#: problem -> {answer: probability} of ``VotePolicy``'s final step
DISTRIBUTIONS = {
    "easy": {"7": 1.0},
    "split": {"1": 0.5, "2": 0.5},
    "hard": {"5": 0.3, "9": 0.7},  # gold 5: a minority the PRM recognises
}
#: problem -> {answer: score} of ``VotePRM`` for a final step
SCORES = {
    "easy": {"7": 0.9},
    "split": {"1": 0.5, "2": 0.5},
    "hard": {"5": 0.95, "9": 0.05},
}
#: problem -> the gold answer
GOLD = {"easy": "7", "split": "1", "hard": "5"}
_BOX = re.compile(r"\\boxed\{([^}]*)\}")


class VotePolicy:
    """Every problem is a name in ``DISTRIBUTIONS``; a solution is ``steps`` steps, the last one
    ``The answer is \\boxed{X}.`` with EOS, X drawn from the problem's distribution with the
    search's own random stream (``sample_steps_seeded``: ``random.Random(seed)`` per stream id),
    so rounds from different roots differ. One token per character. ``generated`` counts the
    generated tokens per problem. No lookahead (``rollout`` raises AssertionError)."""

    num_parameters = 10

    def __init__(self, steps: int = 1):
        self.steps = steps
        self.paths: dict[int, tuple[str, str, int]] = {}
        self.released: set[int] = set()
        self.rngs: dict[int, random.Random] = {}
        self.generated: Counter = Counter()  # problem -> tokens generated

    def start(self, root_ids, problems):
        out = []
        for r, p in zip(root_ids, problems):
            self.paths[int(r)] = (p, "", 0)
            out.append([ord(c) for c in "Q: " + p])
        return out

    def _step(self, parent: int, child: int, rng: random.Random) -> Step:
        assert parent not in self.released, f"policy node {parent} used after release"
        problem, text, depth = self.paths[parent]
        if depth + 1 >= self.steps:
            dist = DISTRIBUTIONS[problem]
            answer = rng.choices(list(dist), weights=list(dist.values()))[0]
            s, eos = f"The answer is \\boxed{{{answer}}}.", True
        else:
            s, eos = f"Step {depth + 1}: think.\n\n", False
        self.paths[int(child)] = (problem, text + s, depth + 1)
        self.generated[problem] += len(s)
        return Step(text=s, tokens=[ord(c) for c in s], eos=eos, truncated=False)

    def sample_steps(self, parent_ids, child_ids, params):
        rng = self.rngs.setdefault(-1, random.Random(params.seed))
        return [self._step(int(p), int(c), rng) for p, c in zip(parent_ids, child_ids)]

    def sample_steps_seeded(self, parent_ids, child_ids, params, streams):
        out = []
        for p, c, (sid, seed) in zip(parent_ids, child_ids, streams):
            rng = self.rngs.setdefault(int(sid), random.Random(seed))
            out.append(self._step(int(p), int(c), rng))
        return out

    def close_streams(self, ids):
        for sid in ids:
            self.rngs.pop(int(sid), None)

    def rollout(self, node_ids, num_steps, params):
        raise AssertionError("the dynamic-compute tests use no lookahead")

    def release(self, node_ids):
        for x in node_ids:
            assert int(x) not in self.released, f"policy node {x} released twice"
            self.released.add(int(x))


class VotePRM:
    """A step's score is ``SCORES[problem][answer]`` for a step with a boxed answer, 0.5 for
    any other step."""

    num_parameters = 5

    def __init__(self):
        self.paths: dict[int, tuple[str, str]] = {}
        self.released: set[int] = set()

    def start(self, root_ids, problems):
        for r, p in zip(root_ids, problems):
            self.paths[int(r)] = (p, "")

    def score_steps(self, parent_ids, child_ids, steps, lookahead=None):
        out = []
        for p, c, s in zip(parent_ids, child_ids, steps):
            assert int(p) not in self.released, f"PRM node {p} used after release"
            problem, text = self.paths[int(p)]
            self.paths[int(c)] = (problem, text + s)
            m = _BOX.search(s)
            out.append(SCORES[problem][m.group(1)] if m else 0.5)
        return out

    def release(self, node_ids):
        for x in node_ids:
            assert int(x) not in self.released, f"PRM node {x} released twice"
            self.released.add(int(x))


# ----------------------------------------------------------------------------- checks against the oracle


def _same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def assert_matches_oracle(results, expected, agg, models=None, oracle_models=None):
    """``results`` (``SearchResult`` list from ``ponder.search``) equal ``expected`` (the
    ``ponder.baselines.oracle`` results): the same completions (texts, steps, scores, answers,
    flags) and the same answer; with the scripted ``models`` and ``oracle_models`` given as
    (policy, prm) pairs, also the same sampled and scored token counts: the engine samples
    exactly the oracle's steps, no more. Raises AssertionError naming the first difference."""
    from ponder.baselines import oracle

    assert len(results) == len(expected)
    if models is not None:
        (policy, prm), (o_policy, o_prm) = models, oracle_models
        assert policy.tokens_generated == o_policy.tokens_generated
        assert prm.tokens_scored == o_prm.tokens_scored
    for res, exp in zip(results, expected):
        got = [(c.text, c.steps, c.step_scores, c.answer, c.finished, c.truncated) for c in res.completions]
        want = [(b.current_text, b.history, b.all_scores, b.answer, b.completed, b.truncated) for b in exp.completions]
        assert got == want, f"problem {res.problem!r}: completions differ"
        for c, b in zip(res.completions, exp.completions):
            assert _same_float(c.score, oracle.aggregate_scores(b.all_scores, agg))
        assert res.answer == exp.answer, f"problem {res.problem!r}: answer {res.answer!r} != {exp.answer!r}"


# ----------------------------------------------------------------------------- engine checks


def result_signature(result) -> tuple:
    """Everything of a ``SearchResult`` but node ids, the tree's ids and the wall time: equal
    signatures mean the same search outcome, whatever batch or engine produced it."""
    b = result.budget
    return (
        result.problem, result.answer, result.stopped,
        [(c.text, tuple(c.steps), tuple(c.step_scores), repr(c.score), c.answer, c.finished, c.truncated)
         for c in result.completions],
        (b.policy_tokens_generated, b.policy_tokens_prefilled, b.prm_tokens_scored),
    )


#: (problem, config) pairs: every method with its own config, for mixed-batch engine tests
MIXED_SEARCHES = [
    ("alpha", scripted_config(method="beam_search", n=4, beam_width=2, seed=1, agg="min")),
    ("beta", scripted_config(method="dvts", n=6, beam_width=3, seed=2, lookahead=1)),
    ("gamma", scripted_config(method="majority", n=5, seed=3)),
    ("alpha", scripted_config(method="best_of_n", n=3, seed=4, agg="prod")),
    ("beta", scripted_config(method="weighted_best_of_n", n=4, seed=5, agg="mean")),
    ("gamma", scripted_config(method="beam_search", n=8, beam_width=4, seed=6, num_iterations=3, lookahead=1)),
    ("delta", scripted_config(method="dvts", n=4, beam_width=2, seed=7, agg="last", num_iterations=7)),
]


def search_alone(problem: str, config: SearchConfig):
    """``ponder.search([problem], ScriptedPolicy(), ScriptedPRM(), config)[0]``: the lone run a
    search in a shared batch must equal."""
    from ponder.batch import search

    return search([problem], ScriptedPolicy(), ScriptedPRM(), config)[0]
