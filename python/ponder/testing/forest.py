"""Helpers for the Forest tests: build small forests, snapshot a forest's whole observable
state and compare snapshots, so that a test can check "a call that raises changes nothing".

Every helper takes either implementation: ``ponder.twins.Forest`` (the pure-Python
specification) or ``ponder._core.Forest`` (the compiled core); ``IMPLS`` names both. Token
lists are lists of ints; ids come back as Python lists. The assertion helpers raise
``AssertionError`` naming the path of the first difference.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

import ponder._core
import ponder.twins

IMPLS = {"reference": ponder.twins.Forest, "core": ponder._core.Forest}
ACTIVE, FINISHED, PRUNED, NO_ANSWER = 0, 1, 2, -(2**63)
AGGREGATIONS = ("last", "min", "prod", "mean")
VOTES = ("majority", "weighted", "best")
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

NODE_FIELDS = {
    "parent": np.int32,
    "problem": np.int64,
    "subtree": np.int32,
    "depth": np.int32,
    "num_tokens": np.int32,
    "has_step": np.bool_,
    "score": np.float32,
    "status": np.int8,
    "answer": np.int64,
}



# ----------------------------------------------------------------------------- building


def csr(lists):
    """List of token lists -> (flat int64 tokens, int64 offsets), the CSR input format."""
    offsets = [0]
    for tokens in lists:
        offsets.append(offsets[-1] + len(tokens))
    flat = [t for tokens in lists for t in tokens]
    return np.array(flat, dtype=np.int64), np.array(offsets, dtype=np.int64)


def add_roots(forest, problems, prompts, subtrees=None):
    """add_roots with prompts given as a list of token lists; returns the ids as a list."""
    if subtrees is None:
        subtrees = [0] * len(problems)
    flat, offsets = csr(prompts)
    return forest.add_roots(
        np.array(problems, dtype=np.int64), np.array(subtrees, dtype=np.int64), flat, offsets
    ).tolist()


def expand(forest, parents, counts):
    return forest.expand(np.array(parents, dtype=np.int64), np.array(counts, dtype=np.int64)).tolist()


def set_steps(forest, ids, steps, scores, finished=None):
    """set_steps with steps given as a list of token lists (finished defaults to all False)."""
    if finished is None:
        finished = [False] * len(ids)
    flat, offsets = csr(steps)
    forest.set_steps(
        np.array(ids, dtype=np.int64),
        flat,
        offsets,
        np.array(scores, dtype=np.float64),
        np.array(finished, dtype=bool),
    )


def chain(forest, problem, prompt, steps, scores, subtree=0):
    """One root with a single path of stepped nodes below it; returns [root, n1, n2, ...]."""
    ids = add_roots(forest, [problem], [prompt], [subtree])
    for step, score in zip(steps, scores):
        (child,) = expand(forest, [ids[-1]], [1])
        set_steps(forest, [child], [step], [score])
        ids.append(child)
    return ids


def children_with_scores(forest, parent, steps, scores, finished=None):
    """Expand ``parent`` with one child per step and set those steps; returns the child ids."""
    kids = expand(forest, [parent], [len(steps)])
    set_steps(forest, kids, steps, scores, finished)
    return kids


def build_standard_forest(Forest):
    """A small forest with a node in every interesting state. Returns (forest, ids).

    id  node                                    step / score / state
    0   root, problem 7, subtree 0, prompt [1,2,3]
    1   root, problem 7, subtree 1, prompt [4]
    2   root, problem 3, subtree 0, prompt []
    3   root, problem 9                          (released)
    4   root, problem 5, prompt [3,3]            pruned
    5   child of 0                               [10]      0.5   active, has a stepped child (11)
    6   child of 0                               [11,12]   0.25  active, has an unstepped child (12)
    7   child of 1                               [10]      0.75  active leaf, answer 7
    8   child of 2                               []        1.0   pruned
    9   child of 2                               [13]      0.5   finished, answer 42
    10  child of 3                               [1]       0.5   (released)
    11  child of 5                               [14]      0.5   finished, answer 42
    12  child of 6                               no step         answer 1
    """
    f = Forest()
    roots = add_roots(f, [7, 7, 3, 9, 5], [[1, 2, 3], [4], [], [2], [3, 3]], [0, 1, 0, 0, 0])
    assert roots == [0, 1, 2, 3, 4]
    kids = expand(f, [0, 1, 2, 3], [2, 1, 2, 1])
    assert kids == [5, 6, 7, 8, 9, 10]
    set_steps(
        f,
        kids,
        [[10], [11, 12], [10], [], [13], [1]],
        [0.5, 0.25, 0.75, 1.0, 0.5, 0.5],
        [False, False, False, False, True, False],
    )
    assert expand(f, [5, 6], [1, 1]) == [11, 12]
    set_steps(f, [11], [[14]], [0.5], [True])
    f.prune(np.array([8, 4]))
    f.set_answers(np.array([9, 11, 7, 12]), np.array([42, 42, 7, 1]))
    f.release_problem(9)
    ids = SimpleNamespace(
        root=0,
        root_b=1,
        root_c=2,
        released=[3, 10],
        pruned_root=4,
        with_stepped_child=5,
        with_unstepped_child=6,
        active_leaf=7,
        pruned=8,
        finished=9,
        finished_deep=11,
        unstepped=12,
        never_given=13,
        far_never_given=1_000_000,
        ids_given=13,
    )
    return f, ids


# ----------------------------------------------------------------------------- snapshots


def spec_stats(forest) -> dict:
    """The counts of stats() that the specification defines (an implementation may add more)."""
    stats = forest.stats()
    return {key: stats[key] for key in ("live_nodes", "ids_given", "problems")}


def live_ids(forest) -> np.ndarray:
    """Every live node id, ascending (found through problems() and problem_nodes())."""
    parts = [np.asarray(forest.problem_nodes(int(p))) for p in forest.problems()]
    if not parts:
        return np.array([], dtype=np.int32)
    return np.sort(np.concatenate(parts))


def snapshot(forest) -> dict:
    """Everything observable about a forest, as plain values and numpy arrays."""
    ids = live_ids(forest)
    nodes = forest.nodes(ids)
    scored = ids[np.asarray(nodes["has_step"], dtype=bool)]
    problems = forest.problems()
    return {
        "num_nodes": forest.num_nodes,
        "len": len(forest),
        "stats": spec_stats(forest),
        "problems": problems,
        "problem_nodes": [forest.problem_nodes(int(p)) for p in problems],
        "ids": ids,
        "nodes": nodes,
        "path_tokens": forest.path_tokens(ids),
        "step_tokens": forest.step_tokens(ids),
        "aggregate": {how: forest.aggregate(scored, how) for how in AGGREGATIONS},
    }


def assert_same(actual, expected, path="value"):
    """Deep equality of results: arrays must agree in dtype, shape and values (NaN == NaN)."""
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{path}: expected an ndarray, got {type(actual)}"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        np.testing.assert_array_equal(actual, expected, err_msg=path, strict=True)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: expected a dict, got {type(actual)}"
        assert set(actual) == set(expected), f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)), f"{path}: expected a sequence, got {type(actual)}"
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def assert_unchanged_after_raise(forest, exc, match, fn, *args, **kwargs):
    """``fn(*args)`` must raise ``exc`` (message matching ``match``) and leave ``forest`` as it was."""
    import pytest

    before = snapshot(forest)
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    assert type(info.value) is exc, f"raised {type(info.value).__name__}, expected {exc.__name__}"
    assert_same(snapshot(forest), before, "forest after the failing call")
    return info


def assert_dtype(array, dtype, length=None):
    assert isinstance(array, np.ndarray), f"expected an ndarray, got {type(array)}"
    assert array.dtype == np.dtype(dtype), f"dtype {array.dtype} != {np.dtype(dtype)}"
    assert array.ndim == 1, f"expected a 1-D array, got shape {array.shape}"
    if length is not None:
        assert array.shape == (length,), f"shape {array.shape} != ({length},)"


def assert_node_dtypes(fields: dict, length: int):
    assert set(fields) == set(NODE_FIELDS)
    for name, dtype in NODE_FIELDS.items():
        assert_dtype(fields[name], dtype, length)


def int_input(data, values):
    """Integer input in a random form (hypothesis ``data``): a list or a numpy array of some
    dtype, maybe strided, so the bindings' zero-copy conversions all get exercised."""
    from hypothesis import strategies as st

    values = [int(v) for v in values]
    small = all(0 <= v < 2**15 for v in values)
    forms = ["list", "int64", "strided"] + (["int32", "uint16", "int16", "reversed"] if small else [])
    form = data.draw(st.sampled_from(forms), label="form")
    if form == "list":
        return values
    if form == "strided":
        a = np.zeros(2 * len(values), dtype=np.int64)
        a[::2] = values
        return a[::2]
    if form == "reversed":
        return np.array(values[::-1], dtype=np.int32)[::-1]
    return np.array(values, dtype=form)
