"""Scripted models for the dynamic-compute tests (test_adaptive, test_strategy).

``VotePolicy``: every problem is a name in ``DISTRIBUTIONS`` (answer -> probability); a
solution is ``steps`` steps, the last one ``The answer is \\boxed{X}.`` with EOS, X drawn from
the problem's distribution with the search's own random stream (``sample_steps_seeded``), so
rounds from different roots differ. One token per character. ``VotePRM``: a step's score is
``SCORES[problem][answer]`` for a final step (0.5 for earlier steps). Both check the
protocol (no use of released nodes, no double release) and count what they did per problem.
"""

from __future__ import annotations

import random
import re
from collections import Counter

from ponder.protocols import Step

DISTRIBUTIONS = {
    "easy": {"7": 1.0},
    "split": {"1": 0.5, "2": 0.5},
    "hard": {"5": 0.3, "9": 0.7},  # gold 5: a minority the PRM recognises
}
SCORES = {
    "easy": {"7": 0.9},
    "split": {"1": 0.5, "2": 0.5},
    "hard": {"5": 0.95, "9": 0.05},
}
GOLD = {"easy": "7", "split": "1", "hard": "5"}
_BOX = re.compile(r"\\boxed\{([^}]*)\}")


class VotePolicy:
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
