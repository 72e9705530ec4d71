"""Preemption that keeps the tree (``ponder.protocols.Resumable``) on tiny Hugging Face models.

A preempted search's KV state is freed in the policy and the PRM while its forest nodes, its
method's state and its random stream stay; on readmission ``HFPolicy.restore`` /
``HFPRM.restore`` rebuild its live nodes from their paths. The search must end exactly as
without preemption (same answer, steps, tokens; PRM scores up to the last float32 bit of a
forward of another batch shape), and every block must come back.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ponder import HFPRM, Engine, HFPolicy, KVCacheFull, SamplingParams
from ponder.protocols import NodePath, Resumable
from ponder.testing.scripted import result_signature as signature
from ponder.testing.scripted import scripted_config as _config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from ponder.testing.tiny import save_causal, save_implicit_prm

    mk = tmp_path_factory.mktemp
    policy = save_causal(mk("pol"), "llama", "llama", boost=True)
    return {"policy": policy, "prm": save_causal(mk("prm"), "ms", "llama"),
            "implicit": save_implicit_prm(mk("implicit"), policy)}


def _models(models, prm="prm", policy_tokens=4096, prm_tokens=4096):
    return (HFPolicy(models["policy"], kv_budget=policy_tokens, block_size=4),
            HFPRM(models[prm], kv_budget=prm_tokens, block_size=4))


def _cfg(method, seed, **kw):
    return _config(method=method, n=4, beam_width=2, num_iterations=3, max_steps=4, seed=seed,
                   sampling=SamplingParams(temperature=1.5, max_step_tokens=8), **kw)


def rounded(r):
    problem, answer, stopped, comps, budget = signature(r)
    comps = [(t, steps, tuple(round(x, 6) for x in sc), repr(round(float(score), 6)), a, f, tr)
             for t, steps, sc, score, a, f, tr in comps]
    return problem, answer, stopped, comps, budget


def _tokens(r):
    """The search's tree: every node's token count, depth and status (ids aside)."""
    return [r.tree[k].tolist() for k in ("depth", "num_tokens", "status")]


@pytest.mark.parametrize("prm_kind", ["prm", "implicit"])
@pytest.mark.parametrize("method", ["beam_search", "dvts", "best_of_n"])
def test_a_preempted_search_resumes_with_its_tree_and_the_same_result(models, prm_kind, method):
    problems = [("What is 2 + 3?", _cfg("beam_search", 1)), ("Compute 4 * 6 - 5.", _cfg(method, 2))]
    policy, prm = _models(models, prm_kind)
    want = [Engine(policy, prm).submit(q, c).result() for q, c in problems]
    free0 = (policy.kv_free_blocks(), prm.kv_free_blocks())
    assert isinstance(policy, Resumable) and isinstance(prm, Resumable)

    engine = Engine(policy, prm)
    handles = [engine.submit(q, c) for q, c in problems]
    engine.step()
    assert engine.stats()["live"] == 2
    latest = engine._live[-1]
    kept = list(latest.search.node_ids)
    engine._preempt(engine._live[-1])  # what a KVCacheFull mid-search may do
    st = engine.stats()
    assert (st["live"], st["queued"], st["preempted"]) == (1, 1, 1)
    assert latest.method is not None and latest.search.node_ids == kept  # the tree stays
    assert policy.stats()["live_nodes"] + prm.stats()["live_nodes"] > 0  # the other search's
    engine.run_until_done()
    st = engine.stats()
    assert st["resumed"] == st["preemptions"] == 1 and st["tokens_reprefilled"] > 0
    for h, w in zip(handles, want):
        r = h.result()
        assert (r.answer, [c.text for c in r.completions]) == (w.answer, [c.text for c in w.completions])
        assert _tokens(r) == _tokens(w)
        assert rounded(r) == rounded(w)
    assert (policy.kv_free_blocks(), prm.kv_free_blocks()) == free0
    assert policy.stats()["live_nodes"] == prm.stats()["live_nodes"] == 0
    assert engine.tree.forest.stats()["live_nodes"] == 0 and not engine.tree.nodes


def test_resume_reuses_surviving_prefix_blocks(models):
    """Readmitted at once, the search's blocks are still in the prefix index: only the last
    partial block of each path is run again (fewer tokens than its paths hold)."""
    policy, prm = _models(models)
    engine = Engine(policy, prm)
    handles = [engine.submit("What is 2 + 3?", _cfg("beam_search", s)) for s in (1, 2)]
    engine.step()
    engine.step()
    s = engine._live[-1].search
    engine._preempt(engine._live[-1])
    held = s.suspended[0]
    path_tokens = sum(len(p.tokens) for p in engine.tree.node_paths(s, held))
    engine._admit()
    assert s.suspended is None and engine.stats()["resumed"] == 1
    assert 0 < engine.stats()["tokens_reprefilled"] < path_tokens
    engine.run_until_done()
    assert all(h.result().stopped is None for h in handles)


def test_cancel_while_preempted_ends_with_what_it_has(models):
    """A suspended search cancelled in the queue ends with its tree's paths so far (a deferred
    best-of-N scores them, rebuilding its PRM roots first) and frees everything."""
    policy, prm = _models(models)
    free0 = (policy.kv_free_blocks(), prm.kv_free_blocks())
    engine = Engine(policy, prm)
    a = engine.submit("What is 2 + 3?", _cfg("beam_search", 1))
    b = engine.submit("What is 9 - 4?", _cfg("best_of_n", 2, agg="last"))
    engine.step()
    engine.step()
    assert engine.tree.deferred(engine._live[-1].search)
    engine._preempt(engine._live[-1])
    b.cancel()
    r = b.result()
    assert r.stopped == "cancelled" and r.completions and all(c.score == c.score for c in r.completions)
    engine.run_until_done()
    assert a.result().stopped is None
    assert (policy.kv_free_blocks(), prm.kv_free_blocks()) == free0


def test_restore_equals_the_original_state_and_validates(models):
    policy, prm = _models(models)
    policy.start([0], ["What is 2 + 3?"])
    prm.start([0], ["What is 2 + 3?"])
    (step,) = policy.sample_steps([0], [1], SamplingParams(temperature=0.0, max_step_tokens=6))
    score = prm.score_steps([0], [1], [step.text])[0]
    prompt = policy.prompt_tokens("What is 2 + 3?")
    path = NodePath("What is 2 + 3?", tuple(prompt + step.tokens), (step.text,))
    policy._ensure_logits([1])
    logits = policy._nodes[1].logits.clone()
    greedy = SamplingParams(temperature=0.0, max_step_tokens=6)
    (nxt,) = policy.rollout([1], 1, greedy)
    policy.release([1])
    prm.release([1])
    assert policy.restore([1], [path]) >= 1
    assert prm.restore([1], [path]) >= 1
    assert torch.allclose(policy._nodes[1].logits.float(), logits.float(), atol=1e-4)
    assert policy.rollout([1], 1, greedy)[0][0].tokens == nxt[0].tokens
    # the restored PRM node is what score_steps kept, and scores its next step the same way
    twin = prm._nodes[1]
    assert twin.text == prm._node_text("What is 2 + 3?", (step.text,)) and twin.tokens == prm.encode_full(twin.text)
    assert prm.score_steps([1], [2], ["x"])[0] == pytest.approx(prm.score_paths([0], [[step.text, "x"]])[0][1], abs=1e-6)
    assert score == pytest.approx(prm.score_paths([0], [[step.text]])[0][0], abs=1e-6)
    with pytest.raises(ValueError, match="already held"):
        policy.restore([1], [path])
    with pytest.raises(ValueError, match="entries"):
        prm.restore([5, 6], [path])
    with pytest.raises(TypeError, match="NodePath"):
        policy.restore([7], [list(path.tokens)])
    with pytest.raises(ValueError, match="at least one token"):
        policy.restore([7], [dataclasses.replace(path, tokens=())])


def test_restore_that_does_not_fit_holds_nothing(models):
    policy, prm = _models(models, policy_tokens=64)
    policy.start([0], ["What is 2 + 3?"])
    free = policy.kv_free_blocks()
    long = NodePath("What is 2 + 3?", tuple(policy.prompt_tokens("What is 2 + 3?")) + (5,) * 400, ("x" * 400,))
    with pytest.raises(KVCacheFull):
        policy.restore([1], [long])
    assert 1 not in policy._nodes and policy.kv_free_blocks() == free


class FlakyPRM(HFPRM):
    """HFPRM whose ``score_steps`` call number ``fail_at`` raises ``KVCacheFull`` (nothing made),
    after the policy has sampled the step: the engine must rewind the searches' streams."""

    fail_at = 2

    def score_steps(self, *a, **kw):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.fail_at:
            raise KVCacheFull("injected: the PRM pool is full")
        return super().score_steps(*a, **kw)


def test_kv_full_after_sampling_rewinds_the_streams(models):
    """A step that fails at the PRM after sampling is retried with every search's stream where
    it was before the step: the preempted search and the one retried alone both end as alone."""
    policy, prm = _models(models)
    problems = [("What is 2 + 3?", _cfg("beam_search", 1)), ("Compute 4 * 6 - 5.", _cfg("beam_search", 2))]
    want = [rounded(Engine(policy, prm).submit(q, c).result()) for q, c in problems]
    flaky = FlakyPRM(models["prm"], kv_budget=4096, block_size=4)
    engine = Engine(policy, flaky)
    handles = [engine.submit(q, c) for q, c in problems]
    engine.run_until_done()
    st = engine.stats()
    assert st["kv_full_caught"] == st["preemptions"] == st["resumed"] == 1
    assert [rounded(h.result()) for h in handles] == want


def test_openai_policy_restore_rebuilds_the_paths_it_would_send():
    from ponder.openai_policy import OpenAIPolicy

    policy = OpenAIPolicy("http://127.0.0.1:9/v1", "builtin:policy-small", api_key="test", client=object())
    (prompt,) = policy.start([0], ["Compute 1 + 2."])
    step_tokens = policy.tokenizer.encode("Step 1\n\n", add_special_tokens=False)
    paths = [NodePath("Compute 1 + 2.", tuple(prompt), ()),
             NodePath("Compute 1 + 2.", tuple(prompt + step_tokens), ("Step 1\n\n",))]
    assert policy.restore([5, 6], paths) == 0
    assert (policy._nodes[5].tokens, policy._nodes[5].text) == (policy._nodes[0].tokens, policy._nodes[0].text)
    assert policy._nodes[6].tokens == prompt + step_tokens
    assert policy._nodes[6].text == policy._nodes[0].text + "Step 1\n\n"
    with pytest.raises(ValueError, match="already held"):
        policy.restore([6], paths[1:])
    assert isinstance(policy, Resumable)


# ----------------------------------------------------------------------------- scripted: restore that fails


def _scripted_pair(fail_restores):
    from ponder.testing.scripted import ScriptedPRM, SeededScriptedPolicy

    class Policy(SeededScriptedPolicy):
        failures = fail_restores

        def restore(self, node_ids, paths):
            if self.failures:
                self.failures -= 1
                raise KVCacheFull("injected: no room to rebuild")
            return super().restore(node_ids, paths)

    return Policy(), ScriptedPRM()


def test_a_restore_that_does_not_fit_waits_then_resumes():
    from ponder.testing.scripted import search_alone

    cfgs = [("alpha", _config(method="beam_search", n=4, beam_width=2, seed=1)),
            ("beta", _config(method="dvts", n=4, beam_width=2, seed=2))]
    policy, prm = _scripted_pair(1)
    engine = Engine(policy, prm)
    handles = [engine.submit(p, c) for p, c in cfgs]
    engine.step()
    engine._preempt(engine._live[-1])
    engine.step()  # the restore fails: it waits at the head of the queue, the other goes on
    st = engine.stats()
    assert (st["live"], st["queued"], st["kv_full_caught"], st["resumed"]) == (1, 1, 1, 0)
    engine.run_until_done()
    assert engine.stats()["resumed"] == 1 and engine.stats()["kv_full_errors"] == 0
    assert [signature(h.result()) for h in handles] == [signature(search_alone(p, c)) for p, c in cfgs]
    assert policy.released == set(policy.paths) and prm.released == set(prm.paths)


def test_a_restore_that_does_not_fit_alone_fails_that_search_only():
    cfgs = [("alpha", _config(method="beam_search", n=4, beam_width=2, seed=1)),
            ("beta", _config(method="dvts", n=4, beam_width=2, seed=2))]
    policy, prm = _scripted_pair(10**6)
    engine = Engine(policy, prm)
    a, b = (engine.submit(p, c) for p, c in cfgs)
    engine.step()
    engine._preempt(engine._live[-1])
    engine.run_until_done()
    assert a.result().stopped is None
    with pytest.raises(KVCacheFull, match="injected"):
        b.result()
    st = engine.stats()
    assert st["kv_full_errors"] == 1 and st["finished"] == 1
    assert engine.tree.forest.stats()["live_nodes"] == 0 and not engine.tree.nodes
    assert policy.released == set(policy.paths) and prm.released == set(prm.paths)
