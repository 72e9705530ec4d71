"""The figures of benchmarks/bench_adaptive.py that are computed, not measured: the by-level
hindsight bound (``level_oracle``) against brute force, and the early-stop replay's PRM gate."""

from __future__ import annotations

import itertools
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

from bench_adaptive import level_oracle, replay_early_stop  # noqa: E402
from ponder.methods.stopping import EarlyStop  # noqa: E402
from ponder.methods.strategy import ProblemRecord  # noqa: E402


def _rows(rng: random.Random, levels: dict[str, int], methods: int) -> list[dict]:
    rows = []
    for m in range(methods):
        by = {lv: {"problems": k, "accuracy": rng.randint(0, k) / k, "mean_policy_tokens": float(rng.randint(5, 400))}
              for lv, k in levels.items()}
        rows.append({"method": f"m{m}", "n": 1, "by_level": by})
    return rows


def test_level_oracle_is_the_best_allocation_by_level():
    rng = random.Random(0)
    for trial in range(30):
        levels = {str(i + 1): rng.randint(1, 7) for i in range(rng.randint(1, 4))}
        rows = _rows(rng, levels, rng.randint(1, 5))
        total = sum(levels.values())
        cap = rng.uniform(0, 400)
        best = None
        for combo in itertools.product(rows, repeat=len(levels)):
            t = sum(r["by_level"][lv]["problems"] * r["by_level"][lv]["mean_policy_tokens"] for r, lv in zip(combo, levels))
            c = sum(r["by_level"][lv]["problems"] * r["by_level"][lv]["accuracy"] for r, lv in zip(combo, levels))
            if t / total <= cap + 1e-9 and (best is None or c > best + 1e-9):
                best = c
        got = level_oracle(rows, cap)
        if best is None:
            assert got is None
        else:
            assert abs(got["accuracy"] - best / total) < 1e-9 and got["mean_policy_tokens"] <= cap + 1e-9
            assert set(got["choice"]) == set(levels)


def _record(answers, scores, tokens=10) -> ProblemRecord:
    samples = [{"answer": a, "correct": a == "0", "score": s, "tokens": tokens} for a, s in zip(answers, scores)]
    return ProblemRecord("p", 5, samples, {}, 1)


def test_replay_gate_keeps_sampling_what_the_prm_finds_plausible():
    answers = [str(i) for i in range(1, 17)]  # every sample a different answer
    rule = EarlyStop(0.95, 4, futility=0.2)
    stopped = replay_early_stop(_record(answers, [0.5] * 16), rule, 16, False)
    assert stopped[1] < 5 + 160  # ungated: futility stops it early
    gated = EarlyStop(0.95, 4, futility=0.2, futility_score=0.1)
    assert replay_early_stop(_record(answers, [0.5] * 16), gated, 16, False) == (False, 5 + 160)
    assert replay_early_stop(_record(answers, [0.05] * 16), gated, 16, False) == stopped
