"""HFPRM's incremental scoring on tiny random models (``ponder.testing.tiny``, the ``dirs``
fixture of conftest), fully offline.

The oracle for every format is the *published usage* (``ponder.testing.prm_reference``): the
whole path rendered as text, tokenized at once and run through a plain (SDPA, no cache) model,
the score read at every step tag. Incremental scores must equal it step by step (fp32, 1e-4);
every token is computed once; a template that is not prefix-stable falls back to recomputing.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ponder.hf.prm import HFPRM
from ponder.protocols import PRM
from ponder.testing.prm_reference import reference_for as oracle
from ponder.testing.tiny import DELIMITED, QUESTIONS, STEPS

ATOL = 1e-4


def random_tree(rng, depth=3):
    """[(parent, child, step)] levels over roots 0 and 1 (branching 3, then 2 of the children)."""
    levels, frontier, nxt = [], [0, 1], 2
    for d in range(depth):
        level = []
        for p in frontier:
            for _ in range(3 if d == 0 else 2):
                level.append((p, nxt, DELIMITED[int(rng.integers(len(DELIMITED)))]))
                nxt += 1
        levels.append(level)
        frontier = [c for _, c, _ in level][::2]
    return levels


FORMAT_CASES = ["math-shepherd", "rlhflow", "qwen-prm", "qwen-prm-native", "implicit-prm"]


@pytest.mark.parametrize("case", FORMAT_CASES)
def test_incremental_scores_equal_full_path_scores(dirs, case):
    path, reference = oracle(case, dirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every child extends its parent's tokens: no recompute warning
        prm = HFPRM(path, kv_budget=4096, block_size=4)
        assert isinstance(prm, PRM)
        assert prm.format == case.replace("-native", "")
        questions = {0: QUESTIONS[0], 1: QUESTIONS[2]}
        root_tokens = {}
        for r, q in questions.items():  # one at a time to read each root's token count
            before = prm.stats()["tokens_scored"]
            prm.start([r], [q])
            root_tokens[r] = prm.stats()["tokens_scored"] - before
        paths = {r: (r, []) for r in questions}
        rng = np.random.default_rng(0)
        for level in random_tree(rng):
            parents, children, steps = zip(*level)
            scores = prm.score_steps(parents, children, steps)
            for p, c, s, got in zip(parents, children, steps, scores):
                root, prev = paths[p]
                paths[c] = (root, prev + [s])
                want = reference(questions[root], prev + [s])
                assert got == pytest.approx(want[-1], abs=ATOL)
                assert 0.0 < got < 1.0
        assert prm.stats()["full_reencodes"] == 0

        # Lookahead: the score of path + lookahead's last step; the new children's own paths
        # stay as they were (their children score correctly afterwards).
        leaves = [c for c in paths if len(paths[c][1]) == 3][:3]
        la = [[STEPS[1]], [STEPS[2], STEPS[4]], []]
        new = [500, 501, 502]
        steps = [STEPS[5], STEPS[6], STEPS[0]]
        got = prm.score_steps(leaves, new, steps, lookahead=la)
        for leaf, c, s, extra, g in zip(leaves, new, steps, la, got):
            root, prev = paths[leaf]
            paths[c] = (root, prev + [s])
            assert g == pytest.approx(reference(questions[root], prev + [s] + extra)[-1], abs=ATOL)
        got = prm.score_steps(new, [600, 601, 602], [STEPS[7]] * 3)
        for c, g in zip(new, got):
            root, prev = paths[c]
            assert g == pytest.approx(reference(questions[root], prev + [STEPS[7]])[-1], abs=ATOL)

    # Each root's question part is computed once; every child computes only its new tokens.
    st = prm.stats()
    assert st["tokens_scored"] > sum(root_tokens.values())
    prm.release(list(paths) + [600, 601, 602])
    assert prm.stats()["live_nodes"] == 0 and prm.stats()["kv_blocks_in_use"] == 0


def test_incremental_tokens_are_computed_once(dirs):
    """tokens_scored == question parts + for every child only the tokens its path adds to its
    parent's (measured on the reference tokenization of each path, cut after its last tag)."""
    prm = HFPRM(dirs["ms"], kv_budget=4096, block_size=4)
    tok = prm.tokenizer
    tag = tok.convert_tokens_to_ids(" ки")

    def cut_len(q, steps):  # reference token count up to and including the last tag
        ids = tok.encode((q + " " + "".join(steps)).replace("\n\n", " ки\n\n") + ("" if steps[-1].endswith("\n\n") else " ки"))
        return max(i for i, t in enumerate(ids) if t == tag) + 1

    prm.start([0, 99], [QUESTIONS[1], QUESTIONS[1]])  # the same question twice: computed once
    expected = prm.stats()["tokens_scored"]
    assert expected == len(tok.encode(QUESTIONS[1]))
    paths = {0: []}
    for level in random_tree(np.random.default_rng(3), depth=3):
        level = [x for x in level if x[0] in paths]
        parents, children, steps = zip(*level)
        prm.score_steps(parents, children, steps)
        for p, c, s in level:
            paths[c] = paths[p] + [s]
            prev = cut_len(QUESTIONS[1], paths[p]) if paths[p] else len(tok.encode(QUESTIONS[1]))
            expected += cut_len(QUESTIONS[1], paths[c]) - prev
    assert prm.stats()["tokens_scored"] == expected
    assert prm.stats()["full_reencodes"] == 0


def test_template_that_is_not_prefix_stable_falls_back_with_a_warning(dirs):
    path, reference = oracle("rlhflow-unstable", dirs)
    prm = HFPRM(path, format="rlhflow", kv_budget=4096, block_size=4)
    prm.start([0], [QUESTIONS[0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one turn pair: the "[2 turns]" header is the same as the root's
        got = prm.score_steps([0, 0], [1, 2], [STEPS[0], STEPS[3]])
    assert prm.stats()["full_reencodes"] == 0
    with pytest.warns(RuntimeWarning, match="prefix-stable"):  # a second turn pair rewrites the header
        got += prm.score_steps([1, 2], [3, 4], [STEPS[5], STEPS[1]])
    got += prm.score_steps([3], [5], [STEPS[2]], lookahead=[[STEPS[4]]])
    q = QUESTIONS[0]
    want = [reference(q, [STEPS[0]])[-1], reference(q, [STEPS[3]])[-1], reference(q, [STEPS[0], STEPS[5]])[-1],
            reference(q, [STEPS[3], STEPS[1]])[-1], reference(q, [STEPS[0], STEPS[5], STEPS[2], STEPS[4]])[-1]]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert prm.stats()["full_reencodes"] == 4


def test_prm_rejects_bad_calls(dirs):
    prm = HFPRM(dirs["ms"], kv_budget=1024)
    prm.start([0], QUESTIONS[:1])
    with pytest.raises(KeyError, match="not held"):
        prm.score_steps([9], [10], [STEPS[0]])
    with pytest.raises(ValueError, match="equal lengths"):
        prm.score_steps([0], [1, 2], [STEPS[0]])
    with pytest.raises(ValueError, match="already held"):
        prm.score_steps([0], [0], [STEPS[0]])
    with pytest.raises(ValueError, match="lookahead"):
        prm.score_steps([0], [1], [STEPS[0]], lookahead=[])
    assert 0 < prm.score_steps([0], [1], [STEPS[0]])[0] < 1
