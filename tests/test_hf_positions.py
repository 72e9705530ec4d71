"""The models' context limit (``max_position_embeddings``): no forward runs past it. The policy
stops a step when its path reaches the limit and refuses to extend a full path, the search tree
ends such paths (finished, truncated), and the PRM refuses inputs longer than its positions.
Tiny random models (``ponder.testing.tiny``) copied with a small ``max_position_embeddings``."""

from __future__ import annotations

import json
import shutil

import pytest

import ponder
from ponder.hf.kv import PagedKVCache
from ponder.hf.policy import HFPolicy
from ponder.hf.prm.hf_prm import HFPRM
from ponder.protocols import SamplingParams
from ponder.testing.tiny import QUESTIONS

LIMIT = 48


def with_positions(src, dst, positions: int):
    """A copy of the checkpoint ``src`` whose config allows ``positions`` positions (RoPE
    models have no position table, so the weights load unchanged)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["max_position_embeddings"] = positions
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def short_policy_dir(dirs, tmp_path_factory):
    # the unboosted random LM: EOS is one token of ~360, so paths run to the context end
    return with_positions(dirs["implicit_ref"], tmp_path_factory.mktemp("short") / "policy", LIMIT)


@pytest.fixture
def positions_seen(monkeypatch):
    """The largest position id each cache's forwards ran (cache -> max position)."""
    seen: dict = {}
    prepare = PagedKVCache.prepare

    def spy(self, seq_ids, tokens):
        batch = prepare(self, seq_ids, tokens)
        seen[self] = max(seen.get(self, -1), int(batch.position_ids.max()))
        return batch

    monkeypatch.setattr(PagedKVCache, "prepare", spy)
    return seen


def test_policy_steps_stop_at_the_context_end_and_a_full_path_is_refused(short_policy_dir, positions_seen):
    policy = HFPolicy(short_policy_dir, kv_budget=4096, block_size=8)
    assert policy.max_positions == LIMIT
    (prompt,) = policy.start([0], QUESTIONS[:1])
    params = SamplingParams(temperature=1.0, max_step_tokens=16, step_delimiter="@@never@@", seed=0)
    node, length, ids = 0, len(prompt), iter(range(1, 100))
    while length < LIMIT:
        child = next(ids)
        (step,) = policy.sample_steps([node], [child], params)
        assert 1 <= len(step.tokens) <= min(16, LIMIT - length)
        assert not step.eos  # seeded: this policy and seed draw no EOS on the way
        length += len(step.tokens)
        if length == LIMIT:
            assert step.truncated  # cut by the context, not by max_step_tokens
        node = child
    assert length == LIMIT
    with pytest.raises(ValueError, match="cannot be extended"):
        policy.sample_steps([node], [999], params)
    with pytest.raises(ValueError, match="cannot be extended"):
        policy.rollout([node], 2, SamplingParams(temperature=0.0, max_step_tokens=4))
    # no forward past the limit: the path's last token (position LIMIT - 1) is still pending,
    # since the refused calls check the room before feeding it
    assert positions_seen[policy.kv] == LIMIT - 2


def test_search_ends_paths_at_the_context_end(short_policy_dir, dirs, positions_seen):
    policy = HFPolicy(short_policy_dir, kv_budget=8192, block_size=8)
    prm = HFPRM(dirs["implicit"], kv_budget=8192, block_size=8)
    assert prm.max_positions == 1024
    cfg = ponder.SearchConfig(method="beam_search", n=4, beam_width=2, num_iterations=8, max_steps=64, seed=1,
                              sampling=SamplingParams(max_step_tokens=12, step_delimiter="@@never@@"))
    (res,) = ponder.search(QUESTIONS[:1], policy, prm, cfg)
    assert res.completions
    # every path ended (the limit, not max_steps, ended the cut ones: 64 steps never fit 48 positions)
    assert all(c.finished or c.truncated for c in res.completions)
    assert sum(c.truncated for c in res.completions) > 0, "no path reached the context end: the test proves nothing"
    assert max(len(c.steps) for c in res.completions) < 64
    assert positions_seen[policy.kv] <= LIMIT - 1  # no policy forward past its positions
    assert policy.stats()["live_nodes"] == 0 and prm.stats()["live_nodes"] == 0


def test_prm_refuses_inputs_past_its_positions(dirs, tmp_path):
    prm = HFPRM(with_positions(dirs["ms"], tmp_path / "ms", 40), kv_budget=4096, block_size=8)
    assert prm.max_positions == 40
    prm.start([0], QUESTIONS[:1])
    assert prm.score_steps([0], [1], ["2 + 3 = 5."])[0] > 0.0
    with pytest.raises(ValueError, match="more than the PRM's 40 positions"):
        prm.score_steps([1], [2], ["the answer is 5 " * 20])
    with pytest.raises(ValueError, match="more than the PRM's 40 positions"):
        prm.score_paths([1], [["the answer is 5 " * 20]])
    assert prm.stats()["live_nodes"] == 2  # the refused calls kept nothing


def test_prm_fit_steps_cuts_the_new_step_to_its_positions(dirs, tmp_path):
    prm = HFPRM(with_positions(dirs["ms"], tmp_path / "ms", 40), kv_budget=4096, block_size=8)
    q = QUESTIONS[0]
    long = "the answer is 5 " * 20
    (short, full_short), (cut, full_cut) = prm.fit_steps([q, q], [["2 + 3 = 5."], ["2 + 3 = 5.", long]])
    assert short == "2 + 3 = 5." and not full_short
    assert full_cut and long.startswith(cut) and len(cut) < len(long)
    # the cut step is the longest prefix that fits: one more character does not
    fits = len(prm.encode_full(prm._node_text(q, ["2 + 3 = 5.", cut])))
    assert fits <= 40 < len(prm.encode_full(prm._node_text(q, ["2 + 3 = 5.", long[: len(cut) + 1]])))
    # and the PRM scores it
    prm.start([0], [q])
    prm.score_steps([0], [1], ["2 + 3 = 5."])
    assert 0.0 <= prm.score_steps([1], [2], [cut])[0] <= 1.0
    with pytest.raises(ValueError, match="not even an empty"):
        prm.fit_steps([q], [["x " * 60, "y"]])
    with pytest.raises(ValueError, match="questions for"):
        prm.fit_steps([q], [])


@pytest.mark.parametrize("fmt", ["ms", "implicit"])
def test_search_cuts_steps_at_the_prm_context_end(fmt, dirs, tmp_path, positions_seen):
    """A PRM with fewer positions than the policy's paths reach: the tree cuts the steps that
    would not fit the PRM and ends those paths, instead of failing (or scoring past the limit)."""
    policy = HFPolicy(dirs["implicit_ref"], kv_budget=8192, block_size=8)
    if fmt == "implicit":  # its reference is named by a path relative to the checkpoint
        shutil.copytree(dirs["implicit_ref"], tmp_path / dirs["implicit_ref"].name)
    prm = HFPRM(with_positions(dirs[fmt], tmp_path / fmt, 40), kv_budget=8192, block_size=8)
    assert policy.max_positions > 40 == prm.max_positions
    for method in ("beam_search", "best_of_n"):
        cfg = ponder.SearchConfig(method=method, n=4, beam_width=2, num_iterations=8, max_steps=64, seed=1,
                                  sampling=SamplingParams(max_step_tokens=12, step_delimiter="@@never@@"))
        (res,) = ponder.search(QUESTIONS[:1], policy, prm, cfg)
        assert res.completions and all(c.finished or c.truncated for c in res.completions)
        assert any(c.truncated for c in res.completions), "no path reached the PRM's limit: the test proves nothing"
        for c in res.completions:  # what was scored fits, and the step texts are the cut ones
            assert len(prm.encode_full(prm._node_text(QUESTIONS[0], list(c.steps)))) <= 40
    assert positions_seen[prm.kv] <= 39
    assert policy.stats()["live_nodes"] == 0 and prm.stats()["live_nodes"] == 0
