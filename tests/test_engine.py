"""ponder.Engine: searches with their own methods and configs sharing one running batch.

Scripted models from ``ponder.testing.scripted`` (steps and scores are deterministic functions
of the path's content, the sibling index and the seed; ``SeededScriptedPolicy``: per-request
streams, each row uses its own search's seed), plus ``PooledPolicy`` (a fake KV pool of one
block per live node that raises ``KVCacheFull`` like a paged cache: nothing changed).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, deque

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ponder import Engine, KVCacheFull, SamplingParams
from ponder.baselines import oracle as oracle
from ponder.testing.scripted import LIMIT, PROBLEMS, ScriptedPolicy, ScriptedPRM, SeededScriptedPolicy
from ponder.testing.scripted import MIXED_SEARCHES as MIX
from ponder.testing.scripted import assert_matches_oracle as _assert_matches_oracle
from ponder.testing.scripted import result_signature as signature
from ponder.testing.scripted import scripted_config as _config
from ponder.testing.scripted import search_alone as alone


class PooledPolicy(SeededScriptedPolicy):
    """A fake paged pool without sharing: a live (unreleased) node holds one block per step of
    its path (a root one), so a search needs more blocks as it goes deeper; ``capacity``
    blocks in all."""

    kv_block_size = 1000

    def __init__(self, capacity: int, **kw):
        super().__init__(**kw)
        self.capacity = capacity
        self.live: dict[int, int] = {}  # node -> blocks
        self.full_errors = 0

    def kv_free_blocks(self):
        return self.capacity - sum(self.live.values())

    def _take(self, costs: dict[int, int]):
        if sum(costs.values()) > self.kv_free_blocks():
            self.full_errors += 1
            raise KVCacheFull(f"{sum(costs.values())} blocks wanted, {self.kv_free_blocks()} free")
        self.live.update(costs)

    def start(self, root_ids, problems):
        self._take({int(r): 1 for r in root_ids})
        return super().start(root_ids, problems)

    def sample_steps_seeded(self, parent_ids, child_ids, params, streams):
        # all or nothing, as HFPolicy: the whole call's blocks are taken before any row runs
        self._take({int(c): self.live[int(p)] + 1 for p, c in zip(parent_ids, child_ids)})
        self._inside = True
        try:
            return super().sample_steps_seeded(parent_ids, child_ids, params, streams)
        finally:
            self._inside = False

    def sample_steps(self, parent_ids, child_ids, params):
        if not getattr(self, "_inside", False):
            self._take({int(c): self.live[int(p)] + 1 for p, c in zip(parent_ids, child_ids)})
        return super().sample_steps(parent_ids, child_ids, params)

    def release(self, node_ids):
        super().release(node_ids)
        for x in node_ids:
            self.live.pop(int(x), None)

    def restore(self, node_ids, paths):
        # a node of depth d holds d + 1 blocks again, as when it was made (all or nothing)
        self._take({int(x): len(p.steps) + 1 for x, p in zip(node_ids, paths)})
        return super().restore(node_ids, paths)


class RestartPolicy(PooledPolicy):
    """PooledPolicy without ``restore``: a preempted search restarts from its root."""

    restore = None


def test_every_method_in_one_mixed_batch_matches_the_oracle_and_its_lone_run():
    policy, prm = SeededScriptedPolicy(), ScriptedPRM()
    engine = Engine(policy, prm)
    handles = [engine.submit(p, c) for p, c in MIX]
    steps = 0
    while engine.step():
        steps += 1
    assert all(h.done() for h in handles)
    # one policy call and at most one PRM call per step, shared by every live search
    assert policy.seeded_calls == engine.stats()["policy_calls"] <= steps + 1
    assert len(prm.calls) <= steps + 1
    assert engine.stats()["mean_policy_batch"] > 10  # rows of several searches per call
    for h, (p, cfg) in zip(handles, MIX):
        got = h.result()
        assert got.stopped is None
        assert signature(got) == signature(alone(p, cfg))
        if cfg.method in ("beam_search", "dvts"):
            fn = oracle.beam_search if cfg.method == "beam_search" else oracle.dvts
            _assert_matches_oracle([got], fn([p], ScriptedPolicy(), ScriptedPRM(), cfg), cfg.agg)
    # everything released: models, forest, tree
    assert policy.released == set(policy.paths)
    assert engine.tree.forest.stats()["live_nodes"] == 0 and not engine.tree.nodes


def test_a_search_alone_and_in_a_busy_mix_is_the_same():
    target = ("beta", _config(method="beam_search", n=6, beam_width=3, seed=11, lookahead=1))
    lone = Engine(SeededScriptedPolicy(), ScriptedPRM())
    want = signature(lone.submit(*target).result())
    busy = Engine(SeededScriptedPolicy(), ScriptedPRM())
    others = [busy.submit(p, dataclasses.replace(c, seed=11)) for p, c in MIX[:3]]  # same seed, other work
    busy.step()
    h = busy.submit(*target)  # joins mid-flight
    more = [busy.submit(p, c) for p, c in MIX[3:]]
    busy.run_until_done()
    assert signature(h.result()) == want
    assert all(x.done() for x in others + more)


def test_events_stream_a_search():
    engine = Engine(SeededScriptedPolicy(), ScriptedPRM())
    seen = []
    h = engine._submit("alpha", _config(method="dvts", n=4, beam_width=2, seed=3), None, (), seen.append)
    engine.run_until_done()
    kinds = [e.kind for e in seen]
    assert kinds[-1] == "end" and kinds.count("end") == 1 and "step" in kinds and "completion" in kinds
    assert seen[-1].result is h.result()
    finished = {c.node_id for c in h.result().completions if c.finished}
    assert finished <= {e.node_ids[0] for e in seen if e.kind == "completion"}
    for e in seen:
        if e.kind == "step":
            assert len(e.node_ids) == len(e.texts) == len(e.scores) and all(0 < s < 1 for s in e.scores)
    queued = []
    while not h.events.empty():
        queued.append(h.events.get())
    assert [e.kind for e in queued] == kinds


def test_limits_stop_a_search_with_what_it_has():
    cfg = _config(method="best_of_n", n=8, seed=2, max_steps=8)
    full = alone("alpha", cfg)
    engine = Engine(SeededScriptedPolicy(), ScriptedPRM())
    budget = engine.submit("alpha", dataclasses.replace(cfg, max_policy_tokens=30))
    timeout = engine.submit("beta", dataclasses.replace(cfg, max_wall_s=1e-9))
    engine.run_until_done()
    r = budget.result()
    assert r.stopped == "budget" and len(r.completions) == 8
    assert 30 <= r.budget.policy_tokens_generated < full.budget.policy_tokens_generated
    t = timeout.result()
    assert t.stopped == "timeout" and t.budget.policy_tokens_generated == 0
    assert engine.tree.forest.stats()["live_nodes"] == 0


def test_cancel_frees_at_once_and_ends_with_cancelled():
    policy = PooledPolicy(capacity=10_000)
    engine = Engine(policy, ScriptedPRM())
    a = engine.submit("alpha", _config(method="beam_search", n=4, beam_width=2, seed=1))
    b = engine.submit("beta", _config(method="dvts", n=4, beam_width=2, seed=1))
    engine.step()
    engine.step()
    before = len(policy.live)
    a.cancel()
    assert a.done() and a.result().stopped == "cancelled" and len(a.result().completions) == 4
    assert len(policy.live) < before and not any(engine.tree.nodes[x].search.problem_id == a.id for x in engine.tree.nodes)
    q = engine.submit("gamma", _config(method="majority", n=2))
    q.cancel()  # still queued
    assert q.result().stopped == "cancelled" and q.result().completions == []
    engine.run_until_done()
    assert b.result().stopped is None and not policy.live


@pytest.mark.parametrize("policy_class", [PooledPolicy, RestartPolicy], ids=["keeps_tree", "restarts"])
def test_a_request_that_cannot_fit_waits_and_preemption_keeps_results(policy_class):
    cfgs = [("alpha", _config(method="beam_search", n=8, beam_width=2, seed=s)) for s in range(4)]
    want = [signature(alone(p, c)) for p, c in cfgs]
    lone_tokens = 0
    for p, c in cfgs:
        lone = ScriptedPolicy()
        Engine(lone, ScriptedPRM()).submit(p, c).result()
        lone_tokens += lone.tokens_generated
    policy, prm = policy_class(capacity=60), ScriptedPRM()  # one search at a time fits, two do not for long
    engine = Engine(policy, prm)
    handles = [engine.submit(p, c) for p, c in cfgs]
    engine.step()
    assert engine.stats()["queued"] >= 1  # admission control held some back
    engine.run_until_done()
    st = engine.stats()
    assert [signature(h.result()) for h in handles] == want
    assert st["kv_full_errors"] == 0 and st["finished"] == 4
    assert st["preemptions"] >= 1 and st["kv_full_caught"] == policy.full_errors >= 1
    assert not policy.live
    if policy_class is PooledPolicy:  # resumed with its tree: no step was sampled twice
        assert st["resumed"] == st["preemptions"] and st["tokens_reprefilled"] > 0
        assert policy.restored and prm.restored and policy.tokens_generated == lone_tokens
    else:  # restarted from the root: the preempted searches' first tries were sampled again
        assert st["resumed"] == st["tokens_reprefilled"] == 0 and policy.tokens_generated > lone_tokens


METHOD_CFGS = [
    _config(method="beam_search", n=4, beam_width=2),
    _config(method="dvts", n=4, beam_width=2, lookahead=1),
    _config(method="majority", n=3),
    _config(method="best_of_n", n=4),
    _config(method="weighted_best_of_n", n=2),
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("submit"), st.integers(0, len(METHOD_CFGS) - 1), st.integers(0, 3), st.integers(0, 9)),
            st.tuples(st.just("step"), st.integers(1, 3)),
            st.tuples(st.just("cancel"), st.integers(0, 20)),
            # several searches at once: the pool runs out mid-search, the latest are preempted
            st.tuples(st.just("burst"), st.lists(st.integers(0, len(METHOD_CFGS) - 1), min_size=2, max_size=5),
                      st.integers(0, 9)),
        ),
        max_size=25,
    ),
    capacity=st.integers(45, 120),
    resumable=st.booleans(),
)
def test_random_submit_cancel_preempt_leaks_nothing(ops, capacity, resumable):
    policy, prm = (PooledPolicy if resumable else RestartPolicy)(capacity=capacity), ScriptedPRM()
    engine = Engine(policy, prm)
    handles, cancelled = [], set()
    for op in ops:
        if op[0] == "submit":
            cfg = dataclasses.replace(METHOD_CFGS[op[1]], seed=op[3])
            handles.append((engine.submit(PROBLEMS[op[2] % 3], cfg), PROBLEMS[op[2] % 3], cfg))
        elif op[0] == "burst":
            for j, k in enumerate(op[1]):
                cfg = dataclasses.replace(METHOD_CFGS[k], seed=op[2] + j)
                handles.append((engine.submit(PROBLEMS[j % 3], cfg), PROBLEMS[j % 3], cfg))
            engine.step()
        elif op[0] == "step":
            for _ in range(op[1]):
                engine.step()
        elif handles:
            h = handles[op[1] % len(handles)][0]
            if not h.done():
                cancelled.add(h.id)
            h.cancel()
    engine.run_until_done()
    for h, p, cfg in handles:
        r = h.result()
        if h.id in cancelled:
            assert r.stopped == "cancelled"
        else:  # preemption never changes a result
            assert signature(r) == signature(alone(p, cfg))
    assert not policy.live and policy.full_errors == engine.stats()["kv_full_caught"]
    assert policy.kv_free_blocks() == capacity and policy.released == set(policy.paths)
    st_ = engine.stats()
    assert st_["kv_full_errors"] == 0
    if resumable:  # every preempted search came back with its tree (or was cancelled while queued)
        assert st_["resumed"] <= st_["preemptions"] and (st_["resumed"] == st_["preemptions"] or cancelled)
    else:
        assert st_["resumed"] == 0 and not policy.restored
    assert engine.tree.forest.stats()["live_nodes"] == 0 and not engine.tree.nodes
    assert prm.released == set(prm.paths)
    assert engine.stats()["live"] == engine.stats()["queued"] == 0


def test_stats_and_validation():
    engine = Engine(SeededScriptedPolicy(), None)
    with pytest.raises(ValueError, match="needs a PRM"):
        engine.submit("alpha", _config(method="dvts"))
    with pytest.raises(ValueError, match="max_policy_tokens"):
        engine.submit("alpha", _config(method="majority", max_policy_tokens=0))
    h = engine.submit("alpha", _config(method="majority", n=4, sampling=SamplingParams(max_step_tokens=LIMIT)))
    st = engine.stats()
    assert (st["queued"], st["live"]) == (1, 0)
    engine.step()
    assert engine.stats()["live"] == 1 and engine.stats()["mean_policy_batch"] == 4
    r = h.result()  # steps the engine itself
    assert r.stopped is None and all(math.isnan(c.score) for c in r.completions)
    assert Counter(c.finished for c in r.completions)[True] >= 1
    assert np.all(r.tree["problem"] == h.id)


# ----------------------------------------------------------------------------- HFPolicy / HFPRM


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    from ponder.testing.tiny import save_causal

    mk = tmp_path_factory.mktemp
    return {"llama": save_causal(mk("pol_llama"), "llama", "llama", boost=True), "prm": save_causal(mk("prm_ms"), "ms", "llama")}


def _hf(hf_models, policy_tokens=4096, prm_tokens=4096):
    from ponder import HFPRM, HFPolicy

    return HFPolicy(hf_models["llama"], kv_budget=policy_tokens, block_size=4), HFPRM(hf_models["prm"], kv_budget=prm_tokens, block_size=4)


def _hf_config(method, seed, n=4):
    return _config(method=method, n=n, beam_width=2, num_iterations=3, max_steps=4, seed=seed,
                   sampling=SamplingParams(temperature=1.5, max_step_tokens=8))


HF_MIX = [("What is 2 + 3?", "beam_search", 1), ("Compute 4 * 6 - 5.", "dvts", 2), ("If x + 7 = 12, what is x?", "majority", 3),
          ("What is 9 - 4?", "best_of_n", 4), ("What is 3 * 3 + 1?", "weighted_best_of_n", 5), ("Compute 20 / 4.", "beam_search", 6)]


def rounded(r):
    """``signature`` with PRM scores to 6 decimals: the samples of a search are bit-identical
    whatever shares its batch, but the PRM's float32 forward over a batch of another shape may
    differ in the last bit (seen: 6e-8)."""
    problem, answer, stopped, comps, budget = signature(r)
    comps = [(t, steps, tuple(round(x, 6) for x in sc), repr(round(float(score), 6)), a, f, tr) for t, steps, sc, score, a, f, tr in comps]
    return problem, answer, stopped, comps, budget


def test_hf_engine_search_alone_equals_search_in_a_mix(hf_models):
    policy, prm = _hf(hf_models)
    target = ("What is 9 - 4?", _hf_config("dvts", seed=8, n=8))
    want = rounded(Engine(policy, prm).submit(*target).result())
    engine = Engine(policy, prm)
    others = [engine.submit(q, _hf_config(m, s)) for q, m, s in HF_MIX[:3]]
    engine.step()
    h = engine.submit(*target)
    others += [engine.submit(q, _hf_config(m, s)) for q, m, s in HF_MIX[3:]]
    engine.run_until_done()
    assert engine.stats()["mean_policy_batch"] > 8
    assert rounded(h.result()) == want
    assert all(o.result().stopped is None for o in others)


def test_hf_engine_small_pool_keeps_results_and_returns_every_block(hf_models):
    big = Engine(*_hf(hf_models))
    want = [rounded(big.submit(q, _hf_config(m, s)).result()) for q, m, s in HF_MIX]
    policy, prm = _hf(hf_models, policy_tokens=200, prm_tokens=4096)
    free0 = (policy.kv_free_blocks(), prm.kv_free_blocks())
    engine = Engine(policy, prm)
    handles = [engine.submit(q, _hf_config(m, s)) for q, m, s in HF_MIX]
    waited = False  # admission held a search back while others ran (forced preemption: test_engine_resume.py)
    while engine.has_work():
        engine.step()
        waited |= engine.stats()["queued"] > 0 and engine.stats()["live"] > 0
    st = engine.stats()
    assert st["kv_full_errors"] == 0 and (waited or st["preemptions"] >= 1)
    assert [rounded(h.result()) for h in handles] == want
    assert (policy.kv_free_blocks(), prm.kv_free_blocks()) == free0
    assert policy.stats()["live_nodes"] == prm.stats()["live_nodes"] == 0
    assert policy.kv.stats()["blocks_in_use"] == prm.kv.stats()["blocks_in_use"] == 0


def test_preemption_victim_frees_enough_with_the_least_lost_work_never_the_oldest():
    engine = Engine(PooledPolicy(capacity=1000), ScriptedPRM())
    for s in range(3):
        engine.submit("alpha", _config(method="beam_search", n=4, beam_width=2, seed=s))
    engine._admit()  # live, not stepped
    a, b, c = sorted(engine._live, key=lambda r: r.handle.id)
    usage = {id(a): {"policy": (10, 1)}, id(b): {"policy": (5, 1)}, id(c): {"policy": (8, 1)}}
    assert engine._victim({"policy": 4}, usage) is b  # b and c free enough; b loses less
    assert engine._victim({"policy": 7}, usage) is c  # only c frees enough (a, the oldest, is never taken)
    assert engine._victim({"policy": 10}, usage) is c  # a alone would: the newest instead
    assert engine._victim({"policy": 100}, usage) is c  # none frees enough: the newest


def test_admission_waits_for_the_learned_peak_of_its_method():
    engine = Engine(PooledPolicy(capacity=100), ScriptedPRM())
    cfg = _config(method="beam_search", n=8, beam_width=2)
    first = engine.submit("alpha", dataclasses.replace(cfg, seed=0))
    engine._admit()
    # finished beam searches peaked at 10 blocks per path: a new one projects 80, and the live
    # one's reserve (80 less what it holds) leaves less than that
    engine._per_path[("policy", "beam_search")] = deque([10.0])
    second = engine.submit("alpha", dataclasses.replace(cfg, seed=1))
    engine._admit()
    assert engine.stats()["queued"] == 1 and engine.stats()["live"] == 1
    engine._per_path.clear()  # nothing learned: the first step's need fits, it is admitted
    engine._admit()
    assert engine.stats()["queued"] == 0 and engine.stats()["live"] == 2
    engine.run_until_done()
    assert signature(first.result()) == signature(alone("alpha", dataclasses.replace(cfg, seed=0)))
    assert signature(second.result()) == signature(alone("alpha", dataclasses.replace(cfg, seed=1)))
