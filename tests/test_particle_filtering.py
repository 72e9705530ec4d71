"""Particle filtering on the engine: equal to the per-problem oracle (``ponder.baselines.oracle_pf``)
on scripted models for both resampling schemes, the three weightings, several ESS thresholds and
both handlings of finished particles; the defaults are its_hub's; resampled particles fork their
parent's KV sequence on tiny HF models; config validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ponder import SamplingParams, SearchConfig, search
from ponder._core import FINISHED
from ponder.baselines import oracle_pf as oracle
from ponder.methods.particle_filtering import ess, resample_seed
from ponder.testing.scripted import PROBLEMS, ScriptedPolicy, ScriptedPRM
from ponder.testing.scripted import assert_matches_oracle as _assert_matches_oracle
from ponder.testing.scripted import scripted_config as _config

GRID = list(itertools.product(["multinomial", "systematic"], ["logit", "softmax", "raw"], [0.0, 0.5, 1.0],
                               ["resample", "keep"]))


@pytest.mark.parametrize("scheme,weights,threshold,finished", GRID)
def test_engine_equals_oracle(scheme, weights, threshold, finished):
    runs = resampled = dropped = 0
    for (n, agg), seed, levels in itertools.product([(4, "last"), (6, "min"), (8, "prod"), (3, "mean")], range(2), (None, 3)):
        cfg = _config(method="particle_filtering", n=n, agg=agg, seed=seed, pf_resampling=scheme, pf_weights=weights,
                      pf_ess_threshold=threshold, pf_temperature=0.1 if seed else 1.0, pf_finished=finished)
        models, oracle_models = (ScriptedPolicy(), ScriptedPRM(levels)), (ScriptedPolicy(), ScriptedPRM(levels))
        got = search(PROBLEMS, *models, cfg)
        want = oracle.particle_filtering(PROBLEMS, *oracle_models, cfg)
        _assert_matches_oracle(got, want, agg, models, oracle_models)
        for r in got:
            assert len(r.completions) <= n
            parents = r.tree["parent"][r.tree["depth"] >= 2].tolist()
            resampled += len(parents) != len(set(parents))  # a particle drawn twice: two children
            done = r.tree["node_id"][r.tree["status"] == FINISHED].tolist()
            dropped += len(set(done) - {c.node_id for c in r.completions})  # a finished path resampled away
        runs += 1
    assert runs == 16
    if threshold == 1.0:  # resample at every step
        assert resampled > 0
        assert (dropped > 0) == (finished == "resample")  # "keep" never drops a finished path
    elif threshold == 0.0:  # never resample: every particle has at most one child below the first level
        assert resampled == 0 and dropped == 0


def test_defaults_are_its_hubs():
    """its_hub's ParticleFiltering: weights softmax(logit(r)) of the last step's reward, multinomial
    resampling of all particles (finished ones too) at every step, the argmax particle's answer."""
    d = SearchConfig(method="particle_filtering")
    assert (d.pf_weights, d.pf_temperature, d.pf_resampling, d.pf_ess_threshold, d.pf_finished, d.agg, d.vote) == \
        ("logit", 1.0, "multinomial", 1.0, "resample", "last", None)
    for seed in range(3):
        cfg = _config(method="particle_filtering", n=8, seed=seed)
        for r in search(PROBLEMS, ScriptedPolicy(), ScriptedPRM(), cfg):
            answered = [c for c in r.completions if c.answer is not None]
            if not answered:
                continue
            best = max(answered, key=lambda c: (c.score, -c.node_id))  # argmax, ties to the lower id
            assert (r.answer, r.answer_node) == (best.answer, best.node_id)


def test_finished_particles_are_held_with_multiplicity():
    """pf_finished="resample": the root's N particles, then never more than N generating at a depth
    (particles holding finished paths generate nothing); each surviving completion returned once."""
    for seed in range(4):
        cfg = _config(method="particle_filtering", n=8, seed=seed, num_iterations=6, pf_temperature=0.5)
        for r in search(PROBLEMS, ScriptedPolicy(), ScriptedPRM(), cfg):
            t = r.tree
            per_depth = np.bincount(t["depth"][t["depth"] >= 1], minlength=2)
            assert per_depth[1] == 8
            assert all(k <= 8 for k in per_depth.tolist())
            assert len({c.node_id for c in r.completions}) == len(r.completions) <= 8


def test_longer_runs_equal_oracle():
    for seed, vote in itertools.product(range(3), ("weighted", "majority", "best")):
        cfg = _config(method="particle_filtering", n=8, num_iterations=7, max_steps=10, seed=seed, vote=vote,
                      agg="mean", pf_resampling="systematic", pf_ess_threshold=0.8, pf_temperature=0.05)
        models, oracle_models = (ScriptedPolicy(), ScriptedPRM()), (ScriptedPolicy(), ScriptedPRM())
        _assert_matches_oracle(search(PROBLEMS, *models, cfg), oracle.particle_filtering(PROBLEMS, *oracle_models, cfg),
                               "mean", models, oracle_models)


def test_same_seed_same_search():
    cfg = _config(method="particle_filtering", n=8, seed=5, pf_temperature=0.2, pf_resampling="systematic")
    runs = [search(PROBLEMS, ScriptedPolicy(), ScriptedPRM(), cfg) for _ in range(2)]
    for a, b in zip(*runs):
        assert a.tree["parent"].tolist() == b.tree["parent"].tolist()
        assert [c.text for c in a.completions] == [c.text for c in b.completions]
        assert a.answer == b.answer


def test_helpers():
    assert ess([1.0, 1.0, 1.0, 1.0]) == 4.0
    assert ess([1.0, 0.0, 0.0]) == 1.0
    assert ess([3.0, 1.0], [3, 1]) == 4.0  # 3 particles of weight 1 and one of 1: all equal
    assert ess([2.0, 0.0], [2, 1]) == 2.0
    assert resample_seed(3, 1) != resample_seed(3, 2) != resample_seed(4, 1)
    assert 0 <= resample_seed(-5, 0) < 2**63


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pf_temperature=0), "pf_temperature"),
        (dict(pf_temperature=-1.0), "pf_temperature"),
        (dict(pf_weights="log"), "pf_weights"),
        (dict(pf_finished="drop"), "pf_finished"),
        (dict(pf_resampling="residual"), "pf_resampling"),
        (dict(pf_ess_threshold=1.5), "pf_ess_threshold"),
        (dict(pf_ess_threshold=-0.1), "pf_ess_threshold"),
        (dict(pf_ess_threshold=None), "pf_ess_threshold"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(method="particle_filtering", **kwargs).validate()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    from ponder.testing.tiny import save_causal

    mk = tmp_path_factory.mktemp
    return {"llama": save_causal(mk("pol_llama"), "llama", "llama", boost=True), "prm": save_causal(mk("prm_ms"), "ms", "llama")}


def test_hf_resampled_particles_share_their_parents_kv(hf_models):
    """A particle drawn k times becomes k children of one node: the policy forks that node's
    KV sequence, so every prefix is computed once: the tokens run through the model are at
    most the prompt plus each node's own step, far fewer than the particles' whole paths."""
    from ponder import HFPRM, HFPolicy

    policy = HFPolicy(hf_models["llama"], kv_budget=4096, block_size=4)
    prm = HFPRM(hf_models["prm"], kv_budget=4096, block_size=4)
    cfg = _config(method="particle_filtering", n=8, num_iterations=4, max_steps=5, seed=3, pf_temperature=0.01,
                  sampling=SamplingParams(temperature=1.5, max_step_tokens=8))
    (r,) = search(["What is 2 + 3?"], policy, prm, cfg)
    t = r.tree
    parents = t["parent"][t["depth"] >= 2].tolist()
    assert len(parents) > len(set(parents)), "no particle was drawn twice"
    stats = policy.stats()
    prompt = int(t["num_tokens"][t["depth"] == 0].sum())
    steps = int(t["num_tokens"][t["depth"] >= 1].sum())
    depth_of = dict(zip(t["node_id"].tolist(), t["depth"].tolist()))
    parent_of = dict(zip(t["node_id"].tolist(), t["parent"].tolist()))
    ntok = dict(zip(t["node_id"].tolist(), t["num_tokens"].tolist()))
    leaves = [x for x in depth_of if x not in set(parent_of.values()) and depth_of[x] >= 1]

    def path_len(x):
        total = 0
        while x != -1:
            total += ntok[x]
            x = parent_of[x]
        return total

    copied = sum(path_len(x) for x in leaves)  # what copying each particle's whole path would cost
    assert stats["tokens_prefilled"] <= prompt + steps < copied
    assert stats["kv_cow_copies"] > 0
    assert policy.kv.stats()["blocks_in_use"] == 0
