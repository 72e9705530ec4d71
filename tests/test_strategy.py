"""ponder.methods.strategy and ponder.calibrate: difficulty, votes, fitting, plans, strategy.json."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ponder import SamplingParams, SearchConfig
from ponder.calibrate import collect, fresh_arith, load_records, save_records
from ponder.data import Problem
from ponder.methods import strategy
from ponder.methods.strategy import Option, StrategyTable, fit
from ponder.testing.scripted import GOLD, VotePolicy, VotePRM

BASE = SearchConfig(beam_width=2, num_iterations=2, max_steps=4, sampling=SamplingParams(max_step_tokens=64))


def test_difficulty_from_agreement_and_scores():
    assert strategy.difficulty(["7", "7"], [1.0, 1.0]) == 0.0
    assert strategy.difficulty(["7", "7"], [0.5, 0.5]) == 0.5
    assert strategy.difficulty([None, None], [0.9, 0.9]) == 1.0
    assert strategy.difficulty(["1", "2", "1", "3"], None) == 0.5  # plain agreement
    assert strategy.difficulty(["1,000", "1000"], [1.0, 1.0]) == 0.0  # one answer, written two ways
    assert strategy.difficulty([], []) == 1.0


def test_votes_follow_the_forest_rules():
    answers, scores = ["1", "2", "2", None, "1"], [0.9, 0.2, 0.3, 1.0, 0.1]
    assert strategy.vote(answers, scores, "majority") == 0  # 2 each: the first seen wins
    assert strategy.vote(answers, scores, "best") == 0  # the unanswered 1.0 abstains
    assert strategy.vote(answers, scores, "weighted") == 0  # 1.0 vs 0.5
    assert strategy.vote([None], [1.0], "weighted") == -1


def _records():
    """Scripted calibration data: 'easy' problems always right with score 0.9; 'hard' ones
    right 30% of the time but the PRM knows (0.95 vs 0.05): majority loses, the PRM votes win."""
    problems = [Problem(id=f"{k}{i}", problem=k, answer=GOLD[k]) for k in ("easy", "hard") for i in range(12)]
    return collect(problems, VotePolicy(1), VotePRM(), BASE, samples=8, tree_ns=(2, 4), beam_width=2, seed=3,
                    progress=False)


def test_a_fit_on_scripted_models_picks_what_the_script_makes_best(tmp_path):
    records = _records()
    assert all(len(r.samples) == 8 and set(r.trees) == {"beam_search", "dvts"} for r in records)
    table = fit(records, probes=(2,), bins=2, budgets=(8,))
    plan = table.plan(table.tokens_for_n(8))
    low = [r for r in records if table.bin_of(2, r.probe_difficulty(2)) == 0]
    high = [r for r in records if table.bin_of(2, r.probe_difficulty(2)) == 1]
    assert {r.id[:4] for r in low} >= {"easy"} and high and all(r.id.startswith("hard") for r in high)
    # a probe that agrees and that the PRM trusts is right here: the cheapest perfect option, stop
    assert plan.options[0].method == "stop" and table.cell(2, 0, plan.options[0])["accuracy"] == 1.0
    # on a probe the PRM doubts majority loses (the wrong answer is the common one): a PRM vote
    # or a PRM-guided search wins, at least as accurate as every majority cell of the bin
    chosen = table.cell(2, 1, plan.options[1])
    assert chosen["method"] not in ("majority", "stop")
    majority = [c["accuracy"] for c in table.cells if c["bin"] == 1 and c["method"] == "majority"]
    assert chosen["accuracy"] > max(majority)
    # the tree cells carry the beam width the records were measured with
    assert {c["beam_width"] for c in table.cells if c["method"] in ("beam_search", "dvts")} == {2}
    assert plan.tokens <= table.tokens_for_n(8) + 1e-9
    # round trip: records and table
    path = save_records(records, tmp_path / "r.jsonl")
    assert [r.to_dict() for r in load_records(path)] == [r.to_dict() for r in records]
    table.save(tmp_path / "strategy.json")
    back = StrategyTable.load(tmp_path / "strategy.json")
    assert back == table
    assert back.plan(back.tokens_for_n(8)) == plan
    assert json.loads((tmp_path / "strategy.json").read_text())["version"] == strategy.VERSION


def test_every_cell_is_the_mean_of_its_bin():
    records = _records()
    table = fit(records, probes=(1, 2), bins=3, budgets=(4,))
    for c in table.cells:
        members = [r for r in records if table.bin_of(c["probe"], r.probe_difficulty(c["probe"])) == c["bin"]]
        o = Option(c["method"], c["n"], c["beam_width"])
        got = [r.outcome(c["probe"], o) for r in members]
        assert c["count"] == len(got)
        assert c["accuracy"] == pytest.approx(sum(x[0] for x in got) / len(got))
        assert c["tokens"] == pytest.approx(sum(x[1] for x in got) / len(got))
    for k in (1, 2):
        assert sum(table.bin_fractions[k]) == pytest.approx(1.0)


@given(st.lists(st.tuples(st.floats(0, 1), st.floats(1, 100)), min_size=2, max_size=5), st.floats(1, 150))
@settings(max_examples=60, deadline=None)
def test_the_plan_is_the_best_within_budget(options, budget):
    """Exhaustive check of the knapsack on two equally likely bins."""
    cells = [{"probe": 1, "bin": b, "method": "best_of_n", "n": 2 + i, "beam_width": 0, "count": 1,
              "accuracy": acc, "tokens": tok} for b in (0, 1) for i, (acc, tok) in enumerate(options)]
    table = StrategyTable([1], {1: [0.5]}, {1: [0.5, 0.5]}, cells, {1: 1.0})
    plan = table.plan(budget)
    feasible = [
        (0.5 * a[0] + 0.5 * b[0], 0.5 * a[1] + 0.5 * b[1]) for a, b in itertools.product(options, options)
        if 0.5 * a[1] + 0.5 * b[1] <= budget
    ]
    if feasible:
        assert plan.tokens <= budget + 1e-9
        # the grid rounds each bin's cost up by less than one unit (budget / 400)
        slack = [a for a, t in feasible if t <= budget * (1 - 2 / 400)]
        assert plan.accuracy >= max(slack, default=0.0) - 1e-9
        assert plan.accuracy <= max(a for a, _ in feasible) + 1e-9
    else:
        assert plan.tokens > budget


def test_tokens_for_n_interpolates_the_reference():
    t = StrategyTable([1], {1: []}, {1: [1.0]}, [], {1: 10.0, 2: 20.0, 4: 40.0})
    assert t.tokens_for_n(2) == 20.0 and t.tokens_for_n(4) == 40.0
    assert 20.0 < t.tokens_for_n(3) < 40.0
    assert t.tokens_for_n(8) == pytest.approx(80.0)


def test_bad_files_are_refused(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not a strategy table"):
        StrategyTable.load(p)
    p.write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="version"):
        StrategyTable.load(p)


def test_fresh_calibration_problems_never_touch_the_held_out_set():
    from ponder.toy import arith

    held = {p.question for p in arith.eval_problems()}
    fresh = fresh_arith(6)
    assert len(fresh) == 30 and not held & {p.problem for p in fresh}
    assert sorted({p.level for p in fresh}) == [1, 2, 3, 4, 5]


def test_the_shipped_table_loads_and_plans_every_budget():
    assert strategy.BUILTIN_PATH.is_file(), "the built-in models ship their strategy.json"
    table = strategy.load_cached(None)
    assert table.meta.get("dataset") == "builtin:arith-fresh"
    for b in (2, 4, 8, 16):
        plan = table.plan(table.tokens_for_n(b))
        assert len(plan.options) == table.num_bins(plan.probe)
        assert plan.tokens <= table.tokens_for_n(b) + 1e-6
        assert plan.accuracy == pytest.approx(table.plans[b]["accuracy"])


def test_the_shipped_table_is_the_fit_of_the_shipped_records():
    """strategy.json is reproducible: refitting the shipped calibration records with the table's
    recorded settings gives the same cells, bins and reference tokens; the records are fresh
    problems (never the held-out set), as many as the table says."""
    from ponder.toy import arith

    table = strategy.load_cached(None)
    records = load_records(strategy.BUILTIN_PATH.with_name("strategy.records.jsonl"))
    assert len(records) == table.meta["problems"] == sum(c["problems"] for c in table.meta["chunks"])
    assert len({r.id for r in records}) == len(records)
    held = {p.question for p in arith.eval_problems()}
    fresh = {p.id: p for c in table.meta["chunks"] for p in fresh_arith(c["per_level"], c["seed"])}
    assert {r.id for r in records} == set(fresh)  # every record is a fresh problem of a listed chunk
    assert not held & {p.problem for p in fresh.values()}
    refit = fit(records, probes=table.probes, bins=table.meta["bins"], budgets=sorted(table.plans),
                beam_width=table.meta["beam_width"], agg=table.agg, meta=table.meta, prior=table.meta["prior"],
                length_bins=table.meta.get("length_bins", 1), min_gain_se=table.meta.get("min_gain_se", 0.0))
    assert refit.cells == table.cells and refit.bin_edges == table.bin_edges
    assert refit.length_edges == table.length_edges
    assert refit.reference_tokens == table.reference_tokens and refit.plans == table.plans


def test_ponder_calibrate_refits_from_records(tmp_path, capsys):
    from ponder.cli import main

    rec = save_records(_records(), tmp_path / "cal.records.jsonl")
    out = tmp_path / "strategy.json"
    assert main(["calibrate", "--from-records", str(rec), "--probes", "2", "--bins", "2", "--budgets", "4,8",
                 "--beam-width", "2", "--out", str(out)]) == 0
    table = StrategyTable.load(out)
    assert sorted(table.plans) == [4, 8] and table.meta["problems"] == 24
    assert "options per difficulty bin" in capsys.readouterr().out
    assert table == fit(load_records(rec), probes=(2,), bins=2, budgets=(4, 8), beam_width=2, meta=table.meta)


def test_auto_keeps_the_mean_budget_on_the_calibration_distribution(tmp_path):
    """The global budget: a plan fit on calibration records spends, run by the engine on
    problems of the same distribution, about its planned mean tokens (and no more than the
    budget, up to sampling noise); each row's tokens are what its tree holds."""
    from ponder import Engine

    records = _records()
    table = fit(records, probes=(2,), bins=2, budgets=(4,), beam_width=2)
    path = table.save(tmp_path / "strategy.json")
    budget = table.tokens_for_n(4)
    plan = table.plan(budget)
    cfg = dataclasses.replace(BASE, method="auto", budget_tokens=budget, strategy=str(path))
    engine = Engine(VotePolicy(1), VotePRM())
    names = [k for k in ("easy", "hard") for _ in range(12)]
    handles = [engine.submit(p, dataclasses.replace(cfg, seed=100 + i)) for i, p in enumerate(names)]
    engine.run_until_done()
    spent = []
    for h in handles:
        r = h.result()
        t = r.tree
        assert r.budget.policy_tokens_generated == int(t["num_tokens"][t["parent"] != -1].sum())
        spent.append(r.budget.policy_tokens_generated + r.budget.policy_tokens_prefilled)
    mean = sum(spent) / len(spent)
    assert plan.tokens <= budget + 1e-9
    assert mean <= 1.15 * budget, (mean, budget, plan.tokens)
    assert abs(mean - plan.tokens) <= 0.25 * plan.tokens


def test_replaying_a_plan_on_its_own_records_gives_its_figures():
    records = _records()
    table = fit(records, probes=(1, 2, 4), bins=3, budgets=(), beam_width=2)
    for b in (2, 4, 8):
        budget = table.tokens_for_n(b)
        plan = table.plan(budget)
        acc, tokens = strategy.simulate(table, records, budget)
        assert acc == pytest.approx(plan.accuracy) and tokens == pytest.approx(plan.tokens)
    smooth = fit(records, probes=(2,), bins=2, budgets=(), beam_width=2, prior=4.0)
    for c in smooth.cells:  # shrunk toward the option's accuracy over all bins, never past it
        pooled = [x for x in smooth.cells if (x["method"], x["n"]) == (c["method"], c["n"])]
        mean = sum(x["accuracy"] * x["count"] for x in pooled) / sum(x["count"] for x in pooled)
        lo, hi = sorted((c["accuracy"], mean))
        assert lo - 1e-12 <= c["planning_accuracy"] <= hi + 1e-12


def test_records_with_more_samples_add_larger_options_only_where_they_exist():
    records = _records()  # 8 samples each
    short = [dataclasses.replace(r, samples=r.samples[:4]) for r in records[::2]]
    mixed = short + records[1::2]
    table = fit(mixed, probes=(1, 2, 4), bins=2, budgets=(), beam_width=2)
    assert table.probes == [1, 2, 4] and sorted(table.reference_tokens) == [1, 2, 4]  # what every record has
    with pytest.raises(ValueError, match="no probe size"):
        fit(mixed, probes=(8,), bins=2, budgets=())
    for c in table.cells:
        b = table.bin_edges[c["probe"]]
        members = [r for r in mixed if strategy.bisect.bisect_left(b, r.probe_difficulty(c["probe"])) == c["bin"]]
        if c["method"] in strategy.SAMPLING:
            have = [r for r in members if len(r.samples) >= c["n"]]
            assert c["count"] == len(have)  # an option counts only the records that measured it
            right = [r.sampled_outcome(strategy.OPTION_VOTE[c["method"]], c["n"])[0] for r in have]
            assert c["accuracy"] == pytest.approx(sum(right) / len(right))
    assert any(c["n"] == 8 and c["method"] in strategy.SAMPLING for c in table.cells)


def test_length_groups_make_a_grid_of_bins(tmp_path):
    """length_bins > 1: the bin is (length group, difficulty bin) of the grid; every cell is the
    mean of exactly the records whose probe falls in it, and the table round-trips."""
    records = _records()
    # the scripted solutions all have one length: stretch the hard ones so the groups differ
    records = [dataclasses.replace(r, samples=[dict(x, tokens=x["tokens"] * (5 if r.id.startswith("hard") else 1))
                                               for x in r.samples]) for r in records]
    table = fit(records, probes=(2,), bins=2, budgets=(4,), beam_width=2, length_bins=2)
    assert len(table.length_edges[2]) == 1
    assert table.num_bins(2) == (len(table.bin_edges[2]) + 1) * 2
    groups = {r.id[:4]: r.probe_length(2) > table.length_edges[2][0] for r in records}
    assert groups == {"easy": False, "hard": True}
    for c in table.cells:
        members = [r for r in records if table.bin_of(2, r.probe_difficulty(2), r.probe_length(2)) == c["bin"]]
        got = [r.outcome(2, Option(c["method"], c["n"], c["beam_width"])) for r in members]
        assert c["count"] == len(got) and c["accuracy"] == pytest.approx(sum(x[0] for x in got) / len(got))
    with pytest.raises(ValueError, match="length"):
        table.bin_of(2, 0.5)
    back = StrategyTable.load(table.save(tmp_path / "s.json"))
    assert back == table
    acc, tokens = strategy.simulate(table, records, table.tokens_for_n(4))
    plan = table.plan(table.tokens_for_n(4))
    assert acc == pytest.approx(plan.accuracy) and tokens == pytest.approx(plan.tokens)


def test_version_1_tables_still_load(tmp_path):
    table = fit(_records(), probes=(2,), bins=2, budgets=(4,), beam_width=2)
    d = table.to_dict()
    d["version"] = 1
    del d["length_edges"]
    p = tmp_path / "v1.json"
    p.write_text(json.dumps(d))
    assert StrategyTable.load(p) == table


def test_pruning_keeps_only_gains_beyond_the_noise():
    """min_gain_se: a cell is pruned exactly when its paired gain over a cheaper kept cell of
    its bin is within z standard errors; the cheapest cell of a bin is never pruned, and plans
    never choose a pruned cell."""
    records = _records()
    z = 1.0
    table = fit(records, probes=(2,), bins=2, budgets=(2, 4, 8), beam_width=2, min_gain_se=z)
    assert any(c.get("pruned") for c in table.cells)
    for k, b in {(c["probe"], c["bin"]) for c in table.cells}:
        members = [r for r in records if table.bin_of(k, r.probe_difficulty(k)) == b]
        cells = sorted((c for c in table.cells if c["bin"] == b),
                       key=lambda c: (c["tokens"], strategy.OPTION_METHODS.index(c["method"]), c["n"]))
        assert not cells[0].get("pruned")
        kept = []
        for c in cells:
            o = Option(c["method"], c["n"], c["beam_width"])
            right = [r.outcome(k, o)[0] for r in members]
            beats_all = True
            for other in kept:
                diff = [float(a) - float(b_) for a, b_ in zip(right, other)]
                m = sum(diff) / len(diff)
                se = (sum((x - m) ** 2 for x in diff) / max(1, len(diff) - 1) / len(diff)) ** 0.5
                beats_all &= m > z * se
            assert bool(c.get("pruned")) == (not beats_all)
            if beats_all:
                kept.append(right)
    for b, p in table.plans.items():
        for i, o in enumerate(p["options"]):
            assert not table.cell(p["probe"], i, Option(o["method"], o["n"], o["beam_width"])).get("pruned")


def test_collect_seeds_per_problem_make_results_independent_of_the_batch():
    problems = [Problem(id=f"{k}{i}", problem=k, answer=GOLD[k]) for k in ("easy", "hard") for i in range(3)]
    seeds = [11 + 1000 * i for i in range(len(problems))]
    together = collect(problems, VotePolicy(1), VotePRM(), BASE, samples=4, tree_ns=(2,), beam_width=2,
                       progress=False, seeds=seeds)
    alone = collect(problems[3:4], VotePolicy(1), VotePRM(), BASE, samples=4, tree_ns=(2,), beam_width=2,
                    progress=False, seeds=seeds[3:4])
    assert together[3].to_dict() == alone[0].to_dict()
    with pytest.raises(ValueError, match="one per problem"):
        collect(problems, VotePolicy(1), VotePRM(), BASE, samples=4, tree_ns=(2,), seeds=seeds[:2], progress=False)


def test_ponder_calibrate_makes_the_out_folder_and_refuses_an_unwritable_one_before_any_work(tmp_path, capsys):
    from ponder.cli import main

    rec = save_records(_records(), tmp_path / "cal.records.jsonl")
    out = tmp_path / "new" / "deeper" / "strategy.json"  # folders that do not exist yet
    assert main(["calibrate", "--from-records", str(rec), "--probes", "2", "--bins", "2", "--budgets", "4",
                 "--beam-width", "2", "--out", str(out)]) == 0
    assert StrategyTable.load(out).meta["problems"] == 24
    blocker = tmp_path / "file"
    blocker.write_text("")
    capsys.readouterr()
    # a folder path through a file: refused in one line, nothing sampled (no --from-records)
    assert main(["calibrate", "--per-level", "1", "--out", str(blocker / "strategy.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ponder calibrate: cannot write --out") and len(err.strip().splitlines()) == 1
    assert main(["calibrate", "--per-level", "1", "--trees", "mcts", "--out", str(out)]) == 2
    assert "--trees takes methods of" in capsys.readouterr().err


@pytest.mark.slow
def test_ponder_calibrate_saves_each_chunk_and_resumes_to_the_same_records(tmp_path, capsys):
    """Built-in models, 5 fresh problems in chunks of 2: the records file grows per chunk; a
    run cut short (records file cut to its first chunk, the last line half written) resumes
    with --resume to exactly the records of the uninterrupted run; mismatched settings and a
    rerun without --resume are refused in one line."""
    from ponder.cli import main

    args = ["calibrate", "--per-level", "1", "--samples", "2", "--tree-n", "2", "--trees", "dvts", "--probes", "1",
            "--bins", "2", "--budgets", "2", "--chunk", "2"]
    full = tmp_path / "full" / "strategy.json"
    assert main(args + ["--out", str(full)]) == 0
    err = capsys.readouterr().err
    assert "[calibrate] 2/5 problems saved" in err and "[calibrate] 5/5 problems saved" in err
    want = (tmp_path / "full" / "strategy.records.jsonl").read_text().splitlines()
    assert len(want) == 5

    cut = tmp_path / "cut" / "strategy.json"
    cut.parent.mkdir()
    rec = cut.with_name("strategy.records.jsonl")
    rec.write_text("\n".join(want[:2]) + "\n" + want[2][:40])  # killed while writing the third
    settings = full.with_name("strategy.records.jsonl.settings.json")
    cut.with_name(settings.name).write_text(settings.read_text())
    assert main(args + ["--out", str(cut)]) == 2
    assert "exists; pass --resume" in capsys.readouterr().err
    assert main(args + ["--out", str(cut), "--resume", "--samples", "3"]) == 2
    assert "has samples=2, this one 3" in capsys.readouterr().err
    assert main(args + ["--out", str(cut), "--resume"]) == 0
    assert "resuming: 2 of 5 problems already measured" in capsys.readouterr().err
    assert sorted(rec.read_text().splitlines()) == sorted(want)
    a, b = StrategyTable.load(cut), StrategyTable.load(full)  # the same fit (meta's timings aside)
    assert (a.cells, a.bin_edges, a.plans, a.reference_tokens) == (b.cells, b.bin_edges, b.plans, b.reference_tokens)
