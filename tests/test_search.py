"""ponder.search: every method over the C++ forest, checked against hand-computed cases and
against ``ponder.baselines.oracle`` (search-and-learn's beam search and DVTS, written its way).

The models are ``ponder.testing.scripted``'s Protocol implementations: a step is a
deterministic function of the path's content (problem + solution text so far), the sample's
index among the siblings of one call and the seed, so the engine and the oracle (which number
their nodes differently) see the same steps; a score is a deterministic function of the scored
text. Tokens are characters (one token per character).
"""

from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict

import numpy as np
import pytest

import ponder
from ponder import Budget, Completion, SearchConfig, SearchResult, grading, search
from ponder.baselines import oracle as oracle
from ponder.protocols import PRM, Policy, SamplingParams
from ponder.testing.scripted import LIMIT, PROBLEMS, ScriptedPolicy, ScriptedPRM, TablePolicy, TablePRM
from ponder.testing.scripted import assert_matches_oracle as _assert_matches_oracle
from ponder.testing.scripted import scripted_config as _config

ACTIVE, FINISHED, PRUNED = ponder.ACTIVE, ponder.FINISHED, ponder.PRUNED


# ----------------------------------------------------------------------------- engine == oracle

GRID = list(
    itertools.product(
        [(4, 2), (8, 2), (6, 3), (4, 4), (3, 1)],  # (n, beam_width)
        ["last", "min", "prod", "mean"],
    )
)


@pytest.mark.parametrize("method", ["beam_search", "dvts"])
@pytest.mark.parametrize("nm,agg", GRID)
def test_engine_selects_what_the_oracle_selects(method, nm, agg):
    n, m = nm
    runs = 0
    for seed in range(4):
        # Vary the remaining knobs with the seed so that every combination meets each of them.
        filter_duplicates = seed % 2 == 0
        sort_completed = seed in (0, 3)
        lookahead = 1 if seed == 2 else 0
        compat = seed == 3
        # seed 1: no steps beyond the iterations, so paths are often cut at max_steps
        limits = dict(num_iterations=3, max_steps=3) if seed == 1 else {}
        for levels in (None, 3):  # 3 score levels: many ties
            cfg = _config(
                method=method, n=n, beam_width=m, agg=agg, seed=seed, lookahead=lookahead,
                filter_duplicates=filter_duplicates, sort_completed=sort_completed,
                compat_search_and_learn=compat, **limits,
            )
            models = ScriptedPolicy(), ScriptedPRM(levels)
            got = search(PROBLEMS, *models, cfg)
            fn = oracle.beam_search if method == "beam_search" else oracle.dvts
            oracle_models = ScriptedPolicy(), ScriptedPRM(levels)
            want = fn(PROBLEMS, *oracle_models, cfg)
            _assert_matches_oracle(got, want, agg, models, oracle_models)
            runs += 1
    assert runs == 8


@pytest.mark.parametrize("method", ["beam_search", "dvts"])
def test_engine_matches_oracle_with_more_iterations_and_lookahead(method):
    for seed, lookahead, compat in itertools.product(range(3), (0, 2), (False, True)):
        cfg = _config(method=method, n=8, beam_width=4, num_iterations=7, max_steps=10,
                      lookahead=lookahead, seed=seed, agg="min", compat_search_and_learn=compat)
        models, oracle_models = (ScriptedPolicy(), ScriptedPRM()), (ScriptedPolicy(), ScriptedPRM())
        got = search(PROBLEMS, *models, cfg)
        fn = oracle.beam_search if method == "beam_search" else oracle.dvts
        _assert_matches_oracle(got, fn(PROBLEMS, *oracle_models, cfg), "min", models, oracle_models)


# ----------------------------------------------------------------------------- counts and order


@pytest.mark.parametrize("compat", [False, True])
def test_completion_counts(compat):
    for seed in range(3):
        for method in ("beam_search", "majority", "best_of_n", "weighted_best_of_n"):
            cfg = _config(method=method, n=8, beam_width=2, seed=seed, compat_search_and_learn=compat)
            for res in search(PROBLEMS, ScriptedPolicy(), ScriptedPRM(), cfg):
                assert len(res.completions) == 8
        cfg = _config(method="dvts", n=8, beam_width=2, seed=seed, compat_search_and_learn=compat)
        for res in search(PROBLEMS, ScriptedPolicy(), ScriptedPRM(), cfg):
            # compat: the M candidates of each of the N/M subtrees; else each subtree's final path
            assert len(res.completions) == (8 if compat else 4)
            if not compat:
                subtrees = res.tree["subtree"][np.isin(res.tree["node_id"], [c.node_id for c in res.completions])]
                assert sorted(subtrees.tolist()) == [0, 1, 2, 3]


def test_sort_completed_orders_by_score():
    unsorted_seen = False
    for seed in range(6):
        for sort_completed in (True, False):
            cfg = _config(n=8, beam_width=2, seed=seed, agg="mean", sort_completed=sort_completed)
            for res in search(PROBLEMS, ScriptedPolicy(), ScriptedPRM(), cfg):
                scores = [c.score for c in res.completions]
                distinct = list(dict.fromkeys(c.node_id for c in res.completions))
                if sort_completed:
                    # best first; padding (when fewer finished) repeats them in that order
                    head = scores[: len(distinct)]
                    assert all(a >= b for a, b in zip(head, head[1:]))
                    assert [c.node_id for c in res.completions] == (distinct * 8)[:8]
                elif any(a < b for a, b in zip(scores, scores[1:])):
                    unsorted_seen = True
    assert unsorted_seen, "sort_completed=False never changed the order: the test is not testing it"


def test_filter_duplicates_removes_duplicate_steps():
    dup_kept = False
    for seed in range(6):
        for flag in (True, False):
            policy = ScriptedPolicy(variants=2)  # 2 variants: siblings repeat each other often
            cfg = _config(n=8, beam_width=2, num_iterations=6, seed=seed, filter_duplicates=flag)
            for res in search(PROBLEMS, policy, ScriptedPRM(), cfg):
                tree = res.tree
                parents = set(tree["parent"].tolist())
                depth = dict(zip(tree["node_id"].tolist(), tree["depth"].tolist()))
                # beams kept by a selection: expanded nodes at depths 1 .. num_iterations - 1
                kept = [x for x in parents if x in depth and 1 <= depth[x] < cfg.num_iterations]
                by_parent = defaultdict(list)
                for x in kept:
                    by_parent[policy.parent[x]].append(policy.step_text[x])
                has_dup = any(len(v) != len(set(v)) for v in by_parent.values())
                if flag:
                    assert not has_dup
                dup_kept |= has_dup
    assert dup_kept, "without filter_duplicates some duplicate steps should survive"


# ----------------------------------------------------------------------------- lookahead


@pytest.mark.parametrize("method", ["beam_search", "dvts"])
def test_lookahead_scores_the_rollout_and_keeps_only_the_step(method):
    lookahead = 2
    for seed in range(3):
        policy, prm = ScriptedPolicy(), ScriptedPRM()
        cfg = _config(method=method, n=4, beam_width=2, seed=seed, lookahead=lookahead)
        results = search(PROBLEMS, policy, prm, cfg)
        assert policy.rollout_calls, "lookahead must roll out"
        assert len(policy.rollout_calls) <= cfg.num_iterations - 1  # never in the last iteration
        params = SamplingParams(max_step_tokens=LIMIT, seed=seed, temperature=0.0)
        for res in results:
            for c in res.completions:
                # the kept path is exactly what the policy sampled: no lookahead text in it
                assert policy.paths[c.node_id][1] == c.text == "".join(c.steps)
                ids = res.tree["node_id"].tolist()
                num_tokens = dict(zip(ids, res.tree["num_tokens"].tolist()))
                node, path = c.node_id, []
                while node in policy.parent:
                    path.append(node)
                    node = policy.parent[node]
                path.reverse()
                assert [num_tokens[x] for x in path] == [len(s) for s in c.steps]
                text = ""
                for d, (x, step, score) in enumerate(zip(path, c.steps, c.step_scores), start=1):
                    ended = policy.step_flags[x][0] or grading.extract_answer(step) is not None
                    extra = ""
                    if d < cfg.num_iterations and not ended:  # sampled in a lookahead iteration
                        extra = "".join(s.text for s in policy.greedy_rollout(res.problem, text + step, d, lookahead, params))
                    assert score == prm.value(res.problem, text + step + extra)
                    text += step
        # and the scores do change: the same run without lookahead scores differently
        plain = search(PROBLEMS, ScriptedPolicy(), ScriptedPRM(), _config(method=method, n=4, beam_width=2, seed=seed))
        first = lambda rs: [c.step_scores[:1] for r in rs for c in r.completions]
        assert first(plain) != first(results)


# ----------------------------------------------------------------------------- batching, budget, release


@pytest.mark.parametrize("method", ["beam_search", "dvts", "majority", "best_of_n"])
def test_all_problems_advance_together(method):
    end_at = 4
    policy, prm = ScriptedPolicy(end_at=end_at), ScriptedPRM()
    cfg = _config(method=method, n=4, beam_width=2, num_iterations=end_at, max_steps=end_at + 3)
    results = search(PROBLEMS, policy, prm, cfg)
    # no path ends before depth end_at and all end there: one policy call per iteration
    assert len(policy.sample_calls) == end_at
    assert len(prm.calls) == (0 if method == "majority" else end_at)
    owner = {}
    for res in results:
        for x in res.tree["node_id"].tolist():
            owner[x] = res.problem_id
    for parents, children in policy.sample_calls:
        assert {owner[x] for x in children} == {0, 1, 2}  # every call advances every problem
    for res in results:
        assert all(c.finished and c.answer is not None for c in res.completions)


@pytest.mark.parametrize("method", ["beam_search", "dvts", "best_of_n"])
def test_batch_needs_no_more_calls_than_its_slowest_problem(method):
    for seed in range(3):
        cfg = _config(method=method, n=4, beam_width=2, seed=seed, lookahead=1 if method != "best_of_n" else 0)
        policy = ScriptedPolicy()
        batch = search(PROBLEMS, policy, ScriptedPRM(), cfg)
        alone_calls, alone_results = [], []
        for q in PROBLEMS:
            single = ScriptedPolicy()
            alone_results += search([q], single, ScriptedPRM(), cfg)
            alone_calls.append(len(single.sample_calls))
        assert len(policy.sample_calls) == max(alone_calls)
        # and batching changes nothing in the results
        for a, b in zip(batch, alone_results):
            assert [(c.text, c.step_scores) for c in a.completions] == [(c.text, c.step_scores) for c in b.completions]
            assert a.answer == b.answer


@pytest.mark.parametrize("method", ["beam_search", "dvts", "majority", "best_of_n", "weighted_best_of_n"])
def test_budget_counts_and_release(method):
    policy, prm = ScriptedPolicy(), ScriptedPRM()
    cfg = _config(method=method, n=6, beam_width=3, seed=1, lookahead=1 if method in ("beam_search", "dvts") else 0)
    t0 = time.perf_counter()
    results = search(PROBLEMS, policy, prm, cfg)
    elapsed = time.perf_counter() - t0
    gen = sum(r.budget.policy_tokens_generated for r in results)
    assert gen == policy.tokens_generated > 0
    for r in results:
        assert isinstance(r.budget, Budget)
        assert r.budget.policy_tokens_prefilled == len("Q: " + r.problem)
        b = r.budget
        assert b.flops_estimate == 2.0 * (1000 * (b.policy_tokens_generated + b.policy_tokens_prefilled) + 100 * b.prm_tokens_scored)
        assert 0 < b.wall_s <= elapsed
    scored = sum(r.budget.prm_tokens_scored for r in results)
    assert scored == (0 if method == "majority" else prm.tokens_scored)
    # every node was released exactly once (the scripted models assert "once")
    all_nodes = {x for r in results for x in r.tree["node_id"].tolist()}
    assert policy.released == all_nodes == set(policy.paths)
    if method != "majority":
        assert prm.released == all_nodes


def test_tree_arrays():
    cfg = _config(method="beam_search", n=4, beam_width=2, seed=3)
    for r in search(PROBLEMS, ScriptedPolicy(), ScriptedPRM(), cfg):
        tree = r.tree
        k = tree["node_id"].size
        assert tree["node_id"].dtype == np.int32
        for key in ("parent", "problem", "subtree", "depth", "num_tokens", "has_step", "score", "status", "answer"):
            assert tree[key].shape == (k,)
        assert set(tree["problem"].tolist()) == {r.problem_id}
        assert (tree["parent"] == -1).sum() == 1
        status = dict(zip(tree["node_id"].tolist(), tree["status"].tolist()))
        for c in r.completions:
            assert status[c.node_id] == (FINISHED if c.finished else ACTIVE)
        assert r.answer_node == -1 or status[r.answer_node] == FINISHED
        if r.answer is not None:
            assert r.answer in [c.answer for c in r.completions]


# ----------------------------------------------------------------------------- truncated steps


def test_truncated_steps_continue_unless_compat():
    seen_continued = seen_compat = False
    for seed in range(6):
        for compat in (False, True):
            policy = ScriptedPolicy()
            cfg = _config(method="beam_search", n=8, beam_width=2, seed=seed, compat_search_and_learn=compat)
            for res in search(PROBLEMS, policy, ScriptedPRM(), cfg):
                tree = res.tree
                ids = tree["node_id"].tolist()
                has_child = set(tree["parent"].tolist())
                status = dict(zip(ids, tree["status"].tolist()))
                for x in ids:
                    if x not in policy.step_flags or not policy.step_flags[x][1]:
                        continue  # a root, or not a truncated step
                    st = policy.step_text[x]
                    boxed = grading.extract_answer(st) is not None
                    if compat or boxed:
                        assert x not in has_child and status[x] in (FINISHED, PRUNED)
                        seen_compat |= compat and not boxed
                    elif x in has_child:
                        seen_continued = True
                for c in res.completions:
                    if c.finished and not compat and policy.step_flags[c.node_id][1]:
                        assert c.answer is not None  # a truncated step ends a path only with a box
                    if c.truncated and c.answer is None:
                        assert compat == c.finished
    assert seen_continued and seen_compat


def test_truncated_solution_by_hand():
    # sample 0: a truncated step, then the answer; sample 1: a truncated step with a box
    table = {"q": [
        [("abcdefgh", False, True), ("\\boxed{4}", True, False)],
        [("\\boxed{9} xx", False, True), ("never", True, False)],
    ]}
    scores = {"abcdefgh": 0.5, "\\boxed{4}": 0.9, "\\boxed{9} xx": 0.6, "never": 0.1}
    plain = search(["q"], TablePolicy(table), TablePRM(scores), SearchConfig(method="weighted_best_of_n", n=2, max_steps=4))
    (r,) = plain
    a, b = r.completions
    assert (a.steps, a.finished, a.truncated, a.answer) == (["abcdefgh", "\\boxed{4}"], True, False, "4")
    assert (b.steps, b.finished, b.truncated, b.answer) == (["\\boxed{9} xx"], True, True, "9")
    assert r.answer == "4"  # last: 0.9 > 0.6
    (c,) = search(["q"], TablePolicy(table), TablePRM(scores),
                  SearchConfig(method="weighted_best_of_n", n=2, max_steps=4, compat_search_and_learn=True))
    a, b = c.completions
    assert (a.steps, a.finished, a.truncated, a.answer) == (["abcdefgh"], True, True, None)
    assert (b.steps, b.finished, b.answer) == (["\\boxed{9} xx"], True, "9")
    assert c.answer == "9"  # the truncated solution has no answer: it abstains


def test_max_steps_cuts_unfinished_paths():
    table = {"q": [[("a\n\n", False, False)] * 5, [("b\n\n", False, False), ("\\boxed{2}", True, False)]]}
    scores = {"a\n\n": 0.9, "b\n\n": 0.2, "\\boxed{2}": 0.3}
    (r,) = search(["q"], TablePolicy(table), TablePRM(scores), SearchConfig(method="best_of_n", n=2, max_steps=3))
    a, b = r.completions
    assert (len(a.steps), a.finished, a.truncated, a.answer) == (3, False, True, None)
    assert (len(b.steps), b.finished, b.truncated, b.answer) == (2, True, False, "2")
    assert r.answer == "2" and r.answer_node == b.node_id  # the higher-scored unfinished one abstains
    (c,) = search(["q"], TablePolicy(table), TablePRM(scores),
                  SearchConfig(method="best_of_n", n=2, max_steps=3, compat_search_and_learn=True))
    assert (c.completions[0].finished, c.completions[0].truncated) == (True, True)


# ----------------------------------------------------------------------------- majority / best-of-N by hand


def _solutions(*answers_and_scores):
    """One-or-two-step solutions: (answer or None, [step scores])."""
    table, scores = [], {}
    for k, (answer, step_scores) in enumerate(answers_and_scores):
        steps = []
        for d, s in enumerate(step_scores):
            final = d == len(step_scores) - 1
            if final:
                text = f"({k}) the answer is \\boxed{{{answer}}}" if answer is not None else f"({k}) no idea"
            else:
                text = f"({k}) step {d}\n\n"
            steps.append((text, final, False))
            scores[text] = s
        table.append(steps)
    return table, scores


def test_majority_by_hand():
    table, _ = _solutions(("3", [1]), ("5", [1]), (None, [1]), ("3.0", [1]), (" 5 ", [1]), ("7", [1]))
    policy = TablePolicy({"q": table, "r": _solutions(("7", [1]), ("2", [1]), ("7", [1]), ("2", [1]), ("2", [1]), (None, [1]))[0]})
    res = search(["q", "r"], policy, None, SearchConfig(method="majority", n=6, max_steps=3))
    # q: 3 and 3.0 -> "3" (2 votes), 5 and " 5 " -> "5" (2 votes): tie, first seen wins
    assert res[0].answer == "3" and res[0].answer_node == res[0].completions[0].node_id
    assert res[1].answer == "2"
    assert [c.answer for c in res[0].completions] == ["3", "5", None, "3.0", "5", "7"]
    assert all(math.isnan(c.score) and c.step_scores == [] for c in res[0].completions)


SOLUTIONS = _solutions(
    ("A", [0.9, 0.5]),  # last .5  min .5  prod .45  mean .7
    ("B", [0.4, 0.8]),  # last .8  min .4  prod .32  mean .6
    ("C", [0.6, 0.6]),  # last .6  min .6  prod .36  mean .6
    (None, [0.99]),     # no answer: abstains (it would win with last)
    ("C", [0.3, 0.3]),  # last .3  min .3  prod .09  mean .3
)


@pytest.mark.parametrize(
    "agg,best,weighted",
    [("last", "B", "C"), ("min", "C", "C"), ("prod", "A", "A"), ("mean", "A", "C")],
)
def test_best_of_n_by_hand(agg, best, weighted):
    # weighted sums: last A .5 B .8 C .9; min A .5 B .4 C .9; prod A .45 B .32 C .45 (A first); mean A .7 B .6 C .9
    table, scores = SOLUTIONS
    cfg = dict(n=5, agg=agg, max_steps=3)
    (r,) = search(["q"], TablePolicy({"q": table}), TablePRM(scores), SearchConfig(method="best_of_n", **cfg))
    assert r.answer == best
    (w,) = search(["q"], TablePolicy({"q": table}), TablePRM(scores), SearchConfig(method="weighted_best_of_n", **cfg))
    assert w.answer == weighted
    c = w.completions[0]
    assert c.step_scores == [0.9, 0.5] and c.score == oracle.aggregate_scores([0.9, 0.5], agg)
    # compat: the final vote always aggregates with last
    (rc,) = search(["q"], TablePolicy({"q": table}), TablePRM(scores),
                   SearchConfig(method="best_of_n", compat_search_and_learn=True, **cfg))
    assert rc.answer == "B"
    (wc,) = search(["q"], TablePolicy({"q": table}), TablePRM(scores),
                   SearchConfig(method="weighted_best_of_n", compat_search_and_learn=True, **cfg))
    assert wc.answer == "C"


def test_prod_tie_goes_to_the_answer_seen_first():
    # A .45 and C .36 + .09 = .45 tie under prod: A is seen first
    table, scores = SOLUTIONS
    (w,) = search(["q"], TablePolicy({"q": table}), TablePRM(scores),
                  SearchConfig(method="weighted_best_of_n", n=5, agg="prod", max_steps=3))
    assert w.answer == "A"


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="mcts"), "method must be one of"),
        (dict(agg="max"), "agg must be one of"),
        (dict(n=0), "n must be an integer >= 1"),
        (dict(beam_width=0), "beam_width must be"),
        (dict(num_iterations=0), "num_iterations must be"),
        (dict(lookahead=-1), "lookahead must be"),
        (dict(n=6, beam_width=4), "n divisible by beam_width"),
        (dict(method="dvts", n=6, beam_width=4), "n divisible by beam_width"),
        (dict(vote="plurality"), "vote must be None or one of"),
        (dict(method="majority", vote="weighted"), "always votes 'majority'"),
        (dict(method="best_of_n", vote="weighted"), "always votes 'best'"),
        (dict(num_iterations=10, max_steps=5), "max_steps .* must be >= num_iterations"),
        (dict(sampling=SamplingParams(max_step_tokens=0)), "max_step_tokens"),
        (dict(n=2.5), "n must be an integer"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(**kwargs).validate()
    with pytest.raises(ValueError, match=match):
        search(["q"], ScriptedPolicy(), ScriptedPRM(), SearchConfig(**kwargs))


def test_config_accepts_good_values_and_search_inputs():
    assert SearchConfig().validate().final_vote == "weighted"
    assert SearchConfig(method="majority", n=5, beam_width=2).validate().final_vote == "majority"
    assert SearchConfig(method="dvts", vote="best").validate().final_vote == "best"
    assert SearchConfig(compat_search_and_learn=True, agg="min").vote_agg == "last"
    with pytest.raises(ValueError, match="needs a PRM"):
        search(["q"], ScriptedPolicy(), None, SearchConfig())
    with pytest.raises(TypeError):
        search("q", ScriptedPolicy(), ScriptedPRM(), SearchConfig())
    assert search([], ScriptedPolicy(), ScriptedPRM(), SearchConfig()) == []

    class P:
        problem = "alpha"

    cfg = _config(method="majority", n=2, beam_width=1)
    a = search([P(), {"problem": "alpha"}, "alpha"], ScriptedPolicy(), None, cfg)
    texts = [[c.text for c in r.completions] for r in a]
    assert texts[0] == texts[1] == texts[2]
    assert [r.problem_id for r in a] == [0, 1, 2]


def test_scripted_models_are_protocol_implementations():
    assert isinstance(ScriptedPolicy(), Policy) and isinstance(ScriptedPRM(), PRM)
    assert isinstance(TablePolicy({}), Policy) and isinstance(TablePRM({}), PRM)
    r = search(["alpha"], ScriptedPolicy(), ScriptedPRM(), _config(n=2, beam_width=2))[0]
    assert isinstance(r, SearchResult) and all(isinstance(c, Completion) for c in r.completions)
