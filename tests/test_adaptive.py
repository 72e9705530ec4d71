"""Dynamic compute in the engine: early-stopped sampling and method="auto" on scripted models
(ponder.testing.scripted), budget accounting, config validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ponder import Engine, SamplingParams, SearchConfig
from ponder.engine import METHOD_CLASSES as METHODS
from ponder.methods import adaptive, stopping
from ponder.methods.majority import Majority
from ponder.methods.strategy import StrategyTable
from ponder.testing.scripted import GOLD, VotePolicy, VotePRM

BASE = SearchConfig(n=16, beam_width=2, num_iterations=2, max_steps=4, sampling=SamplingParams(max_step_tokens=64))


def run(problems, config, steps=1):
    policy, prm = VotePolicy(steps), VotePRM()
    engine = Engine(policy, prm)
    handles = [engine.submit(p, dataclasses.replace(config, seed=i)) for i, p in enumerate(problems)]
    engine.run_until_done()
    return [h.result() for h in handles], policy


def tree_generated(result) -> int:
    t = result.tree
    return int(t["num_tokens"][t["parent"] != -1].sum())


# ----------------------------------------------------------------------------- early stopping


def test_early_stop_off_is_the_plain_state_machine():
    assert adaptive.method_class(BASE.__class__(method="majority"), METHODS) is Majority
    assert adaptive.method_class(BASE.__class__(method="majority", early_stop=0.9), METHODS) is adaptive.EarlyStopMajority


def test_unanimous_first_round_stops_at_once_and_a_split_vote_samples_all():
    cfg = dataclasses.replace(BASE, method="majority", early_stop=stopping.EarlyStop(0.95, 4))
    (easy, split), _ = run(["easy", "split"], cfg)
    assert len(easy.completions) == 4 and easy.answer == "7"
    assert easy.chosen["early_stopped"] and easy.chosen["rounds"] == 1 and easy.difficulty == 0.0
    # a 50/50 split is not settled at 0.95 before the cap, unless chance makes it look so
    votes = stopping.tally([c.answer for c in split.completions])
    if len(split.completions) < 16:
        assert stopping.should_stop(votes, 0.95)
    else:
        assert not split.chosen["early_stopped"]
    for r in (easy, split):  # every round the rule saw before the last was not settled
        answers = [c.answer for c in r.completions]
        for k in range(4, len(answers), 4):
            assert not stopping.stop_counts(answers[:k], 0.95)


def test_weighted_early_stop_uses_the_prm_and_votes_weighted():
    cfg = dataclasses.replace(BASE, method="weighted_best_of_n", early_stop=0.9)
    (hard,), _ = run(["hard"], cfg)
    answers = [c.answer for c in hard.completions]
    scores = [c.score for c in hard.completions]
    assert stopping.stop_weighted(answers, scores, 0.9) or len(answers) == 16
    assert hard.answer == "5"  # the PRM's 0.95 outweighs the majority's 0.05s
    for k in range(4, len(answers), 4):
        assert not stopping.stop_weighted(answers[:k], scores[:k], 0.9)


def test_early_stop_budget_sums_to_what_was_spent():
    cfg = dataclasses.replace(BASE, method="best_of_n", early_stop=0.95)
    results, policy = run(["easy", "split", "hard"], cfg, steps=2)
    for r, p in zip(results, ["easy", "split", "hard"]):
        assert r.budget.policy_tokens_generated == tree_generated(r) == policy.generated[p]
        assert r.budget.policy_tokens_generated == sum(len(c.text) for c in r.completions)


def test_futility_stops_a_scattered_vote_and_spares_a_forming_one(monkeypatch):
    from ponder.testing import scripted

    monkeypatch.setitem(scripted.DISTRIBUTIONS, "scatter", {str(i): 1 / 1000 for i in range(1000)})
    monkeypatch.setitem(scripted.SCORES, "scatter", {str(i): 0.5 for i in range(1000)})
    es = stopping.EarlyStop(0.95, 4, futility=0.2)
    cfg = dataclasses.replace(BASE, method="majority", early_stop=es)
    (scatter, split, easy), _ = run(["scatter", "split", "easy"], cfg)
    # 8 different answers after two rounds: the bound is about 0.11 <= 0.2
    assert scatter.chosen["stopped_by"] == "futility" and scatter.chosen["early_stopped"]
    answers = [c.answer for c in scatter.completions]
    k = len(answers)
    assert k < 16 and stopping.futile(stopping.tally(answers), k, 16 - k, 0.2)
    for j in range(4, k, 4):  # no earlier round was futile
        assert not stopping.futile(stopping.tally(answers[:j]), j, 16 - j, 0.2)
    assert easy.chosen["stopped_by"] == "settled" and len(easy.completions) == 4
    # a 50/50 split cannot settle once the counts are even and few samples are left: the
    # machine follows the rule round by round (4:4 with 8 left is futile at 0.2)
    answers = [c.answer for c in split.completions]
    k = len(answers)
    for j in range(4, k, 4):
        assert not stopping.futile(stopping.tally(answers[:j]), j, 16 - j, 0.2)
        assert not stopping.stop_counts(answers[:j], 0.95)
    if split.chosen["stopped_by"] == "futility":
        assert stopping.futile(stopping.tally(answers), k, 16 - k, 0.2)
    assert split.chosen["futility"] == 0.2
    assert not stopping.futile({"1": 3.0, "2": 1.0}, 4, 12, 0.2)  # a forming majority is kept
    # off: the same scattered problem samples all 16
    (full,), _ = run(["scatter"], dataclasses.replace(BASE, method="majority", early_stop=0.95))
    assert len(full.completions) == 16 and full.chosen["stopped_by"] is None


def test_futility_prm_gate_spares_what_the_prm_finds_plausible(monkeypatch):
    from ponder.testing import scripted

    monkeypatch.setitem(scripted.DISTRIBUTIONS, "scatter", {str(i): 1 / 1000 for i in range(1000)})
    monkeypatch.setitem(scripted.SCORES, "scatter", {str(i): 0.5 for i in range(1000)})
    monkeypatch.setitem(scripted.DISTRIBUTIONS, "hopeless", {str(i): 1 / 1000 for i in range(1000)})
    monkeypatch.setitem(scripted.SCORES, "hopeless", {str(i): 0.02 for i in range(1000)})
    gated = dataclasses.replace(BASE, method="majority", early_stop=stopping.EarlyStop(0.95, 4, 0.2, futility_score=0.1))
    (plausible, hopeless), _ = run(["scatter", "hopeless"], gated)
    # the PRM scores every scattered answer 0.5: the gate stays shut, all 16 are sampled
    assert len(plausible.completions) == 16 and plausible.chosen["stopped_by"] is None
    assert plausible.chosen["futility_score"] == 0.1
    # scored 0.02: futility stops it exactly where the ungated rule would
    answers = [c.answer for c in hopeless.completions]
    k = len(answers)
    assert hopeless.chosen["stopped_by"] == "futility" and k < 16
    assert stopping.futile(stopping.tally(answers), k, 16 - k, 0.2)
    for j in range(4, k, 4):
        assert not stopping.futile(stopping.tally(answers[:j]), j, 16 - j, 0.2)
    # majority's completions were scored for the gate; its answer is still the plain vote
    assert all(c.score == pytest.approx(0.02) for c in hopeless.completions)
    votes = stopping.tally(answers)
    assert votes[hopeless.answer] == max(votes.values())
    # the gate needs a PRM
    with pytest.raises(ValueError, match="futility_score reads the completions' PRM scores"):
        Engine(VotePolicy(1), None).submit("scatter", gated)


# ----------------------------------------------------------------------------- auto


def _table(tmp_path, easy_option, hard_option, probe=2):
    """A hand-made table: probe 2, one edge at 0.3 (easy below), a cell per option."""
    cells = []
    for b, o in ((0, easy_option), (1, hard_option)):
        cells.append({"probe": probe, "bin": b, "method": o[0], "n": o[1], "beam_width": o[2],
                      "count": 10, "accuracy": 0.9, "tokens": 10.0})
    t = StrategyTable([probe], {probe: [0.3]}, {probe: [0.5, 0.5]}, cells, {1: 10.0, 2: 20.0, 4: 40.0, 8: 80.0})
    return str(t.save(tmp_path / "strategy.json"))


@pytest.mark.parametrize("hard_option", [("weighted_best_of_n", 6, 0), ("dvts", 4, 2), ("beam_search", 4, 2), ("majority", 5, 0)])
def test_auto_follows_its_table(tmp_path, hard_option):
    path = _table(tmp_path, ("stop", 2, 0), hard_option)
    cfg = dataclasses.replace(BASE, method="auto", n=8, strategy=path)
    (easy, hard), policy = run(["easy", "hard"], cfg, steps=2)
    table = StrategyTable.load(path)
    plan = adaptive.plan_for(cfg, table)
    for r, p in ((easy, "easy"), (hard, "hard")):
        b, o = plan.option_for(table, r.difficulty)
        assert r.chosen["method"] == o.method and r.chosen["bin"] == b and r.chosen["probe"] == 2
        assert r.budget.policy_tokens_generated == tree_generated(r) == policy.generated[p]
    assert easy.difficulty == pytest.approx(1 - 0.9) and easy.chosen["method"] == "stop"
    assert len(easy.completions) == 2 and easy.answer == "7"
    m, n, w = hard_option
    assert hard.chosen["method"] == m
    if m in ("weighted_best_of_n", "majority"):
        assert len(hard.completions) == n  # the probe's 2 + n - 2 more, one vote
    elif m == "dvts":
        assert len(hard.completions) == n // w
    else:
        assert len(hard.completions) == n
    # a probe that split on "hard" (0.3 / 0.7, scores 0.95 / 0.05) lands in the hard bin
    assert hard.difficulty > 0.3 or hard.chosen["method"] == "stop"


@pytest.mark.parametrize("edge", [1.0, 1e6])
def test_auto_bins_by_the_probe_length_when_the_table_does(tmp_path, edge):
    """A table with a length split: the probe's mean generated tokens per completion picks the
    group (below ``edge``: group 0, stop; above: group 1, weighted best-of-N at 4), the
    difficulty the bin within it; the row reports the length it measured."""
    cells = []
    for b in range(4):
        o = ("stop", 2) if b < 2 else ("weighted_best_of_n", 4)
        cells.append({"probe": 2, "bin": b, "method": o[0], "n": o[1], "beam_width": 0, "count": 10,
                      "accuracy": 0.9, "tokens": 10.0})
    t = StrategyTable([2], {2: [0.3]}, {2: [0.25] * 4}, cells, {1: 10.0, 2: 20.0, 4: 40.0, 8: 80.0},
                      length_edges={2: [edge]})
    path = str(t.save(tmp_path / "strategy.json"))
    cfg = dataclasses.replace(BASE, method="auto", n=8, strategy=path)
    (easy, hard), policy = run(["easy", "hard"], cfg, steps=2)
    long = edge < 10
    for r in (easy, hard):
        assert r.chosen["method"] == ("weighted_best_of_n" if long else "stop")
        assert r.chosen["bin"] == t.bin_of(2, r.difficulty, r.chosen["probe_length"])
        assert r.chosen["bin"] // 2 == int(long)
    # stopped after the probe: its mean length is what the policy generated over its 2 solutions
    if not long:
        assert easy.chosen["probe_length"] == pytest.approx(policy.generated["easy"] / 2)
    else:
        assert len(easy.completions) == 4


def test_auto_budget_in_tokens_picks_the_plan_for_that_budget(tmp_path):
    table = StrategyTable(
        [2], {2: [0.3]}, {2: [0.5, 0.5]},
        [
            {"probe": 2, "bin": 0, "method": "stop", "n": 2, "beam_width": 0, "count": 5, "accuracy": 1.0, "tokens": 40.0},
            {"probe": 2, "bin": 1, "method": "stop", "n": 2, "beam_width": 0, "count": 5, "accuracy": 0.2, "tokens": 40.0},
            {"probe": 2, "bin": 1, "method": "best_of_n", "n": 8, "beam_width": 0, "count": 5, "accuracy": 0.9, "tokens": 160.0},
        ],
        {1: 20.0, 2: 40.0, 4: 80.0, 8: 160.0},
    )
    path = str(table.save(tmp_path / "s.json"))
    small = dataclasses.replace(BASE, method="auto", budget_tokens=50.0, strategy=path)
    big = dataclasses.replace(BASE, method="auto", budget_tokens=100.0, strategy=path)
    assert [o.method for o in adaptive.plan_for(small).options] == ["stop", "stop"]
    assert [o.method for o in adaptive.plan_for(big).options] == ["stop", "best_of_n"]
    plan = adaptive.plan_for(big)
    assert plan.tokens == pytest.approx(100.0) and plan.tokens <= 100.0 + 1e-9
    assert plan.accuracy == pytest.approx(0.5 * 1.0 + 0.5 * 0.9)
    (r,), _ = run(["hard"], big, steps=1)
    assert r.chosen["budget_tokens"] == 100.0


def test_validation_names_the_bad_field(tmp_path):
    for kw, match in (
        (dict(method="beam_search", early_stop=0.9), "early_stop applies"),
        (dict(method="majority", early_stop=0.3), "threshold"),
        (dict(method="majority", early_stop=stopping.EarlyStop(0.9, 0)), "round_size"),
        (dict(method="dvts", budget=4), "apply to method 'auto'"),
        (dict(method="auto", budget=-1), "budget must be"),
        (dict(method="auto", budget_tokens=0), "budget_tokens must be"),
    ):
        with pytest.raises(ValueError, match=match):
            SearchConfig(**kw).validate()
    with pytest.raises(FileNotFoundError, match="ponder calibrate"):
        SearchConfig(method="auto", strategy=str(tmp_path / "missing.json")).validate()
    # auto's n is a budget, not a tree width: any n is fine
    path = _table(tmp_path, ("stop", 2, 0), ("dvts", 4, 2))
    assert SearchConfig(method="auto", n=3, beam_width=4, strategy=path).validate().method == "auto"
    assert stopping.as_early_stop({"threshold": 0.8, "round_size": 2}) == stopping.EarlyStop(0.8, 2)


def test_plain_methods_report_no_difficulty():
    (r,), _ = run(["easy"], dataclasses.replace(BASE, method="majority", n=4))
    assert r.difficulty is None and r.chosen is None
    assert GOLD["easy"] == r.answer
    assert np.all(r.tree["num_tokens"][r.tree["parent"] != -1] > 0)


def test_plan_cache_never_returns_another_tables_plan(tmp_path):
    """plan_for caches per (table, budget): an entry left by a freed table whose id a new table
    reuses must not be served (the cache holds its table and checks it is the same object)."""
    cfg = dataclasses.replace(BASE, method="auto", n=8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = StrategyTable.load(_table(tmp_path / "a", ("stop", 2, 0), ("weighted_best_of_n", 6, 0)))
    b = StrategyTable.load(_table(tmp_path / "b", ("stop", 2, 0), ("beam_search", 4, 2)))
    t = round(adaptive.budget_tokens(cfg, b), 6)
    adaptive._PLANS[(id(b), t)] = (a, adaptive.plan_for(cfg, a))  # what a reused id would leave
    plan = adaptive.plan_for(cfg, b)
    assert [o.method for o in plan.options] == ["stop", "beam_search"]
    assert adaptive.plan_for(cfg, b) is plan  # and it is cached for b now


def test_search_sampled_refuses_early_stop():
    from ponder.batch import search_sampled

    cfg = dataclasses.replace(BASE, method="majority", early_stop=0.95)
    with pytest.raises(ValueError, match="call ponder.search once per method with early_stop"):
        search_sampled(["easy"], VotePolicy(1), VotePRM(), cfg, ["majority", "best_of_n"])
