"""REBASE on the engine: equal to the per-problem oracle (``ponder.baselines.oracle_pf``) on scripted
models, its allocation rule by hand, budget never exceeded, config validation."""

from __future__ import annotations

import itertools
import math

import pytest

from ponder import SearchConfig, search
from ponder.baselines import oracle_pf as oracle
from ponder.testing.scripted import PROBLEMS, ScriptedPolicy, ScriptedPRM
from ponder.testing.scripted import assert_matches_oracle as _assert_matches_oracle
from ponder.testing.scripted import scripted_config as _config


@pytest.mark.parametrize("n,agg,allocation", list(itertools.product([4, 6, 3], ["last", "min", "prod", "mean"],
                                                                   ["ceil", "proportional"])))
def test_engine_equals_oracle(n, agg, allocation):
    for seed, temperature, levels in itertools.product(range(2), (0.1, 1.0), (None, 3)):
        cfg = _config(method="rebase", n=n, agg=agg, seed=seed, rebase_temperature=temperature,
                      rebase_allocation=allocation)
        models, oracle_models = (ScriptedPolicy(), ScriptedPRM(levels)), (ScriptedPolicy(), ScriptedPRM(levels))
        got = search(PROBLEMS, *models, cfg)
        want = oracle.rebase(PROBLEMS, *oracle_models, cfg)
        _assert_matches_oracle(got, want, agg, models, oracle_models)
        for r, w in zip(got, want):
            assert len(r.completions) == len(w.completions) <= n


def test_longer_runs_equal_oracle():
    for seed, vote in itertools.product(range(3), ("weighted", "majority", "best")):
        cfg = _config(method="rebase", n=8, num_iterations=7, max_steps=10, seed=seed, vote=vote, agg="min")
        models, oracle_models = (ScriptedPolicy(), ScriptedPRM()), (ScriptedPolicy(), ScriptedPRM())
        _assert_matches_oracle(search(PROBLEMS, *models, cfg), oracle.rebase(PROBLEMS, *oracle_models, cfg),
                               "min", models, oracle_models)


def test_defaults_are_the_released_codes():
    """thu-wyz/inference_scaling: hype-parameters/rebase.yaml softmax_temperature 0.2, the
    newest step's reward (agg last), select_softmax's ceiling rounding, weighted vote."""
    d = SearchConfig(method="rebase")
    assert (d.rebase_temperature, d.rebase_allocation, d.agg, d.final_vote) == (0.2, "ceil", "last", "weighted")


def _second_level(allocation):
    cfg = _config(method="rebase", n=8, num_iterations=3, max_steps=6, rebase_temperature=0.02,
                  rebase_allocation=allocation)
    (r,) = search(["alpha"], ScriptedPolicy(truncation=False), ScriptedPRM(), cfg)
    t = r.tree
    parent = dict(zip(t["node_id"].tolist(), t["parent"].tolist()))
    depth = dict(zip(t["node_id"].tolist(), t["depth"].tolist()))
    score = dict(zip(t["node_id"].tolist(), t["score"].tolist()))
    status = dict(zip(t["node_id"].tolist(), t["status"].tolist()))
    level1 = [x for x in parent if depth[x] == 1]
    assert len(level1) == 8
    open1 = [x for x in level1 if status[x] != 1]  # not finished
    kids = {x: sum(1 for y in parent if parent[y] == x) for x in open1}
    assert sum(kids.values()) == 8 - (len(level1) - len(open1))
    return open1, kids, score


def test_children_follow_the_ceiling_rule():
    """Default rounding: best first, each node ceil(left * w / weight left) of what the better
    ones left (float32 scores in the arrays: checked where no share is near an integer)."""
    open1, kids, score = _second_level("ceil")
    order = sorted(open1, key=lambda x: (-score[x], x))
    w = {x: math.exp((score[x] - score[order[0]]) / 0.02) for x in open1}
    left, left_w = sum(kids.values()), sum(w.values())
    for x in order:
        share = left * w[x] / left_w
        if abs(share - round(share)) > 1e-3:
            assert kids[x] == min(math.ceil(share), left), (x, share, kids)
        left -= kids[x]
        left_w -= w[x]
    assert left == 0
    assert len(set(kids.values())) > 1  # the tree is uneven: good nodes get more


def test_children_follow_softmax_of_scores():
    """rebase_allocation="proportional": second level of the tree: each first-level node's
    children = the forest's proportional allocation of the remaining budget over the
    unfinished first-level nodes."""
    open1, kids, score = _second_level("proportional")
    w = [math.exp((score[x] - max(score[y] for y in open1)) / 0.02) for x in open1]
    q = [sum(kids.values()) * v / sum(w) for v in w]
    for x, quota in zip(open1, q):
        assert abs(kids[x] - quota) < 1 + 1e-4  # float32 scores in the tree arrays
    assert len(set(kids.values())) > 1  # the tree is uneven: good nodes get more


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rebase_temperature=0), "rebase_temperature"),
        (dict(rebase_temperature=float("nan")), "rebase_temperature"),
        (dict(rebase_temperature=True), "rebase_temperature"),
        (dict(rebase_allocation="floor"), "rebase_allocation"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(method="rebase", **kwargs).validate()


def test_n_need_not_divide_by_beam_width():
    SearchConfig(method="rebase", n=6, beam_width=4).validate()
    with pytest.raises(ValueError, match="divisible"):
        SearchConfig(method="beam_search", n=6, beam_width=4).validate()


def test_ponder_run_takes_both_methods():
    """``ponder run --methods particle_filtering,rebase --n 4,6`` plans and configures them
    (``ponder.evaluation`` takes the method list from ``ponder.methods.config.METHODS``)."""
    from ponder import evaluation as evaluate

    pairs = evaluate.plan(["particle_filtering", "rebase"], [4, 6])
    assert pairs == [("particle_filtering", 4), ("particle_filtering", 6), ("rebase", 4), ("rebase", 6)]
    for method, n in pairs:
        cfg = evaluate.method_config(SearchConfig(beam_width=4, vote="majority"), method, n)
        assert (cfg.method, cfg.n, cfg.final_vote) == (method, n, "majority")
