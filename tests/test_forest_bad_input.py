"""Bad inputs for every Forest entry point.

The specification (``ponder/twins/forest.py``): ids that were never given out or whose
problem was released raise ``IndexError``; every other bad argument raises ``ValueError``
whose message names the argument; a call that raises changes nothing. Every case here runs
against the standard forest of ``conftest.build_standard_forest`` on both implementations,
checks the exact exception type and the argument name in the message, and then compares a
snapshot of the whole forest with the one taken before the call.
"""

from __future__ import annotations

import numpy as np
import pytest

from ponder.testing.forest import (
    INT32_MAX,
    NO_ANSWER,
    assert_same,
    assert_unchanged_after_raise,
    build_standard_forest,
    snapshot,
)

NAN, INF = float("nan"), float("inf")


def name_re(name: str) -> str:
    """A regex that finds the argument name as a whole word (``offsets`` != ``prompt_offsets``)."""
    return rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9])"


def bad_int_arrays(n: int):
    """Inputs of length ``n`` (or size n) that are not a 1-D integer array."""
    values = list(range(1, n + 1))
    return [
        ("float64", np.array(values, dtype=np.float64)),
        ("float32", np.array(values, dtype=np.float32)),
        ("float-list", [float(v) for v in values]),
        ("bool", np.array([True] * n)),
        ("bool-list", [True] * n),
        ("str", np.array([str(v) for v in values])),
        ("str-list", ["x"] * n),
        ("object", np.array(values, dtype=object)),
        ("complex", np.array(values, dtype=np.complex128)),
        ("2d", np.array([values])),
        ("2d-column", np.array(values).reshape(n, 1)),
        ("0d", np.int64(values[0])),
        ("str-scalar", "12"),
    ]


def bad_float_arrays(n: int):
    """Inputs of length ``n`` (or size n) that are not a 1-D real array."""
    values = [0.5] * n
    return [
        ("bool", np.array([True] * n)),
        ("str", np.array(["0.5"] * n)),
        ("str-list", ["0.5"] * n),
        ("object", np.array(values, dtype=object)),
        ("complex", np.array(values, dtype=np.complex128)),
        ("2d", np.array([values])),
        ("0d", np.float64(0.5)),
    ]


# (label, id of a standard-forest ``ids`` namespace, exception): ids that are not live nodes.
# Ids within int32 that were never given out or were released raise IndexError; a value
# outside int32 cannot be a node id at all and is a bad argument (ValueError).
BAD_NODE_IDS = [
    ("negative", lambda ids: -1, IndexError),
    ("int32-min", lambda ids: -(2**31), IndexError),
    ("never-given", lambda ids: ids.never_given, IndexError),
    ("far-never-given", lambda ids: ids.far_never_given, IndexError),
    ("int32-max", lambda ids: INT32_MAX, IndexError),
    ("released-root", lambda ids: ids.released[0], IndexError),
    ("released-child", lambda ids: ids.released[1], IndexError),
    ("above-int32", lambda ids: 2**31, ValueError),
    ("below-int32", lambda ids: -(2**31) - 1, ValueError),
    ("int64-max", lambda ids: 2**63 - 1, ValueError),
]


# ----------------------------------------------------------------------------- case building
#
# A case is (method, build, exception, argument name); build(ids) returns the positional
# arguments. Each entry point has a valid base call; a case replaces one argument of it.

CASES = []


def case(label, method, build, exc, name):
    CASES.append(pytest.param(method, build, exc, name, id=f"{method}-{label}"))


def replace(base, index, value):
    """A build function: the base call with argument ``index`` replaced by ``value``."""

    def build(ids):
        args = list(base(ids))
        args[index] = value(ids) if callable(value) else value
        return tuple(args)

    return build


def id_cases(method, base, index, name, n):
    """Bad dtypes/shapes and bad ids for a node-id argument of length ``n``."""
    for label, value in bad_int_arrays(n):
        case(f"{name}-{label}", method, replace(base, index, value), ValueError, name)
    for label, bad_id, exc in BAD_NODE_IDS:
        # the bad id replaces the last of the base call's ids
        def value(ids, bad_id=bad_id):
            return list(base(ids)[index])[: n - 1] + [bad_id(ids)]

        case(f"{name}-{label}", method, replace(base, index, value), exc, name)


# ---- add_roots(problem_ids, subtree_ids, prompt_tokens_flat, prompt_offsets)
def add_roots_base(ids):
    return ([11, 12], [0, 1], [5, 6, 7], [0, 2, 3])


for index, name, n in [(0, "problem_ids", 2), (1, "subtree_ids", 2), (2, "prompt_tokens_flat", 3), (3, "prompt_offsets", 3)]:
    for label, value in bad_int_arrays(n):
        case(f"{name}-{label}", "add_roots", replace(add_roots_base, index, value), ValueError, name)
for label, value, index, name in [
    ("negative", [-1, 12], 0, "problem_ids"),
    ("above-int64", [2**63, 12], 0, "problem_ids"),
    ("uint64-above-int64", np.array([2**63, 12], dtype=np.uint64), 0, "problem_ids"),
    ("uint64-max", np.array([2**64 - 1, 12], dtype=np.uint64), 0, "problem_ids"),
    ("negative", [0, -1], 1, "subtree_ids"),
    ("above-int32", [0, 2**31], 1, "subtree_ids"),
    ("too-short", [0], 1, "subtree_ids"),
    ("too-long", [0, 1, 2], 1, "subtree_ids"),
    ("empty", [], 1, "subtree_ids"),
    ("negative", [5, -1, 7], 2, "prompt_tokens_flat"),
    ("above-int32", [5, 2**31, 7], 2, "prompt_tokens_flat"),
    ("uint32-above-int32", np.array([5, 2**31, 7], dtype=np.uint32), 2, "prompt_tokens_flat"),
    ("int8-negative", np.array([5, -1, 7], dtype=np.int8), 2, "prompt_tokens_flat"),
    ("far-above-int32", np.array([5, 2**40, 7]), 2, "prompt_tokens_flat"),
    ("too-short", [0, 3], 3, "prompt_offsets"),
    ("too-long", [0, 2, 3, 3], 3, "prompt_offsets"),
    ("empty", [], 3, "prompt_offsets"),
    ("not-from-0", [1, 2, 3], 3, "prompt_offsets"),
    ("decreasing", [0, 4, 3], 3, "prompt_offsets"),
    ("decreasing-below-0", [0, -1, 3], 3, "prompt_offsets"),
    ("short-end", [0, 2, 2], 3, "prompt_offsets"),
    ("long-end", [0, 2, 4], 3, "prompt_offsets"),
]:
    case(f"{name}-{label}", "add_roots", replace(add_roots_base, index, value), ValueError, name)
case("empty-with-bad-offsets", "add_roots", lambda ids: ([], [], [], [1]), ValueError, "prompt_offsets")
case("empty-with-no-offsets", "add_roots", lambda ids: ([], [], [], []), ValueError, "prompt_offsets")
case("empty-with-tokens", "add_roots", lambda ids: ([], [], [5], [0]), ValueError, "prompt_offsets")


# ---- expand(parent_ids, counts)
def expand_base(ids):
    return ([ids.root, ids.active_leaf], [2, 1])


id_cases("expand", expand_base, 0, "parent_ids", 2)
for label, node in [
    ("finished", "finished"),
    ("finished-deep", "finished_deep"),
    ("pruned", "pruned"),
    ("pruned-root", "pruned_root"),
    ("unstepped", "unstepped"),
]:
    case(
        f"parent_ids-{label}", "expand", replace(expand_base, 0, lambda ids, node=node: [ids.root, getattr(ids, node)]),
        ValueError, "parent_ids",
    )
for label, value in bad_int_arrays(2):
    case(f"counts-{label}", "expand", replace(expand_base, 1, value), ValueError, "counts")
for label, value in [
    ("negative", [2, -1]),
    ("above-int32", [2, 2**31]),
    ("too-short", [2]),
    ("too-long", [2, 1, 1]),
    ("empty", []),
]:
    case(f"counts-{label}", "expand", replace(expand_base, 1, value), ValueError, "counts")


# ---- set_steps(node_ids, tokens_flat, offsets, step_scores, finished)
def set_steps_base(ids):
    return ([ids.active_leaf, ids.unstepped], [1, 2, 3], [0, 2, 3], [0.5, 0.25], [False, True])


id_cases("set_steps", set_steps_base, 0, "node_ids", 2)
for label, build in [
    ("duplicate", lambda ids: [ids.unstepped, ids.unstepped]),
    ("duplicate-stepped", lambda ids: [ids.active_leaf, ids.active_leaf]),
    ("root", lambda ids: [ids.active_leaf, ids.root]),
    ("pruned-root", lambda ids: [ids.active_leaf, ids.pruned_root]),
    ("pruned", lambda ids: [ids.active_leaf, ids.pruned]),
    ("has-stepped-child", lambda ids: [ids.active_leaf, ids.with_stepped_child]),
    ("parent-after-child", lambda ids: [ids.unstepped, ids.with_unstepped_child]),
    ("first-bad", lambda ids: [ids.root, ids.unstepped]),
]:
    case(f"node_ids-{label}", "set_steps", replace(set_steps_base, 0, build), ValueError, "node_ids")
for label, value in bad_int_arrays(3):
    case(f"tokens_flat-{label}", "set_steps", replace(set_steps_base, 1, value), ValueError, "tokens_flat")
for label, value in [
    ("negative", [1, 2, -3]),
    ("above-int32", [1, 2, 2**31]),
    ("uint32-above-int32", np.array([1, 2, 2**31], dtype=np.uint32)),
    ("int16-negative", np.array([1, -2, 3], dtype=np.int16)),
]:
    case(f"tokens_flat-{label}", "set_steps", replace(set_steps_base, 1, value), ValueError, "tokens_flat")
for label, value in bad_int_arrays(3):
    case(f"offsets-{label}", "set_steps", replace(set_steps_base, 2, value), ValueError, "offsets")
for label, value in [
    ("too-short", [0, 3]),
    ("too-long", [0, 2, 3, 3]),
    ("empty", []),
    ("not-from-0", [1, 2, 3]),
    ("decreasing", [0, 4, 3]),
    ("negative", [0, -1, 3]),
    ("short-end", [0, 2, 2]),
    ("long-end", [0, 2, 4]),
]:
    case(f"offsets-{label}", "set_steps", replace(set_steps_base, 2, value), ValueError, "offsets")
for label, value in bad_float_arrays(2) + [
    ("nan", [0.5, NAN]),
    ("nan-float32", np.array([NAN, 0.5], dtype=np.float32)),
    ("inf", [INF, 0.5]),
    ("minus-inf", [0.5, -INF]),
    ("strided-nan", np.array([0.5, 0.0, NAN, 0.0])[::2]),
    ("too-short", [0.5]),
    ("too-long", [0.5, 0.5, 0.5]),
    ("empty", []),
]:
    case(f"step_scores-{label}", "set_steps", replace(set_steps_base, 3, value), ValueError, "step_scores")
for label, value in [
    ("float", np.array([0.0, 1.0])),
    ("float-half", [0.5, 0.0]),
    ("two", [2, 0]),
    ("minus-one", np.array([0, -1], dtype=np.int8)),
    ("str", np.array(["True", "False"])),
    ("object", np.array([True, False], dtype=object)),
    ("2d", np.array([[True, False]])),
    ("0d", np.bool_(True)),
    ("too-short", [False]),
    ("too-long", [False, False, False]),
    ("empty", []),
]:
    case(f"finished-{label}", "set_steps", replace(set_steps_base, 4, value), ValueError, "finished")


# ---- set_scores(node_ids, step_scores)
def set_scores_base(ids):
    return ([ids.with_stepped_child, ids.pruned, ids.finished_deep], [0.5, 0.25, 0.75])


id_cases("set_scores", set_scores_base, 0, "node_ids", 3)
for label, build in [
    ("duplicate", lambda ids: [ids.finished, ids.active_leaf, ids.finished]),
    ("root", lambda ids: [ids.active_leaf, ids.finished, ids.root]),
    ("pruned-root", lambda ids: [ids.active_leaf, ids.finished, ids.pruned_root]),
    ("unstepped", lambda ids: [ids.active_leaf, ids.finished, ids.unstepped]),
    ("first-bad", lambda ids: [ids.unstepped, ids.active_leaf, ids.finished]),
]:
    case(f"node_ids-{label}", "set_scores", replace(set_scores_base, 0, build), ValueError, "node_ids")
for label, value in bad_float_arrays(3) + [
    ("nan", [0.5, NAN, 0.5]),
    ("nan-float32", np.array([NAN, 0.5, 0.5], dtype=np.float32)),
    ("inf", [INF, 0.5, 0.5]),
    ("minus-inf", [0.5, 0.5, -INF]),
    ("strided-nan", np.array([0.5, 0.0, 0.5, 0.0, NAN, 0.0])[::2]),
    ("too-short", [0.5, 0.5]),
    ("too-long", [0.5, 0.5, 0.5, 0.5]),
    ("empty", []),
]:
    case(f"step_scores-{label}", "set_scores", replace(set_scores_base, 1, value), ValueError, "step_scores")


# ---- set_answers(node_ids, answer_ids)
def set_answers_base(ids):
    return ([ids.active_leaf, ids.root], [5, 6])


id_cases("set_answers", set_answers_base, 0, "node_ids", 2)
for label, value in bad_int_arrays(2):
    case(f"answer_ids-{label}", "set_answers", replace(set_answers_base, 1, value), ValueError, "answer_ids")
for label, value in [
    ("no-answer", [5, NO_ANSWER]),
    ("no-answer-int64", np.array([NO_ANSWER, 5], dtype=np.int64)),
    ("above-int64", [5, 2**63]),
    ("uint64-above-int64", np.array([5, 2**63], dtype=np.uint64)),
    ("too-short", [5]),
    ("too-long", [5, 6, 7]),
    ("empty", []),
]:
    case(f"answer_ids-{label}", "set_answers", replace(set_answers_base, 1, value), ValueError, "answer_ids")


# ---- prune(node_ids)
def prune_base(ids):
    return ([ids.active_leaf, ids.root],)


id_cases("prune", prune_base, 0, "node_ids", 2)


# ---- release_problem(problem_id) and problem_nodes(problem_id)
for method in ("release_problem", "problem_nodes"):
    for label, value in [
        ("unknown", 12345),
        ("released", 9),
        ("negative", -1),
        ("above-int64", 2**63),
        ("float", 7.0),
        ("numpy-float", np.float64(7)),
        ("bool", True),
        ("str", "7"),
    ]:
        case(f"problem_id-{label}", method, lambda ids, value=value: (value,), ValueError, "problem_id")


# ---- queries on node ids: nodes, path_tokens, step_tokens, aggregate, path_scores
for method in ("nodes", "path_tokens", "step_tokens"):
    id_cases(method, lambda ids: ([ids.root, ids.unstepped],), 0, "node_ids", 2)


def aggregate_base(ids):
    return ([ids.active_leaf, ids.finished_deep], "last")


BAD_HOWS = [("unknown", "median"), ("capitalized", "Last"), ("empty", ""), ("padded", "last "), ("vote-name", "majority")]
for method in ("aggregate", "path_scores"):
    id_cases(method, aggregate_base, 0, "node_ids", 2)
    for label, node in [("root", "root"), ("unstepped", "unstepped"), ("pruned-root", "pruned_root")]:
        case(
            f"node_ids-{label}", method,
            replace(aggregate_base, 0, lambda ids, node=node: [ids.active_leaf, getattr(ids, node)]), ValueError,
            "node_ids",
        )
    for label, value in BAD_HOWS:
        case(f"how-{label}", method, replace(aggregate_base, 1, value), ValueError, "how")


# ---- select_beam(candidate_ids, keep_per_problem, how, dedupe) and select_dvts(candidate_ids, how)
def beam_base(ids):
    return ([ids.active_leaf, ids.finished, ids.finished_deep], 1, "last", False)


def beam_dedupe_base(ids):
    return ([ids.active_leaf, ids.finished, ids.finished_deep], 1, "mean", True)


def dvts_base(ids):
    return ([ids.active_leaf, ids.finished, ids.finished_deep], "last")


CANDIDATE_STATE_CASES = [
    ("duplicate", lambda ids: [ids.active_leaf, ids.finished, ids.active_leaf]),
    ("root", lambda ids: [ids.active_leaf, ids.finished, ids.root]),
    ("unstepped", lambda ids: [ids.active_leaf, ids.finished, ids.unstepped]),
    ("pruned", lambda ids: [ids.active_leaf, ids.finished, ids.pruned]),
    ("pruned-root", lambda ids: [ids.active_leaf, ids.finished, ids.pruned_root]),
]
for method, base, how_index in [("select_beam", beam_base, 2), ("select_beam", beam_dedupe_base, 2), ("select_dvts", dvts_base, 1)]:
    prefix = "dedupe-" if base is beam_dedupe_base else ""
    id_cases(method, base, 0, "candidate_ids", 3)
    for label, build in CANDIDATE_STATE_CASES:
        case(f"{prefix}candidate_ids-{label}", method, replace(base, 0, build), ValueError, "candidate_ids")
    for label, value in BAD_HOWS:
        case(f"{prefix}how-{label}", method, replace(base, how_index, value), ValueError, "how")
for label, value in [
    ("negative", -1),
    ("above-int32", 2**31),
    ("float", 1.0),
    ("numpy-float", np.float32(1)),
    ("bool", True),
    ("str", "1"),
]:
    case(f"keep_per_problem-{label}", "select_beam", replace(beam_base, 1, value), ValueError, "keep_per_problem")


# ---- vote(node_ids, how, agg)
def vote_base(ids):
    return ([ids.active_leaf, ids.finished, ids.finished_deep, ids.root], "majority", "last")


for how in ("majority", "weighted", "best"):
    base = replace(vote_base, 1, how)
    id_cases("vote", base, 0, "node_ids", 4)
    case(
        f"{how}-node_ids-duplicate", "vote",
        replace(base, 0, lambda ids: [ids.active_leaf, ids.finished, ids.active_leaf]), ValueError, "node_ids",
    )
    for label, value in BAD_HOWS:
        case(f"{how}-agg-{label}", "vote", replace(base, 2, value), ValueError, "agg")
for label, value in [("unknown", "mode"), ("capitalized", "Majority"), ("empty", ""), ("aggregation-name", "mean")]:
    case(f"how-{label}", "vote", replace(vote_base, 1, value), ValueError, "how")
for how in ("weighted", "best"):  # an answered node needs a scored step unless the vote is a majority
    case(
        f"{how}-node_ids-answered-unstepped", "vote",
        lambda ids, how=how: ([ids.active_leaf, ids.unstepped], how, "last"), ValueError, "node_ids",
    )


# ----------------------------------------------------------------------------- the tests


@pytest.fixture
def standard(impl):
    return build_standard_forest(impl)


@pytest.mark.parametrize("method, build, exc, name", CASES)
def test_bad_input_raises_and_changes_nothing(standard, method, build, exc, name):
    forest, ids = standard
    assert_unchanged_after_raise(forest, exc, name_re(name), getattr(forest, method), *build(ids))


BASES = {
    "add_roots": add_roots_base,
    "expand": expand_base,
    "set_steps": set_steps_base,
    "set_scores": set_scores_base,
    "set_answers": set_answers_base,
    "prune": prune_base,
    "aggregate": aggregate_base,
    "path_scores": aggregate_base,
    "select_beam": beam_base,
    "select_beam-dedupe": beam_dedupe_base,
    "select_dvts": dvts_base,
    "vote-majority": vote_base,
    "vote-weighted": replace(vote_base, 1, "weighted"),
    "vote-best": replace(vote_base, 1, "best"),
    "nodes": lambda ids: ([ids.root, ids.unstepped],),
    "path_tokens": lambda ids: ([ids.root, ids.unstepped],),
    "step_tokens": lambda ids: ([ids.root, ids.unstepped],),
    "problem_nodes": lambda ids: (7,),
    "release_problem": lambda ids: (7,),
}


@pytest.mark.parametrize("key", list(BASES))
def test_base_calls_are_valid(standard, key):
    """Each bad case differs from a valid call in one argument: the base calls must succeed."""
    forest, ids = standard
    method = key.split("-")[0]
    getattr(forest, method)(*BASES[key](ids))


def test_every_entry_point_has_bad_input_cases():
    methods = {p.values[0] for p in CASES}
    assert methods == {
        "add_roots", "expand", "set_steps", "set_scores", "set_answers", "prune", "release_problem", "problem_nodes",
        "aggregate", "path_scores", "nodes", "path_tokens", "step_tokens", "select_beam", "select_dvts", "vote",
    }


def test_failed_call_in_a_batch_applies_no_earlier_entry(standard):
    """The first entries are valid, a later one is not: nothing of the call may show."""
    forest, ids = standard
    fields = forest.nodes([ids.unstepped])
    assert not fields["has_step"][0]
    calls = [
        (ValueError, "node_ids", forest.set_steps, [ids.unstepped, ids.active_leaf, ids.root], [1, 2, 3], [0, 1, 2, 3], [0.5] * 3, [False] * 3),
        (ValueError, "step_scores", forest.set_steps, [ids.unstepped, ids.active_leaf], [1, 2], [0, 1, 2], [0.5, NAN], [True, True]),
        (IndexError, "node_ids", forest.set_steps, [ids.unstepped, ids.released[1]], [1, 2], [0, 1, 2], [0.5, 0.5], [True, True]),
        (ValueError, "node_ids", forest.set_scores, [ids.with_stepped_child, ids.finished, ids.unstepped], [0.1] * 3),
        (ValueError, "step_scores", forest.set_scores, [ids.with_stepped_child, ids.finished], [0.1, INF]),
        (IndexError, "node_ids", forest.set_scores, [ids.with_stepped_child, ids.released[1]], [0.1, 0.1]),
        (ValueError, "parent_ids", forest.expand, [ids.root, ids.active_leaf, ids.finished], [1, 1, 1]),
        (IndexError, "parent_ids", forest.expand, [ids.root, ids.released[0]], [3, 1]),
        (ValueError, "counts", forest.expand, [ids.root, ids.active_leaf], [3, -1]),
        (IndexError, "node_ids", forest.set_answers, [ids.active_leaf, ids.root, -1], [1, 2, 3]),
        (ValueError, "answer_ids", forest.set_answers, [ids.active_leaf, ids.root], [1, NO_ANSWER]),
        (IndexError, "node_ids", forest.prune, [ids.active_leaf, ids.root, ids.never_given]),
        (ValueError, "prompt_tokens_flat", forest.add_roots, [1, 2], [0, 0], [1, -2], [0, 1, 2]),
    ]
    for exc, name, fn, *args in calls:
        assert_unchanged_after_raise(forest, exc, name_re(name), fn, *args)


def test_forest_still_works_after_many_failures(standard):
    forest, ids = standard
    for param in CASES:
        method, build, exc, name = param.values
        with pytest.raises(exc):
            getattr(forest, method)(*build(ids))
    fresh, _ = build_standard_forest(type(forest))
    assert_same(snapshot(forest), snapshot(fresh))
    # and it keeps handing out ids where it left off
    kids = forest.expand([ids.active_leaf], [2])
    assert kids.tolist() == [ids.ids_given, ids.ids_given + 1]
