"""Best-of-N with a PRM that scores whole solutions (``PathScorer.score_paths``) gives what
step-by-step scoring gives, with every path aggregation (``agg`` last / min / prod / mean: the
forest's ``set_scores`` recomputes the aggregates once a path is scored): the same answers,
completions, step scores and path scores (to float rounding of a different batch shape), trees
and budgets; a search stopped early still gets every step of its partial solutions scored.
Tiny random Hugging Face models, fully offline (as test_search_hf)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ponder import SearchConfig, search
from ponder.batch import search_sampled
from ponder.hf.policy import HFPolicy
from ponder.hf.prm import HFPRM
from ponder.protocols import PathScorer, SamplingParams
from ponder.testing.tiny import QUESTIONS, save_causal
from ponder.testing.wrappers import StepByStep

ATOL = 2e-5  # fp32 forwards over different row / batch shapes
AGGS = ["last", "min", "prod", "mean"]
SAMPLING = SamplingParams(temperature=1.5, max_step_tokens=8)


class Counting:
    """Counts the PRM calls of each kind."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, {"score_steps": 0, "score_paths": 0}

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name in self.calls:
            def counted(*a, **k):
                self.calls[name] += 1
                return attr(*a, **k)
            return counted
        return attr


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(old, 2))
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    mk = tmp_path_factory.mktemp
    return {"policy": save_causal(mk("pol"), "llama", "llama", boost=True), "prm": save_causal(mk("prm"), "ms", "llama")}


def run(models, cfg, wrap, sampled=None):
    policy = HFPolicy(models["policy"], kv_budget=4096, block_size=4)
    inner = HFPRM(models["prm"], kv_budget=4096, block_size=4)
    prm = Counting(wrap(inner))
    if sampled:
        out = search_sampled(QUESTIONS, policy, prm, cfg, sampled)
    else:
        out = search(QUESTIONS, policy, prm, cfg)
    st = inner.stats()
    assert st["live_nodes"] == 0 and st["kv_blocks_in_use"] == 0  # nothing left held
    return out, prm.calls, st


def same(a, b):
    for x, y in zip(a, b):
        assert (x.answer, x.answer_node) == (y.answer, y.answer_node)
        assert [(c.node_id, c.text, c.answer, c.finished, c.truncated) for c in x.completions] == \
               [(c.node_id, c.text, c.answer, c.finished, c.truncated) for c in y.completions]
        for c, d in zip(x.completions, y.completions):
            assert c.step_scores == pytest.approx(d.step_scores, abs=ATOL) and not np.isnan(c.step_scores).any()
            assert c.score == pytest.approx(d.score, abs=ATOL)
        for k in x.tree:
            if k == "score":
                assert np.allclose(x.tree[k], y.tree[k], atol=ATOL, equal_nan=True)
            else:
                assert np.array_equal(x.tree[k], y.tree[k]), k
        bx, by = x.budget, y.budget
        assert (bx.policy_tokens_generated, bx.policy_tokens_prefilled, bx.prm_tokens_scored) == \
               (by.policy_tokens_generated, by.policy_tokens_prefilled, by.prm_tokens_scored)


def test_hfprm_is_a_path_scorer(models):
    assert isinstance(HFPRM(models["prm"], kv_budget=256, block_size=4), PathScorer)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("method", ["best_of_n", "weighted_best_of_n"])
def test_best_of_n_scores_each_solution_once_and_equals_step_by_step(models, method, agg):
    cfg = SearchConfig(method=method, n=4, max_steps=4, seed=5, sampling=SAMPLING, agg=agg)
    got, calls, st = run(models, cfg, lambda p: p)
    want, calls_step, st_step = run(models, cfg, StepByStep)
    same(got, want)
    assert calls["score_steps"] == 0 and calls["score_paths"] >= 1 and calls_step["score_paths"] == 0
    assert st["steps_scored"] == st_step["steps_scored"]
    # the question part is computed once per problem either way; the steps' tokens once each
    assert st["tokens_scored"] <= st_step["tokens_scored"] * 1.05


@pytest.mark.parametrize("agg", ["last", "prod"])
def test_search_sampled_defers_too(models, agg):
    cfg = SearchConfig(method="best_of_n", n=4, max_steps=3, seed=2, sampling=SAMPLING, agg=agg)
    methods = ["majority", "best_of_n", "weighted_best_of_n"]
    got, calls, _ = run(models, cfg, lambda p: p, methods)
    want, _, _ = run(models, cfg, StepByStep, methods)
    assert calls["score_steps"] == 0
    for m in methods:
        same(got[m], want[m])


@pytest.mark.parametrize("agg", AGGS)
def test_a_search_stopped_early_scores_its_partial_solutions(models, agg):
    """max_policy_tokens stops the search before its paths end: the partial paths are scored
    (with their whole path) before the vote, as step by step would have scored them."""
    cfg = SearchConfig(method="best_of_n", n=4, max_steps=8, seed=1, max_policy_tokens=12, agg=agg,
                       sampling=SamplingParams(temperature=1.5, max_step_tokens=4, step_delimiter="\u00a7"))
    got, _, _ = run(models, cfg, lambda p: p)
    want, _, _ = run(models, cfg, StepByStep)
    assert any(r.stopped == "budget" for r in got)
    same(got, want)


@pytest.mark.parametrize("agg", ["last", "prod"])
def test_searches_that_read_step_scores_stay_step_by_step(models, agg):
    """Early stopping reads step scores while the paths grow: no deferral, whatever the agg."""
    cfg = SearchConfig(method="best_of_n", n=4, max_steps=3, seed=4, sampling=SAMPLING, agg=agg, early_stop=0.9)
    _, calls, _ = run(models, cfg, lambda p: p)
    assert calls["score_paths"] == 0 and calls["score_steps"] >= 1
