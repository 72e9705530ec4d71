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


@pytest.mark.parametrize("n,agg", list(itertools.product([4, 6, 3], ["last", "min", "prod", "mean"])))
def test_engine_equals_oracle(n, agg):
    for seed, temperature, levels in itertools.product(range(2), (0.1, 1.0), (None, 3)):
        cfg = _config(method="rebase", n=n, agg=agg, seed=seed, rebase_temperature=temperature)
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


def test_children_follow_softmax_of_scores():
    """Second level of the tree: each first-level node's children = the forest's proportional
    allocation of the remaining budget over the unfinished first-level nodes."""
    cfg = _config(method="rebase", n=8, num_iterations=3, max_steps=6, rebase_temperature=0.02)
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
