"""The PRM formats' specifics on tiny random models (``ponder.testing.tiny``, the ``dirs`` fixture
of conftest): format detection and its errors, the implicit PRM's loading (reference, beta) and
its recomputed and empty-step paths, scored as the published usage
(``ponder.testing.prm_reference``) scores them (fp32, 1e-4)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import transformers

from ponder.hf.prm import HFPRM, detect_format
from ponder.testing.prm_reference import reference_for as oracle
from ponder.testing.tiny import QUESTIONS, STEPS, make_tokenizer, save_causal, save_small_vocab_lm

ATOL = 1e-4


def test_implicit_prm_recomputed_paths_score_the_same(dirs):
    """A path whose tokens do not extend its parent's (this BPE writes the blank line after an
    empty step differently once a word follows) is recomputed from its question part (no parent
    tail to reuse): the scores stay those of the full-path reference."""
    path, reference = oracle("implicit-prm", dirs)
    prm = HFPRM(path, kv_budget=4096, block_size=4)
    assert prm.beta == 0.5 and prm.format == "implicit-prm"
    prm.start([0, 1], [QUESTIONS[0], QUESTIONS[0]])
    first = prm.score_steps([0, 1], [2, 3], ["\n\n", STEPS[3]])
    prm._logratio_batch_tokens = 7  # as a large vocabulary would: one or two rows per batch
    with pytest.warns(RuntimeWarning, match="not a token boundary"):
        second = prm.score_steps([2, 3, 2], [4, 5, 6], [STEPS[5], STEPS[1], STEPS[2]], lookahead=[[], [STEPS[4]], []])
    q = QUESTIONS[0]
    want = [reference(q, ["\n\n"])[-1], reference(q, [STEPS[3]])[-1], reference(q, ["\n\n", STEPS[5]])[-1],
            reference(q, [STEPS[3], STEPS[1], STEPS[4]])[-1], reference(q, ["\n\n", STEPS[2]])[-1]]
    np.testing.assert_allclose(first + second, want, atol=ATOL, rtol=0)
    assert prm.stats()["full_reencodes"] == 2  # the two children of the empty step
    both = sum(p.numel() for p in prm.model.parameters()) + sum(p.numel() for p in prm.ref_model.parameters())
    assert prm.stats()["num_parameters"] == both
    prm.release(range(7))
    assert prm.stats()["kv_blocks_in_use"] == 0


def test_implicit_prm_scores_empty_steps(dirs):
    """A step that is only whitespace adds at most its delimiter: no crash, and the scores
    stay those of the full-path reference (the step's tokens, if any, count)."""
    path, reference = oracle("implicit-prm", dirs)
    prm = HFPRM(path, kv_budget=4096, block_size=4)
    q = QUESTIONS[1]
    prm.start([0], [q])
    with warnings.catch_warnings():
        # this BPE splits a blank line differently once a word follows, so the children of an
        # empty first step are recomputed rather than forked (with a warning); scores stay exact
        warnings.simplefilter("ignore", RuntimeWarning)
        got = prm.score_steps([0, 0], [1, 2], ["\n\n", STEPS[1]])
        got += prm.score_steps([1, 2], [3, 4], [STEPS[2], "  \n\n"])
        got += prm.score_steps([4], [5], [STEPS[7]])
    want = [reference(q, ["\n\n"])[-1], reference(q, [STEPS[1]])[-1], reference(q, ["\n\n", STEPS[2]])[-1],
            reference(q, [STEPS[1], "  \n\n"])[-1], reference(q, [STEPS[1], "  \n\n", STEPS[7]])[-1]]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # a step that ends with the template's end-of-turn text is still found where it is
    prm.score_steps([2], [6], ["eot_id"])


def test_implicit_prm_loading_errors(dirs, tmp_path):
    # An explicit reference and beta override the checkpoint's.
    prm = HFPRM(dirs["implicit"], reference=dirs["implicit_ref"], beta=0.25, kv_budget=256)
    assert prm.beta == 0.25
    plain = save_causal(tmp_path / "plain_chat", "llama", "llama")
    with pytest.raises(ValueError, match="reference model: pass reference="):
        HFPRM(plain, format="implicit-prm")
    with pytest.raises(ValueError, match="vocabulary"):
        HFPRM(dirs["implicit"], reference=save_small_vocab_lm(tmp_path / "small"), kv_budget=256)
    with pytest.raises(ValueError, match="beta must be"):
        HFPRM(dirs["implicit"], beta=0.0, kv_budget=256)
    with pytest.raises(ValueError, match="'implicit-prm' only"):
        HFPRM(dirs["ms"], reference=dirs["implicit_ref"], kv_budget=256)
    with pytest.raises(ValueError, match="chat template"):
        HFPRM(dirs["ms"], format="implicit-prm", reference=dirs["implicit_ref"], kv_budget=256)


def test_auto_format_detection_and_its_errors(dirs, tmp_path):
    cfg = transformers.AutoConfig.from_pretrained
    tok = transformers.AutoTokenizer.from_pretrained
    assert detect_format(tok(dirs["ms"]), cfg(dirs["ms"])) == "math-shepherd"
    assert detect_format(tok(dirs["rlhflow"]), cfg(dirs["rlhflow"])) == "rlhflow"
    assert detect_format(tok(dirs["qwen_cls"]), cfg(dirs["qwen_cls"])) == "qwen-prm"
    assert detect_format(tok(dirs["qwen_native"]), cfg(dirs["qwen_native"])) == "qwen-prm"
    assert detect_format(tok(dirs["implicit"]), cfg(dirs["implicit"])) == "implicit-prm"
    # A Qwen chat tokenizer on a causal LM: the chat template + '+'/'-' read as rlhflow.
    assert detect_format(tok(dirs["policy_qwen2"]), cfg(dirs["policy_qwen2"])) == "rlhflow"
    with pytest.raises(ValueError, match="cannot tell"):
        detect_format(tok(dirs["policy_plain"]), cfg(dirs["policy_plain"]))
    amb = make_tokenizer("ambiguous")
    with pytest.raises(ValueError, match="math-shepherd.*rlhflow"):
        detect_format(amb, cfg(dirs["ms"]), "some/prm")
    assert detect_format(amb, cfg(dirs["ms"]), "peiyi9979/math-shepherd-x") == "math-shepherd"
    head_no_sep = transformers.Qwen2Config(architectures=["Qwen2ForTokenClassification"])
    with pytest.raises(ValueError, match="<extra_0>"):
        detect_format(tok(dirs["ms"]), head_no_sep)
    with pytest.raises(ValueError, match="cannot tell"):
        HFPRM(dirs["policy_plain"])
    with pytest.raises(ValueError, match="format must be"):
        HFPRM(dirs["ms"], format="orm")
