"""Unit tests of every Forest operation, run against the reference twin and the compiled core.

Expected values are worked out by hand from the specification in
``ponder/twins/forest.py``; scores are mostly dyadic (0.25, 0.5, ...) so that float32
results are exact.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

import ponder
import ponder._core
import ponder.twins
from ponder.testing.forest import (
    ACTIVE,
    AGGREGATIONS,
    FINISHED,
    INT32_MAX,
    INT64_MAX,
    NO_ANSWER,
    PRUNED,
    add_roots,
    assert_dtype,
    assert_node_dtypes,
    assert_same,
    assert_unchanged_after_raise,
    build_standard_forest,
    chain,
    children_with_scores,
    csr,
    expand,
    live_ids,
    set_steps,
    snapshot,
    spec_stats,
)

f32 = np.float32


def tokens_of(result):
    """(flat, offsets) CSR output -> list of token lists, after checking its dtypes."""
    flat, offsets = result
    assert_dtype(flat, np.int32)
    assert_dtype(offsets, np.int64)
    assert offsets[0] == 0 and offsets[-1] == len(flat)
    assert np.all(np.diff(offsets) >= 0)
    return [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def check_vote(out, problems, answers, nodes, weights):
    assert set(out) == {"problem_ids", "answer_ids", "node_ids", "weights"}
    n = len(problems)
    assert_dtype(out["problem_ids"], np.int64, n)
    assert_dtype(out["answer_ids"], np.int64, n)
    assert_dtype(out["node_ids"], np.int32, n)
    assert_dtype(out["weights"], np.float32, n)
    assert out["problem_ids"].tolist() == problems
    assert out["answer_ids"].tolist() == answers
    assert out["node_ids"].tolist() == nodes
    np.testing.assert_array_equal(out["weights"], np.array(weights, dtype=np.float32))


# ----------------------------------------------------------------------------- module


def test_module_constants():
    for module in (ponder._core, ponder.twins, ponder):
        assert (module.ACTIVE, module.FINISHED, module.PRUNED) == (ACTIVE, FINISHED, PRUNED)
        assert module.NO_ANSWER == NO_ANSWER == -(2**63)
    assert ponder.Forest is ponder._core.Forest


def test_impl_fixture_gives_a_forest_class(impl):
    assert impl in (ponder.twins.Forest, ponder._core.Forest)
    assert isinstance(impl(), impl)


# ----------------------------------------------------------------------------- empty forest


def test_new_forest_is_empty(impl):
    f = impl()
    assert f.num_nodes == 0
    assert len(f) == 0
    problems = f.problems()
    assert_dtype(problems, np.int64, 0)
    assert spec_stats(f) == {"live_nodes": 0, "ids_given": 0, "problems": 0}


def test_forests_are_independent(impl):
    a, b = impl(), impl()
    add_roots(a, [1, 2], [[1], [2]])
    assert (a.num_nodes, b.num_nodes) == (2, 0)
    assert add_roots(b, [5], [[3]]) == [0]  # ids are per forest


# ----------------------------------------------------------------------------- add_roots


def test_add_roots_returns_increasing_int32_ids(impl):
    f = impl()
    flat, offsets = csr([[1, 2, 3], [4], []])
    ids = f.add_roots(np.array([7, 7, 3]), np.array([0, 1, 0]), flat, offsets)
    assert_dtype(ids, np.int32, 3)
    assert ids.tolist() == [0, 1, 2]
    more = f.add_roots(np.array([3]), np.array([2]), np.array([9]), np.array([0, 1]))
    assert_dtype(more, np.int32, 1)
    assert more.tolist() == [3]
    assert f.num_nodes == len(f) == 4
    assert spec_stats(f) == {"live_nodes": 4, "ids_given": 4, "problems": 2}


def test_add_roots_records_node_fields(impl):
    f = impl()
    ids = add_roots(f, [7, 7, 3], [[1, 2, 3], [4], []], [0, 1, 5])
    fields = f.nodes(ids)
    assert_node_dtypes(fields, 3)
    assert fields["parent"].tolist() == [-1, -1, -1]
    assert fields["problem"].tolist() == [7, 7, 3]
    assert fields["subtree"].tolist() == [0, 1, 5]
    assert fields["depth"].tolist() == [0, 0, 0]
    assert fields["num_tokens"].tolist() == [3, 1, 0]
    assert fields["has_step"].tolist() == [False, False, False]
    assert np.isnan(fields["score"]).all()
    assert fields["status"].tolist() == [ACTIVE] * 3
    assert fields["answer"].tolist() == [NO_ANSWER] * 3


def test_add_roots_prompts_are_the_root_tokens(impl):
    f = impl()
    ids = add_roots(f, [7, 7, 3], [[1, 2, 3], [4], []])
    assert tokens_of(f.step_tokens(ids)) == [[1, 2, 3], [4], []]
    assert tokens_of(f.path_tokens(ids)) == [[1, 2, 3], [4], []]


def test_add_roots_zero_token_prompts(impl):
    f = impl()
    ids = f.add_roots([0, 1], [0, 0], np.array([], dtype=np.int32), [0, 0, 0])
    assert ids.tolist() == [0, 1]
    assert f.nodes(ids)["num_tokens"].tolist() == [0, 0]
    assert tokens_of(f.path_tokens(ids)) == [[], []]


def test_add_roots_empty_input_adds_nothing(impl):
    f = impl()
    ids = f.add_roots([], [], [], [0])
    assert_dtype(ids, np.int32, 0)
    assert f.num_nodes == 0
    assert f.problems().tolist() == []
    assert spec_stats(f) == {"live_nodes": 0, "ids_given": 0, "problems": 0}
    assert add_roots(f, [4], [[1]]) == [0]


def test_add_roots_extreme_values(impl):
    f = impl()
    ids = f.add_roots(
        np.array([INT64_MAX, 0]), np.array([INT32_MAX, 0]), np.array([INT32_MAX, 0]), np.array([0, 1, 2])
    )
    fields = f.nodes(ids)
    assert fields["problem"].tolist() == [INT64_MAX, 0]
    assert fields["subtree"].tolist() == [INT32_MAX, 0]
    assert tokens_of(f.step_tokens(ids)) == [[INT32_MAX], [0]]
    assert f.problems().tolist() == [0, INT64_MAX]


def test_several_roots_per_problem(impl):
    f = impl()
    ids = add_roots(f, [4, 4, 4], [[1], [2], [3]], [0, 1, 1])
    assert f.problem_nodes(4).tolist() == ids
    assert f.problems().tolist() == [4]
    assert f.nodes(ids)["subtree"].tolist() == [0, 1, 1]


# ----------------------------------------------------------------------------- expand


def test_expand_children_are_grouped_by_parent(impl):
    f = impl()
    roots = add_roots(f, [7, 3], [[1], [2]], [1, 4])
    kids = f.expand(np.array([roots[1], roots[0]]), np.array([2, 3]))
    assert_dtype(kids, np.int32, 5)
    assert kids.tolist() == [2, 3, 4, 5, 6]  # children of roots[1] first
    fields = f.nodes(kids)
    assert_node_dtypes(fields, 5)
    assert fields["parent"].tolist() == [1, 1, 0, 0, 0]
    assert fields["problem"].tolist() == [3, 3, 7, 7, 7]
    assert fields["subtree"].tolist() == [4, 4, 1, 1, 1]  # inherited from the root
    assert fields["depth"].tolist() == [1] * 5
    assert fields["has_step"].tolist() == [False] * 5
    assert fields["num_tokens"].tolist() == [0] * 5
    assert np.isnan(fields["score"]).all()
    assert fields["status"].tolist() == [ACTIVE] * 5
    assert fields["answer"].tolist() == [NO_ANSWER] * 5
    assert f.num_nodes == 7


def test_expand_zero_counts_and_empty_input(impl):
    f = impl()
    roots = add_roots(f, [1, 2], [[1], [2]])
    kids = f.expand(roots, [0, 2])
    assert kids.tolist() == [2, 3]
    assert f.nodes(kids)["parent"].tolist() == [1, 1]
    none = f.expand([], [])
    assert_dtype(none, np.int32, 0)
    zero = f.expand(roots, [0, 0])
    assert_dtype(zero, np.int32, 0)
    assert f.num_nodes == 4
    assert f.stats()["ids_given"] == 4


def test_expand_same_parent_twice_in_one_call(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    kids = f.expand([root, root], [1, 2])
    assert kids.tolist() == [1, 2, 3]
    assert f.nodes(kids)["parent"].tolist() == [root] * 3


def test_expand_stepped_node_increases_depth(impl):
    f = impl()
    path = chain(f, 1, [5], [[1], [2]], [0.5, 0.5], subtree=3)
    kids = expand(f, [path[-1]], [2])
    fields = f.nodes(kids)
    assert fields["depth"].tolist() == [3, 3]
    assert fields["parent"].tolist() == [path[-1]] * 2
    assert fields["subtree"].tolist() == [3, 3]
    assert f.nodes(path)["depth"].tolist() == [0, 1, 2]


def test_child_of_an_unstepped_node_cannot_exist(impl):
    # expand refuses unstepped non-root parents, so every non-root node's parent is a root or
    # has a step: the "parent has no step" case of set_steps can never be constructed.
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    (child,) = expand(f, [root], [1])
    with pytest.raises(ValueError, match="parent_ids"):
        f.expand([child], [1])
    assert f.num_nodes == 2


# ----------------------------------------------------------------------------- set_steps


def test_set_steps_records_tokens_scores_and_status(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[9, 9]])
    kids = expand(f, [root], [3])
    flat, offsets = csr([[1, 2], [], [3]])
    result = f.set_steps(np.array(kids), flat, offsets, np.array([0.25, 0.5, 0.75]), np.array([False, True, False]))
    assert result is None
    fields = f.nodes(kids)
    assert fields["has_step"].tolist() == [True, True, True]
    np.testing.assert_array_equal(fields["score"], np.array([0.25, 0.5, 0.75], dtype=np.float32))
    assert fields["status"].tolist() == [ACTIVE, FINISHED, ACTIVE]
    assert fields["num_tokens"].tolist() == [2, 0, 1]
    assert tokens_of(f.step_tokens(kids)) == [[1, 2], [], [3]]
    assert tokens_of(f.path_tokens(kids)) == [[9, 9, 1, 2], [9, 9], [9, 9, 3]]
    assert f.num_nodes == 4  # set_steps adds no node


def test_set_steps_finished_as_integers(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    kids = expand(f, [root], [2])
    f.set_steps(kids, [4, 5], [0, 1, 2], [0.5, 0.5], np.array([1, 0], dtype=np.int8))
    assert f.nodes(kids)["status"].tolist() == [FINISHED, ACTIVE]


@pytest.mark.parametrize(
    "scores",
    [
        pytest.param([0.25, 0.5], id="list"),
        pytest.param(np.array([0.25, 0.5], dtype=np.float64), id="float64"),
        pytest.param(np.array([0.25, 0.5], dtype=np.float32), id="float32"),
        pytest.param(np.array([0.25, 9, 0.5, 9])[::2], id="float64-strided"),
        pytest.param(np.array([1, 0], dtype=np.int32), id="int32"),
    ],
)
def test_set_steps_score_dtypes(impl, scores):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    kids = expand(f, [root], [2])
    f.set_steps(kids, [], [0, 0, 0], scores, [False, False])
    expected = np.asarray(scores).astype(np.float32)
    np.testing.assert_array_equal(f.nodes(kids)["score"], expected)
    np.testing.assert_array_equal(f.aggregate(kids, "last"), expected)


def test_set_steps_float32_score_is_widened_exactly(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    kids = expand(f, [root], [1])
    f.set_steps(kids, [], [0, 0], np.array([0.1], dtype=np.float32), [False])
    (child,) = expand(f, kids, [1])
    f.set_steps([child], [], [0, 0], np.array([0.1], dtype=np.float32), [False])
    tenth = float(np.float32(0.1))
    assert f.aggregate([child], "prod")[0] == f32(tenth * tenth)
    assert f.aggregate([child], "mean")[0] == f32((tenth + tenth) / 2)


def test_set_steps_zero_token_step(impl):
    f = impl()
    path = chain(f, 1, [1, 2], [[], [3], []], [0.5, 0.5, 0.5])
    assert f.nodes(path)["num_tokens"].tolist() == [2, 0, 1, 0]
    assert tokens_of(f.step_tokens(path)) == [[1, 2], [], [3], []]
    assert tokens_of(f.path_tokens(path)) == [[1, 2], [1, 2], [1, 2, 3], [1, 2, 3]]


def test_set_steps_empty_input_is_a_no_op(impl):
    f, _ = build_standard_forest(impl)
    before = snapshot(f)
    assert f.set_steps([], [], [0], [], []) is None
    assert f.set_steps(np.array([], np.int32), np.array([], np.int32), np.array([0]), np.array([]), np.array([], bool)) is None
    assert_same(snapshot(f), before)


def test_set_steps_reset_a_leaf(impl):
    f = impl()
    path = chain(f, 1, [1], [[2], [3]], [0.5, 0.25])
    leaf = path[-1]
    set_steps(f, [leaf], [[7, 8]], [1.0], [True])
    fields = f.nodes([leaf])
    assert fields["status"].tolist() == [FINISHED]
    assert fields["score"].tolist() == [1.0]
    assert tokens_of(f.path_tokens([leaf])) == [[1, 2, 7, 8]]
    assert f.aggregate([leaf], "last").tolist() == [1.0]
    assert f.aggregate([leaf], "min").tolist() == [0.5]
    assert f.aggregate([leaf], "prod").tolist() == [0.5]
    assert f.aggregate([leaf], "mean").tolist() == [0.75]
    # a finished node can be set back to active, and then expanded
    set_steps(f, [leaf], [[4]], [0.25], [False])
    assert f.nodes([leaf])["status"].tolist() == [ACTIVE]
    assert f.aggregate([leaf], "mean").tolist() == [0.375]
    assert len(expand(f, [leaf], [1])) == 1


def test_set_steps_reset_a_node_with_unstepped_children(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    (a,) = children_with_scores(f, root, [[2]], [0.5])
    (b,) = expand(f, [a], [1])  # b has no step yet, so a's step is not fixed
    set_steps(f, [a], [[3]], [0.25])
    set_steps(f, [b], [[4]], [0.5])
    assert f.aggregate([b], "prod").tolist() == [0.125]
    assert f.aggregate([b], "min").tolist() == [0.25]
    assert tokens_of(f.path_tokens([b])) == [[1, 3, 4]]


def test_set_steps_parent_earlier_in_the_same_call(impl):
    # The parent's new step is applied before its child's, which then builds on it.
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    (a,) = children_with_scores(f, root, [[2]], [0.5])
    (b,) = expand(f, [a], [1])
    set_steps(f, [a, b], [[3], [4]], [0.25, 0.75])
    assert f.nodes([a, b])["score"].tolist() == [0.25, 0.75]
    assert f.aggregate([b], "mean").tolist() == [0.5]
    assert f.aggregate([b], "min").tolist() == [0.25]
    assert f.aggregate([b], "prod").tolist() == [0.1875]
    assert tokens_of(f.path_tokens([b])) == [[1, 3, 4]]


def test_set_steps_sibling_subtrees_in_one_call(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    kids = expand(f, [root], [2])
    set_steps(f, [kids[1], kids[0]], [[6], [5]], [0.75, 0.25])
    assert tokens_of(f.step_tokens(kids)) == [[5], [6]]
    assert f.aggregate(kids, "last").tolist() == [0.25, 0.75]


def test_set_steps_rejects_a_parent_listed_after_its_child(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    (a,) = children_with_scores(f, root, [[2]], [0.5])
    (b,) = expand(f, [a], [1])
    # Applying in order would give b aggregates computed from a's old step.
    assert_unchanged_after_raise(f, ValueError, "node_ids", set_steps, f, [b, a], [[4], [3]], [0.75, 0.25])
    # Parent first is fine: b's path uses a's new score, and a's step is then fixed.
    set_steps(f, [a, b], [[3], [4]], [0.25, 0.75])
    assert f.aggregate([b], "mean").tolist() == [0.5]
    with pytest.raises(ValueError, match="node_ids"):
        set_steps(f, [a], [[3]], [0.5])


# ----------------------------------------------------------------------------- set_scores


def best_of_n_forest(Forest, scores):
    """Two problems grown as best-of-N grows them (each path one child at a time, paths
    interleaved), every step scored with ``scores[node id]``; a pruned branch, an unstepped
    leaf and answers on the finished ones. Returns (forest, scored ids)."""
    f = Forest()
    roots = add_roots(f, [4, 9], [[1, 2], [3]])
    paths = [[roots[0]]] * 3 + [[roots[1]]] * 2
    scored = []
    for depth in range(3):
        parents = [p[-1] for p in paths]
        kids = expand(f, parents, [1] * len(parents))
        set_steps(f, kids, [[k % 5] for k in kids], [scores[k] for k in kids], [depth == 2] * len(kids))
        scored += kids
        paths = [p + [k] for p, k in zip(paths, kids)]
    extra = expand(f, [paths[0][1]], [2])  # a stepped, then pruned, branch and an unstepped leaf
    set_steps(f, extra[:1], [[7]], [scores[extra[0]]])
    f.prune(extra[:1])
    f.set_answers([p[-1] for p in paths], [1, 2, 1, 3, 3])
    return f, scored + extra[:1]


SCORES = [math.nan] * 2 + [0.1 * k - 0.35 + (0.3 if k % 3 == 0 else 0.0) for k in range(2, 20)]


def test_set_scores_late_equals_scores_given_to_set_steps(impl):
    """The key equality: placeholder scores first, the real ones through set_scores, gives
    exactly the forest (float64 path scores included) that set_steps with the real scores gives."""
    now, scored = best_of_n_forest(impl, SCORES)
    late, same_ids = best_of_n_forest(impl, [0.0] * len(SCORES))
    assert same_ids == scored
    assert late.path_scores(scored, "prod").tolist() == [0.0] * len(scored)
    order = [scored[i] for i in np.random.default_rng(0).permutation(len(scored))]
    late.set_scores(np.array(order, dtype=np.int32), np.array([SCORES[x] for x in order]))
    assert_same(snapshot(late), snapshot(now))
    for how in AGGREGATIONS:
        assert_same(late.path_scores(scored, how), now.path_scores(scored, how), how)
        assert_same(late.vote(scored, "weighted", how), now.vote(scored, "weighted", how), how)


def test_set_scores_path_by_path_with_ancestors_last(impl):
    """Paths set one at a time, leaves before their ancestors: each ancestor set later
    recomputes everything below it."""
    now, scored = best_of_n_forest(impl, SCORES)
    late, _ = best_of_n_forest(impl, [0.0] * len(SCORES))
    fields = now.nodes(scored)
    by_depth = sorted(scored, key=lambda x: -int(fields["depth"][scored.index(x)]))
    for x in by_depth:
        late.set_scores([x], [SCORES[x]])
    assert_same(snapshot(late), snapshot(now))
    for how in AGGREGATIONS:
        assert_same(late.path_scores(scored, how), now.path_scores(scored, how), how)


def test_set_scores_recomputes_descendants_only(impl):
    f = impl()
    root, a, b = chain(f, 1, [1], [[2], [3]], [0.5, 0.25])
    (c,) = children_with_scores(f, root, [[4]], [0.75])  # a sibling path: untouched
    (d,) = expand(f, [b], [1])  # no step: stays without one
    f.set_scores([a], [0.25])
    assert f.nodes([a, b, c, d])["score"].tolist()[:3] == [0.25, 0.25, 0.75]
    assert f.aggregate([a, b, c], "prod").tolist() == [0.25, 0.0625, 0.75]
    assert f.aggregate([a, b, c], "mean").tolist() == [0.25, 0.25, 0.75]
    assert f.aggregate([b], "min").tolist() == [0.25]
    assert not f.nodes([d])["has_step"][0]
    # d takes the new aggregates when it gets its step
    set_steps(f, [d], [[5]], [0.5])
    assert f.aggregate([d], "prod").tolist() == [0.03125]
    # tokens, status, answers and ids given stay
    assert tokens_of(f.path_tokens([d])) == [[1, 2, 3, 5]]
    assert f.nodes([a, b])["status"].tolist() == [ACTIVE, ACTIVE]
    assert spec_stats(f)["ids_given"] == 5


def test_set_scores_on_finished_and_pruned_nodes(impl):
    f, ids = build_standard_forest(impl)
    f.set_scores([ids.finished, ids.pruned, ids.with_stepped_child], [0.25, 0.5, 1.0])
    fields = f.nodes([ids.finished, ids.pruned, ids.with_stepped_child, ids.finished_deep])
    assert fields["score"].tolist() == [0.25, 0.5, 1.0, 0.5]
    assert fields["status"].tolist() == [FINISHED, PRUNED, ACTIVE, FINISHED]
    assert f.aggregate([ids.finished_deep], "mean").tolist() == [0.75]  # (1.0 + 0.5) / 2


def test_set_scores_empty_input_is_a_no_op(impl):
    f, _ = build_standard_forest(impl)
    before = snapshot(f)
    assert f.set_scores([], []) is None
    f.set_scores(np.zeros(0, np.int32), np.zeros(0, np.float32))
    assert_same(snapshot(f), before)


# ----------------------------------------------------------------------------- aggregate


def test_aggregate_every_how_by_hand(impl):
    f = impl()
    path = chain(f, 1, [1], [[2], [3], [4]], [0.5, 0.25, 1.0])
    nodes = path[1:]
    expected = {
        "last": [0.5, 0.25, 1.0],
        "min": [0.5, 0.25, 0.25],
        "prod": [0.5, 0.125, 0.125],
        "mean": [0.5, 0.375, 1.75 / 3],
    }
    for how, values in expected.items():
        out = f.aggregate(np.array(nodes), how)
        assert_dtype(out, np.float32, 3)
        np.testing.assert_array_equal(out, np.array(values, dtype=np.float32), err_msg=how)


def test_aggregate_non_dyadic_scores_use_float64_then_round(impl):
    f = impl()
    path = chain(f, 1, [1], [[2], [3], [4]], [0.1, 0.2, 0.4])
    leaf = path[-1]
    assert f.aggregate([leaf], "mean")[0] == f32(((0.1 + 0.2) + 0.4) / 3)
    assert f.aggregate([leaf], "prod")[0] == f32((0.1 * 0.2) * 0.4)
    assert f.aggregate([leaf], "min")[0] == f32(0.1)
    assert f.aggregate([leaf], "last")[0] == f32(0.4)


def test_path_scores_are_the_float64_aggregates(impl):
    """path_scores: the same aggregates as ``aggregate``, unrounded (float64, in path order)."""
    f = impl()
    path = chain(f, 1, [1], [[2], [3], [4]], [0.1, 0.2, 0.4])
    leaf = path[-1]
    expected = {"mean": ((0.0 + 0.1) + 0.2 + 0.4) / 3, "prod": ((1.0 * 0.1) * 0.2) * 0.4, "min": 0.1, "last": 0.4}
    for how, value in expected.items():
        out = f.path_scores([leaf, leaf], how)
        assert_dtype(out, np.float64, 2)
        assert out.tolist() == [value, value], how
        np.testing.assert_array_equal(f.aggregate([leaf], how), out[:1].astype(np.float32), strict=True)
    assert_dtype(f.path_scores([], "last"), np.float64, 0)


def test_aggregate_negative_and_large_scores(impl):
    f = impl()
    path = chain(f, 1, [1], [[2], [3]], [-2.0, 3.0])
    assert f.aggregate([path[-1]], "prod").tolist() == [-6.0]
    assert f.aggregate([path[-1]], "min").tolist() == [-2.0]
    assert f.aggregate([path[-1]], "mean").tolist() == [0.5]


def test_aggregate_standard_forest(impl):
    f, ids = build_standard_forest(impl)
    nodes = [ids.with_stepped_child, ids.with_unstepped_child, ids.active_leaf, ids.pruned, ids.finished, ids.finished_deep]
    expected = {
        "last": [0.5, 0.25, 0.75, 1.0, 0.5, 0.5],
        "min": [0.5, 0.25, 0.75, 1.0, 0.5, 0.5],
        "prod": [0.5, 0.25, 0.75, 1.0, 0.5, 0.25],
        "mean": [0.5, 0.25, 0.75, 1.0, 0.5, 0.5],
    }
    for how, values in expected.items():
        np.testing.assert_array_equal(f.aggregate(nodes, how), np.array(values, dtype=np.float32), err_msg=how)


def test_aggregate_duplicates_pruned_and_empty(impl):
    f, ids = build_standard_forest(impl)
    out = f.aggregate([ids.pruned, ids.active_leaf, ids.pruned], "last")  # pruned nodes keep their scores
    assert out.tolist() == [1.0, 0.75, 1.0]
    for how in AGGREGATIONS:
        assert_dtype(f.aggregate([], how), np.float32, 0)


# ----------------------------------------------------------------------------- tokens


def test_path_tokens_and_step_tokens(impl):
    f, ids = build_standard_forest(impl)
    order = [ids.finished_deep, ids.root, ids.unstepped, ids.pruned, ids.root_c, ids.active_leaf]
    assert tokens_of(f.path_tokens(order)) == [[1, 2, 3, 10, 14], [1, 2, 3], [1, 2, 3, 11, 12], [], [], [4, 10]]
    assert tokens_of(f.step_tokens(order)) == [[14], [1, 2, 3], [], [], [], [10]]


def test_path_tokens_exact_arrays(impl):
    f = impl()
    path = chain(f, 1, [5, 6], [[7], [8, 9]], [0.5, 0.5])
    flat, offsets = f.path_tokens(np.array([path[2], path[0]]))
    assert_same(flat, np.array([5, 6, 7, 8, 9, 5, 6], dtype=np.int32))
    assert_same(offsets, np.array([0, 5, 7], dtype=np.int64))
    flat, offsets = f.step_tokens(np.array([path[2], path[2]]))
    assert_same(flat, np.array([8, 9, 8, 9], dtype=np.int32))
    assert_same(offsets, np.array([0, 2, 4], dtype=np.int64))


def test_tokens_of_empty_input(impl):
    f, _ = build_standard_forest(impl)
    for method in (f.path_tokens, f.step_tokens):
        flat, offsets = method([])
        assert_same(flat, np.array([], dtype=np.int32))
        assert_same(offsets, np.array([0], dtype=np.int64))


# ----------------------------------------------------------------------------- nodes / problems


def test_nodes_standard_forest(impl):
    f, ids = build_standard_forest(impl)
    order = [0, 1, 2, 4, 5, 6, 7, 8, 9, 11, 12]
    fields = f.nodes(order)
    assert_node_dtypes(fields, len(order))
    assert fields["parent"].tolist() == [-1, -1, -1, -1, 0, 0, 1, 2, 2, 5, 6]
    assert fields["problem"].tolist() == [7, 7, 3, 5, 7, 7, 7, 3, 3, 7, 7]
    assert fields["subtree"].tolist() == [0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert fields["depth"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
    assert fields["num_tokens"].tolist() == [3, 1, 0, 2, 1, 2, 1, 0, 1, 1, 0]
    assert fields["has_step"].tolist() == [False] * 4 + [True] * 6 + [False]
    score = fields["score"]
    assert np.isnan(score[[0, 1, 2, 3, 10]]).all()
    assert score[4:10].tolist() == [0.5, 0.25, 0.75, 1.0, 0.5, 0.5]
    assert fields["status"].tolist() == [ACTIVE, ACTIVE, ACTIVE, PRUNED, ACTIVE, ACTIVE, ACTIVE, PRUNED, FINISHED, FINISHED, ACTIVE]
    na = NO_ANSWER
    assert fields["answer"].tolist() == [na, na, na, na, na, na, 7, na, 42, 42, 1]


def test_nodes_empty_and_duplicates(impl):
    f, ids = build_standard_forest(impl)
    assert_node_dtypes(f.nodes([]), 0)
    fields = f.nodes([ids.active_leaf, ids.active_leaf])
    assert fields["parent"].tolist() == [1, 1]


def test_problem_nodes_and_problems(impl):
    f, ids = build_standard_forest(impl)
    problems = f.problems()
    assert_same(problems, np.array([3, 5, 7], dtype=np.int64))  # 9 was released
    seven = f.problem_nodes(7)
    assert_same(seven, np.array([0, 1, 5, 6, 7, 11, 12], dtype=np.int32))
    assert_same(f.problem_nodes(3), np.array([2, 8, 9], dtype=np.int32))
    assert_same(f.problem_nodes(np.int64(5)), np.array([4], dtype=np.int32))


def test_problem_nodes_ascending_across_calls(impl):
    f = impl()
    a = add_roots(f, [2, 1], [[1], [2]])
    kids = expand(f, [a[1], a[0]], [1, 2])
    b = add_roots(f, [2], [[3]])
    assert f.problem_nodes(2).tolist() == sorted([a[0], kids[1], kids[2], b[0]])
    assert f.problem_nodes(1).tolist() == [a[1], kids[0]]
    assert f.problems().tolist() == [1, 2]


def test_num_nodes_and_len(impl):
    f, ids = build_standard_forest(impl)
    assert f.num_nodes == len(f) == 11
    assert spec_stats(f) == {"live_nodes": 11, "ids_given": 13, "problems": 3}
    expand(f, [ids.active_leaf], [3])
    assert f.num_nodes == len(f) == 14
    f.release_problem(7)
    assert f.num_nodes == len(f) == 4
    assert spec_stats(f) == {"live_nodes": 4, "ids_given": 16, "problems": 2}


# ----------------------------------------------------------------------------- set_answers


def test_set_answers_records_answers(impl):
    f, ids = build_standard_forest(impl)
    result = f.set_answers(np.array([ids.root, ids.active_leaf, ids.pruned]), np.array([-5, NO_ANSWER + 1, INT64_MAX]))
    assert result is None
    assert f.nodes([ids.root, ids.active_leaf, ids.pruned])["answer"].tolist() == [-5, NO_ANSWER + 1, INT64_MAX]


def test_set_answers_later_entries_win(impl):
    f, ids = build_standard_forest(impl)
    f.set_answers([ids.active_leaf, ids.finished, ids.active_leaf], [1, 2, 3])
    assert f.nodes([ids.active_leaf, ids.finished])["answer"].tolist() == [3, 2]
    f.set_answers([ids.finished], [5])
    assert f.nodes([ids.finished])["answer"].tolist() == [5]


def test_set_answers_empty_input(impl):
    f, _ = build_standard_forest(impl)
    before = snapshot(f)
    assert f.set_answers([], []) is None
    assert_same(snapshot(f), before)


# ----------------------------------------------------------------------------- prune


def test_prune_marks_nodes_only(impl):
    f, ids = build_standard_forest(impl)
    assert f.prune(np.array([ids.with_stepped_child, ids.root_b])) is None
    fields = f.nodes([ids.with_stepped_child, ids.root_b, ids.finished_deep, ids.active_leaf])
    assert fields["status"].tolist() == [PRUNED, PRUNED, FINISHED, ACTIVE]  # no cascade
    assert f.aggregate([ids.with_stepped_child], "last").tolist() == [0.5]  # still readable
    assert f.num_nodes == 11
    with pytest.raises(ValueError, match="parent_ids"):
        f.expand([ids.root_b], [1])


def test_prune_is_idempotent_and_accepts_duplicates_and_empty(impl):
    f, ids = build_standard_forest(impl)
    f.prune([ids.active_leaf, ids.active_leaf])
    f.prune([ids.active_leaf])
    f.prune([])
    assert f.nodes([ids.active_leaf])["status"].tolist() == [PRUNED]


def test_prune_finished_and_unstepped(impl):
    f, ids = build_standard_forest(impl)
    f.prune([ids.finished, ids.unstepped])
    assert f.nodes([ids.finished, ids.unstepped])["status"].tolist() == [PRUNED, PRUNED]
    with pytest.raises(ValueError, match="node_ids"):
        set_steps(f, [ids.unstepped], [[1]], [0.5])


# ----------------------------------------------------------------------------- release_problem


def test_release_problem_forgets_its_nodes(impl):
    f, ids = build_standard_forest(impl)
    seven = f.problem_nodes(7).tolist()
    assert f.release_problem(7) is None
    assert f.problems().tolist() == [3, 5]
    assert f.num_nodes == 4
    assert f.stats()["ids_given"] == 13
    assert live_ids(f).tolist() == [2, 4, 8, 9]
    for node in seven:
        with pytest.raises(IndexError, match="node_ids"):
            f.nodes([node])
    with pytest.raises(ValueError, match="problem_id"):
        f.problem_nodes(7)
    # the other problems are untouched
    assert tokens_of(f.path_tokens([ids.finished])) == [[13]]
    assert f.nodes([ids.finished])["answer"].tolist() == [42]


RELEASED_ID_CALLS = {
    "nodes": lambda f, x: f.nodes([x]),
    "path_tokens": lambda f, x: f.path_tokens([x]),
    "step_tokens": lambda f, x: f.step_tokens([x]),
    "aggregate": lambda f, x: f.aggregate([x], "last"),
    "expand": lambda f, x: f.expand([x], [1]),
    "set_steps": lambda f, x: f.set_steps([x], [1], [0, 1], [0.5], [False]),
    "set_scores": lambda f, x: f.set_scores([x], [0.5]),
    "set_answers": lambda f, x: f.set_answers([x], [1]),
    "prune": lambda f, x: f.prune([x]),
    "select_beam": lambda f, x: f.select_beam([x], 1, "last"),
    "select_dvts": lambda f, x: f.select_dvts([x], "last"),
    "vote": lambda f, x: f.vote([x], "majority"),
}


@pytest.mark.parametrize("call", list(RELEASED_ID_CALLS), ids=list(RELEASED_ID_CALLS))
def test_released_ids_raise_index_error_everywhere(impl, call):
    f, ids = build_standard_forest(impl)
    for node in ids.released:  # a released root and a released stepped child
        with pytest.raises(IndexError):
            RELEASED_ID_CALLS[call](f, node)


def test_released_ids_are_never_reused(impl):
    f, ids = build_standard_forest(impl)
    f.release_problem(7)
    roots = add_roots(f, [7, 9], [[5], [6]])
    assert roots == [13, 14]
    kids = expand(f, [roots[0]], [2])
    assert kids == [15, 16]
    assert f.problem_nodes(7).tolist() == [13, 15, 16]
    assert f.problem_nodes(9).tolist() == [14]
    assert f.problems().tolist() == [3, 5, 7, 9]
    assert spec_stats(f) == {"live_nodes": 8, "ids_given": 17, "problems": 4}
    for old in (0, 5, 11, 3):
        with pytest.raises(IndexError):
            f.nodes([old])
    assert tokens_of(f.path_tokens([kids[0]])) == [[5]]


def test_release_every_problem_then_reuse_forest(impl):
    f = impl()
    add_roots(f, [1, 2], [[1], [2]])
    f.release_problem(1)
    f.release_problem(np.int64(2))
    assert f.num_nodes == 0
    assert f.problems().tolist() == []
    assert spec_stats(f) == {"live_nodes": 0, "ids_given": 2, "problems": 0}
    assert add_roots(f, [1], [[3]]) == [2]


# ----------------------------------------------------------------------------- select_beam


def beam_forest(Forest):
    """Problem 1: root 0 with children 2..5; problem 2: root 1 with children 6..8."""
    f = Forest()
    add_roots(f, [1, 2], [[1], [2]])
    a = expand(f, [0], [4])
    b = expand(f, [1], [3])
    set_steps(f, a, [[1], [2], [3], [4]], [0.25, 0.75, 0.5, 0.75])
    set_steps(f, b, [[1], [2], [3]], [0.5, 1.0, 0.25])
    return f, a, b


def test_select_beam_keeps_best_per_problem(impl):
    f, a, b = beam_forest(impl)
    assert (a, b) == ([2, 3, 4, 5], [6, 7, 8])
    out = f.select_beam(np.array(a + b), 2, "last")
    assert_dtype(out, np.int32, 4)
    assert out.tolist() == [3, 5, 7, 6]  # 3 and 5 tie at 0.75: lower id first


def test_select_beam_group_order_is_first_appearance(impl):
    f, a, b = beam_forest(impl)
    out = f.select_beam([8, 2, 7, 3], 1, "last")  # problem 2 appears first
    assert out.tolist() == [7, 3]
    out = f.select_beam([2, 8, 7, 3], 5, "last")
    assert out.tolist() == [3, 2, 7, 8]


def test_select_beam_tie_break_ignores_input_order(impl):
    f, a, b = beam_forest(impl)
    assert f.select_beam([5, 3], 1, "last").tolist() == [3]
    assert f.select_beam([5, 3], 2, "last").tolist() == [3, 5]


def test_select_beam_keep_zero_and_large(impl):
    f, a, b = beam_forest(impl)
    zero = f.select_beam(a + b, 0, "last")
    assert_dtype(zero, np.int32, 0)
    assert f.select_beam(a, 100, "last").tolist() == [3, 5, 4, 2]
    assert f.select_beam(a, INT32_MAX, "mean").tolist() == [3, 5, 4, 2]
    assert_dtype(f.select_beam([], 3, "last"), np.int32, 0)


def test_select_beam_how_matters(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    good, bad = children_with_scores(f, root, [[1], [2]], [0.9, 0.25])
    (x,) = children_with_scores(f, good, [[3]], [0.5])  # path 0.9, 0.5
    (y,) = children_with_scores(f, bad, [[4]], [0.75])  # path 0.25, 0.75
    assert f.select_beam([x, y], 1, "last").tolist() == [y]
    assert f.select_beam([x, y], 1, "min").tolist() == [x]
    assert f.select_beam([x, y], 1, "prod").tolist() == [x]
    assert f.select_beam([x, y], 1, "mean").tolist() == [x]


def test_select_beam_finished_candidates_are_allowed(impl):
    f, ids = build_standard_forest(impl)
    out = f.select_beam([ids.finished_deep, ids.active_leaf, ids.finished], 1, "prod")
    assert out.tolist() == [ids.active_leaf, ids.finished]  # problem 7 first: 0.75 > 0.25


def test_select_beam_dedupe_same_parent_same_tokens(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    kids = children_with_scores(f, root, [[5, 6], [5, 6], [7], [5]], [0.5, 0.75, 0.25, 0.5])
    assert kids == [1, 2, 3, 4]
    assert f.select_beam(kids, 3, "last", False).tolist() == [2, 1, 4]
    # 1 and 2 share parent and tokens: the better one (2) stays and 1 no longer takes a slot
    assert f.select_beam(kids, 3, "last", True).tolist() == [2, 4, 3]
    assert f.select_beam(kids, 3, "last", dedupe=True).tolist() == [2, 4, 3]
    assert f.select_beam(kids, 3, "last").tolist() == [2, 1, 4]  # dedupe defaults to False


def test_select_beam_dedupe_equal_scores_keeps_lower_id(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    kids = children_with_scores(f, root, [[3], [3], [3]], [0.5, 0.5, 0.5])
    assert f.select_beam([kids[2], kids[1], kids[0]], 5, "last", True).tolist() == [kids[0]]
    assert f.select_beam([kids[2], kids[1]], 5, "last", True).tolist() == [kids[1]]


def test_select_beam_dedupe_needs_same_parent(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    p, q = children_with_scores(f, root, [[1], [2]], [0.5, 0.5])
    (x,) = children_with_scores(f, p, [[9]], [0.5])
    (y,) = children_with_scores(f, q, [[9]], [0.75])
    assert f.select_beam([x, y], 2, "last", True).tolist() == [y, x]


def test_select_beam_dedupe_zero_token_steps(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    kids = children_with_scores(f, root, [[], [], [0]], [0.25, 0.5, 0.75])
    assert f.select_beam(kids, 3, "last", True).tolist() == [kids[2], kids[1]]


# ----------------------------------------------------------------------------- select_dvts


def test_select_dvts_best_per_problem_and_subtree(impl):
    f = impl()
    roots = add_roots(f, [1, 1, 2, 1], [[1], [2], [3], [4]], [0, 1, 0, 0])
    a = children_with_scores(f, roots[0], [[1], [2]], [0.25, 0.5])  # problem 1, subtree 0
    b = children_with_scores(f, roots[1], [[1], [2]], [0.75, 0.5])  # problem 1, subtree 1
    c = children_with_scores(f, roots[2], [[1]], [0.25])  # problem 2, subtree 0
    d = children_with_scores(f, roots[3], [[1]], [1.0])  # problem 1, subtree 0 (second root)
    out = f.select_dvts(np.array([b[1], c[0], a[0], a[1], b[0]]), "last")
    assert_dtype(out, np.int32, 3)
    assert out.tolist() == [b[0], c[0], a[1]]  # groups: (1,1), (2,0), (1,0)
    assert f.select_dvts([a[0], d[0], a[1]], "last").tolist() == [d[0]]
    assert_dtype(f.select_dvts([], "min"), np.int32, 0)


def test_select_dvts_ties_and_how(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    p, q = children_with_scores(f, root, [[1], [2]], [0.9, 0.25])
    (x,) = children_with_scores(f, p, [[3]], [0.5])
    (y,) = children_with_scores(f, q, [[4]], [0.5])
    assert f.select_dvts([y, x], "last").tolist() == [x]  # tie: lower id
    assert f.select_dvts([y, x], "min").tolist() == [x]
    (z,) = children_with_scores(f, q, [[5]], [0.75])
    assert f.select_dvts([x, z], "last").tolist() == [z]
    assert f.select_dvts([x, z], "mean").tolist() == [x]  # 0.7 > 0.5


# ----------------------------------------------------------------------------- vote


def vote_forest(Forest):
    """Problem 1: root 0 with children 1..5; problem 2: root 6 with children 7..8."""
    f = Forest()
    add_roots(f, [1], [[1]])
    kids = children_with_scores(f, 0, [[1], [2], [3], [4], [5]], [0.25, 0.5, 0.75, 1.0, 0.25])
    add_roots(f, [2], [[2]])
    others = children_with_scores(f, 6, [[1], [2]], [0.5, 0.5])
    return f, kids, others


def test_vote_majority(impl):
    f, kids, _ = vote_forest(impl)
    f.set_answers(kids, [10, 20, 20, 30, 10])
    # 10: nodes 1, 5; 20: nodes 2, 3; 30: node 4 -> 10 and 20 tie at 2, 10 seen first
    check_vote(f.vote(kids, "majority"), [1], [10], [1], [2.0])
    # seen first in the input order: 20 (node 3) comes before 10 (node 5)
    check_vote(f.vote([3, 5, 4, 2, 1], "majority"), [1], [20], [3], [2.0])
    f.set_answers([4], [20])
    check_vote(f.vote([5, 4, 1, 3, 2], "majority"), [1], [20], [4], [3.0])  # node = first in input


def test_vote_majority_abstain_and_unstepped_voters(impl):
    f, kids, _ = vote_forest(impl)
    f.set_answers([0, 2, 3], [7, 8, 7])  # the root and nodes 2, 3 answer; 1, 4, 5 abstain
    check_vote(f.vote([1, 2, 3, 0, 4, 5], "majority"), [1], [7], [3], [2.0])


def test_vote_weighted(impl):
    f, kids, _ = vote_forest(impl)
    f.set_answers(kids, [10, 20, 20, 30, 10])
    # totals: 10 -> 0.25 + 0.25 = 0.5; 20 -> 0.5 + 0.75 = 1.25; 30 -> 1.0
    check_vote(f.vote(kids, "weighted"), [1], [20], [3], [1.25])
    check_vote(f.vote(kids, "weighted", "last"), [1], [20], [3], [1.25])
    check_vote(f.vote([1, 4, 5], "weighted"), [1], [30], [4], [1.0])


def test_vote_weighted_tie_goes_to_answer_seen_first(impl):
    f, kids, _ = vote_forest(impl)
    f.set_answers([1, 2, 5], [10, 20, 10])  # 10 -> 0.25 + 0.25 = 0.5, 20 -> 0.5
    check_vote(f.vote([1, 2, 5], "weighted"), [1], [10], [1], [0.5])
    check_vote(f.vote([2, 1, 5], "weighted"), [1], [20], [2], [0.5])
    # winner node: best-scored node of that answer, equal scores -> lower id
    check_vote(f.vote([5, 2, 1], "weighted"), [1], [10], [1], [0.5])


def test_vote_best(impl):
    f, kids, _ = vote_forest(impl)
    f.set_answers(kids, [10, 20, 20, 30, 10])
    check_vote(f.vote(kids, "best"), [1], [30], [4], [1.0])
    check_vote(f.vote([1, 2, 5], "best"), [1], [20], [2], [0.5])
    # 1 and 5 tie at 0.25: lower id wins whatever the input order
    check_vote(f.vote([5, 1], "best"), [1], [10], [1], [0.25])


def test_vote_best_tie_between_answers_goes_to_lower_id(impl):
    f, kids, _ = vote_forest(impl)
    f.set_answers([1, 5], [11, 55])
    check_vote(f.vote([5, 1], "best"), [1], [11], [1], [0.25])


def test_vote_agg_parameter(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    p, q = children_with_scores(f, root, [[1], [2]], [1.0, 0.25])
    (x,) = children_with_scores(f, p, [[3]], [0.25])  # path 1.0, 0.25
    (y,) = children_with_scores(f, q, [[4]], [0.5])  # path 0.25, 0.5
    f.set_answers([x, y], [100, 200])
    check_vote(f.vote([x, y], "best"), [1], [200], [y], [0.5])
    check_vote(f.vote([x, y], "best", "last"), [1], [200], [y], [0.5])
    check_vote(f.vote([x, y], "best", "min"), [1], [100], [x], [0.25])  # tie 0.25: lower id
    check_vote(f.vote([x, y], "best", "mean"), [1], [100], [x], [0.625])
    check_vote(f.vote([x, y], "best", "prod"), [1], [100], [x], [0.25])
    check_vote(f.vote([x, y], "weighted", agg="mean"), [1], [100], [x], [0.625])
    check_vote(f.vote([x, y], "weighted", agg="prod"), [1], [100], [x], [0.25])
    check_vote(f.vote([y, x], "weighted", agg="min"), [1], [200], [y], [0.25])
    # agg does not change a majority vote
    for agg in AGGREGATIONS:
        check_vote(f.vote([y, x], "majority", agg), [1], [200], [y], [1.0])


def test_vote_problem_without_answers(impl):
    f, kids, others = vote_forest(impl)
    f.set_answers([others[1]], [5])
    for how in ("majority", "weighted", "best"):
        out = f.vote([kids[0], others[0], others[1], kids[1]], how)
        check_vote(out, [1, 2], [NO_ANSWER, 5], [-1, others[1]], [0.0, 1.0 if how == "majority" else 0.5])
        out = f.vote([kids[2]], how)
        check_vote(out, [1], [NO_ANSWER], [-1], [0.0])


def test_vote_groups_in_first_appearance_order(impl):
    f, kids, others = vote_forest(impl)
    f.set_answers(kids + others, [1, 1, 2, 2, 2, 3, 3])
    out = f.vote([others[1], kids[0], others[0], kids[3]], "majority")
    check_vote(out, [2, 1], [3, 1], [others[1], kids[0]], [2.0, 1.0])


def test_vote_empty_input(impl):
    f, _, _ = vote_forest(impl)
    for how in ("majority", "weighted", "best"):
        check_vote(f.vote([], how), [], [], [], [])


def test_vote_negative_scores(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    kids = children_with_scores(f, root, [[1], [2], [3]], [-0.5, -0.25, -1.0])
    f.set_answers(kids, [1, 2, 1])
    check_vote(f.vote(kids, "best"), [1], [2], [kids[1]], [-0.25])
    check_vote(f.vote(kids, "weighted"), [1], [2], [kids[1]], [-0.25])  # 1 -> -1.5


def test_vote_finished_and_pruned_nodes_vote(impl):
    f, ids = build_standard_forest(impl)
    # problem 7: node 7 -> answer 7 (0.75), node 11 -> 42 (finished, last 0.5); problem 3: node 9 -> 42
    check_vote(f.vote([ids.active_leaf, ids.finished_deep, ids.finished], "best"), [7, 3], [7, 42], [7, 9], [0.75, 0.5])
    f.set_answers([ids.pruned], [42])
    check_vote(f.vote([ids.pruned, ids.finished], "majority"), [3], [42], [ids.pruned], [2.0])
    check_vote(f.vote([ids.finished, ids.pruned], "weighted"), [3], [42], [ids.pruned], [1.5])


# ----------------------------------------------------------------------------- input forms

INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.dtype(">i8")]


def as_form(values, form):
    values = list(values)
    if form == "list":
        return values
    if form == "tuple":
        return tuple(values)
    if form == "strided":  # every other element of a twice-as-long array
        a = np.full(2 * len(values), 99, dtype=np.int64)
        a[::2] = values
        return a[::2]
    if form == "reversed":
        return np.array(values[::-1], dtype=np.int64)[::-1]
    if form == "readonly":
        a = np.array(values, dtype=np.int64)
        a.setflags(write=False)
        return a
    return np.array(values, dtype=form)


FORMS = ["list", "tuple", "strided", "reversed", "readonly"] + INT_DTYPES


def run_scenario(Forest, conv):
    """Drive every entry point with integer inputs converted by ``conv``; return all outputs."""
    f = Forest()
    out = {}
    out["roots"] = f.add_roots(conv([7, 3]), conv([1, 0]), conv([1, 2, 3]), conv([0, 2, 3]))
    out["kids"] = f.expand(conv([0, 1]), conv([2, 1]))
    f.set_steps(conv([2, 3, 4]), conv([5, 5, 6]), conv([0, 1, 2, 3]), [0.5, 0.5, 0.75], conv([0, 1, 0]))
    (deep,) = f.expand(conv([2]), conv([1]))
    f.set_steps(conv([deep]), conv([8]), conv([0, 1]), [0.25], conv([0]))
    f.set_answers(conv([2, 3, 4, deep]), conv([1, 2, 2, 1]))
    ids = conv([0, 1, 2, 3, 4, deep])
    scored = conv([2, 3, 4, deep])
    out["nodes"] = f.nodes(ids)
    out["path_tokens"] = f.path_tokens(ids)
    out["step_tokens"] = f.step_tokens(ids)
    out["aggregate"] = [f.aggregate(scored, how) for how in AGGREGATIONS]
    out["beam"] = f.select_beam(scored, 2, "mean")
    out["beam_dedupe"] = f.select_beam(scored, 2, "mean", True)
    out["dvts"] = f.select_dvts(scored, "prod")
    out["votes"] = [f.vote(scored, how) for how in ("majority", "weighted", "best")]
    f.prune(conv([4]))
    out["status"] = f.nodes(ids)["status"]
    out["problem_nodes"] = f.problem_nodes(7)
    f.release_problem(3)
    out["problems"] = f.problems()
    return out


def test_scenario_expected_values(impl):
    out = run_scenario(impl, list)
    assert out["roots"].tolist() == [0, 1]
    assert out["kids"].tolist() == [2, 3, 4]
    assert tokens_of(out["path_tokens"]) == [[1, 2], [3], [1, 2, 5], [1, 2, 5], [3, 6], [1, 2, 5, 8]]
    assert out["aggregate"][3].tolist() == [0.5, 0.5, 0.75, 0.375]
    assert out["beam"].tolist() == [2, 3, 4]  # problem 7: 2 (0.5), 3 (0.5), 5 (0.375); problem 3: 4
    assert out["beam_dedupe"].tolist() == [2, 5, 4]  # 3 repeats 2's step under the same parent
    assert out["dvts"].tolist() == [2, 4]
    assert out["votes"][0]["answer_ids"].tolist() == [1, 2]
    assert out["status"].tolist() == [ACTIVE, ACTIVE, ACTIVE, FINISHED, PRUNED, ACTIVE]
    assert out["problems"].tolist() == [7]


@pytest.mark.parametrize("form", FORMS, ids=lambda form: form if isinstance(form, str) else np.dtype(form).str)
def test_integer_input_forms_give_identical_results(impl, form):
    expected = run_scenario(impl, lambda values: np.array(values, dtype=np.int64))
    actual = run_scenario(impl, lambda values: as_form(values, form))
    assert_same(actual, expected)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=lambda d: np.dtype(d).str)
def test_scalar_arguments_accept_numpy_integers(impl, dtype):
    f, ids = build_standard_forest(impl)
    scalar = np.dtype(dtype).type
    assert f.problem_nodes(scalar(3)).tolist() == [2, 8, 9]
    assert f.select_beam([ids.active_leaf, ids.finished], scalar(1), "last").tolist() == [7, 9]
    f.release_problem(scalar(3))
    assert f.problems().tolist() == [5, 7]


def test_bool_finished_input_forms(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    for finished in ([True, False, True], np.array([1, 0, 1], dtype=np.uint8), np.array([1, 9, 0, 9, 1, 9], dtype=np.int64)[::2],
                     np.array([True, True, False, False, True, True])[::2]):
        kids = expand(f, [root], [3])
        f.set_steps(kids, [], [0, 0, 0, 0], [0.5, 0.5, 0.5], finished)
        assert f.nodes(kids)["status"].tolist() == [FINISHED, ACTIVE, FINISHED]


def test_strided_float_scores(impl):
    f = impl()
    (root,) = add_roots(f, [1], [[1]])
    kids = expand(f, [root], [3])
    scores = np.array([0.25, np.nan, 0.5, np.nan, 0.75], dtype=np.float32)[::2]  # NaNs are skipped
    f.set_steps(kids, [], [0, 0, 0, 0], scores, [False] * 3)
    assert f.aggregate(kids, "last").tolist() == [0.25, 0.5, 0.75]
    assert math.isnan(f.nodes([root])["score"][0])


# ----------------------------------------------------------------------------- NaN and infinite aggregates
#
# Scores are finite, but a product can overflow to inf and then meet a 0 (inf * 0 = NaN).
# The specification: comparisons use the float64 aggregate, NaN ranks lowest (like -inf), and
# ties still go to the lower node id.


def overflow_forest(Forest):
    """Problem 1: root 0 and a chain of nine 1e38 steps (their product overflows to +inf),
    whose last node 9 has children 10, 11, 12 with scores 0 (prod NaN), -1 (prod -inf) and
    0.5 (prod +inf); a second root 13 of problem 1 has a child 14 with score -5."""
    f = Forest()
    path = chain(f, 1, [1], [[1]] * 9, [1e38] * 9)
    nan_node, minus_inf, plus_inf = children_with_scores(f, path[-1], [[1], [2], [3]], [0.0, -1.0, 0.5])
    low = chain(f, 1, [2], [[4]], [-5.0])[-1]
    assert (nan_node, minus_inf, plus_inf, low) == (10, 11, 12, 14)
    return f, SimpleNamespace(nan=nan_node, minus_inf=minus_inf, plus_inf=plus_inf, low=low)


def test_overflowing_products(impl):
    f, n = overflow_forest(impl)
    prod = f.aggregate([n.nan, n.minus_inf, n.plus_inf, n.low], "prod")
    assert_dtype(prod, np.float32, 4)
    assert np.isnan(prod[0])
    assert prod[1:].tolist() == [-np.inf, np.inf, -5.0]
    assert f.aggregate([n.nan], "min").tolist() == [0.0]
    assert f.aggregate([n.nan], "mean")[0] == f32(9e38 / 10)


def test_select_beam_nan_ranks_lowest(impl):
    f, n = overflow_forest(impl)
    out = f.select_beam([n.low, n.minus_inf, n.nan, n.plus_inf], 4, "prod")
    # +inf, then -5, then NaN and -inf tie below everything: lower id first
    assert out.tolist() == [n.plus_inf, n.low, n.nan, n.minus_inf]
    assert f.select_beam([n.nan, n.low], 1, "prod").tolist() == [n.low]
    assert f.select_beam([n.minus_inf, n.nan], 1, "prod").tolist() == [n.nan]


def test_select_dvts_nan_ranks_lowest(impl):
    f, n = overflow_forest(impl)
    assert f.select_dvts([n.nan, n.low], "prod").tolist() == [n.low]
    assert f.select_dvts([n.minus_inf, n.nan], "prod").tolist() == [n.nan]
    assert f.select_dvts([n.nan, n.low, n.plus_inf], "prod").tolist() == [n.plus_inf]


def test_vote_nan_ranks_lowest(impl):
    f, n = overflow_forest(impl)
    f.set_answers([n.nan, n.minus_inf, n.plus_inf, n.low], [1, 2, 3, 4])
    check_vote(f.vote([n.nan, n.low], "best", "prod"), [1], [4], [n.low], [-5.0])
    check_vote(f.vote([n.minus_inf, n.nan], "best", "prod"), [1], [1], [n.nan], [np.nan])
    check_vote(f.vote([n.nan, n.low], "weighted", "prod"), [1], [4], [n.low], [-5.0])
    # NaN and -inf totals tie at the bottom: the answer seen first wins
    check_vote(f.vote([n.minus_inf, n.nan], "weighted", "prod"), [1], [2], [n.minus_inf], [-np.inf])
    check_vote(f.vote([n.nan, n.minus_inf], "weighted", "prod"), [1], [1], [n.nan], [np.nan])
    # within the winning answer, the node with a NaN score ranks last
    f.set_answers([n.nan, n.low], [4, 4])
    check_vote(f.vote([n.nan, n.low], "weighted", "prod"), [1], [4], [n.low], [np.nan])
