"""HFPRM's incremental scores equal scoring the full path, for every format and every step text.

Tokenizers are built offline like Llama-3's and Qwen2's: a byte-level BPE behind their
pre-tokenizer regex (Qwen2: NFC first), trained here on a few strings, wrapped in
``PreTrainedTokenizerFast`` with a chat template that trims each message; models are tiny random
Llama / Qwen2 configs saved under the test's tmp directory. Such tokenizers merge text across
step boundaries (".\\n\\n" is one pre-token), which is what an incremental encoding gets wrong.

The oracle is the whole path written out as text (``HFPRM.render``, the published usage),
tokenized at once and run through the plain model without a cache; step k reads the score at its
marker (implicit-prm: sigmoid of beta times the log-ratio sum up to the end of step k's text,
the rendering of k steps cut at the end of the turn and encoded on its own).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ponder.baselines.recompute import RecomputePRM
from ponder.hf.prm import HFPRM, MATH_SHEPHERD_TAG, QWEN_STEP_SEP

# fp32 forward passes over different batch shapes: scores agree to well within this
ATOL = 2e-5
BETA = 0.5
QWEN2_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
QWEN2_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
            "<|im_end|>", QWEN_STEP_SEP]
CORPUS = [
    "What is 2 + 3? Compute 4 * 6 - 5.",
    "Add 2 and 3 to get 5.\n\nSo the answer is 5.\n\nThe answer is \\boxed{5}.",
    "Then x = 12 - 7 = 5.\n\nCheck: 5 + 7 = 12, which is right.\n\n  Let me think again.",
    "Café, naïve, π ≈ 3.14159; √2 ≈ 1.414, ∑ of 10 terms. 中文 数学 😀!",
]
QUESTIONS = ["What is 2 + 3?", "Compute 4 * 6 - 5.", "π ≈ ?"]
FORMATS = ("math-shepherd", "rlhflow", "qwen-prm", "implicit-prm")
KINDS = ("llama3", "qwen2")


# ----------------------------------------------------------------------------- builders


def make_tokenizer(kind: str) -> transformers.PreTrainedTokenizerFast:
    """A Llama-3 (``llama3``: BOS added by encode, its regex, trimming Llama-3 chat) or Qwen2
    (``qwen2``: NFC, its regex, trimming ChatML) style byte-level BPE with " ки" and <extra_0>."""
    tok = Tokenizer(models.BPE())
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
    pattern = QWEN2_PAT if kind == "qwen2" else LLAMA3_PAT
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=520, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    if kind == "llama3":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    eos = "<|eot_id|>" if kind == "llama3" else "<|im_end|>"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>")
    fast.add_tokens([MATH_SHEPHERD_TAG])
    fast.chat_template = LLAMA3_CHAT if kind == "llama3" else QWEN2_CHAT
    return fast


def _config(kind: str, tok, **extra):
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=2048, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **extra)
    return transformers.LlamaConfig(**common) if kind == "llama3" else transformers.Qwen2Config(**common)


def save_models(root, kind: str) -> dict[str, str]:
    """Directories of one tokenizer kind: ``causal`` (math-shepherd / rlhflow), ``token`` (a
    2-label token classifier for qwen-prm), ``implicit`` (a causal LM naming ``reference``)."""
    tok = make_tokenizer(kind)
    dirs = {name: root / f"{kind}_{name}" for name in ("causal", "token", "implicit", "reference")}
    for name, seed in (("causal", 0), ("reference", 1), ("implicit", 2)):
        torch.manual_seed(seed)
        cfg = _config(kind, tok)
        if name == "implicit":
            cfg.implicit_prm = {"reference": f"../{kind}_reference", "beta": BETA}
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():  # spread the random logits so scores are far from 0.5
            model.lm_head.weight.mul_(8.0)
        model.save_pretrained(dirs[name])
    torch.manual_seed(3)
    transformers.AutoModelForTokenClassification.from_config(_config(kind, tok, num_labels=2)).save_pretrained(dirs["token"])
    for d in dirs.values():
        tok.save_pretrained(d)
    return {k: str(v) for k, v in dirs.items()}


def _plain(path, token_head=False):
    cls = transformers.AutoModelForTokenClassification if token_head else transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


class FullPath:
    """The oracle: per-step scores of a whole path, from the plain model without a cache."""

    def __init__(self, prm: HFPRM, dirs: dict[str, str]) -> None:
        self.prm, self.tok, self.format = prm, prm.tokenizer, prm.format
        self.model = _plain(dirs[_DIR[prm.format]], token_head=prm.format == "qwen-prm")
        self.ref = _plain(dirs["reference"]) if prm.format == "implicit-prm" else None
        self.plus, self.minus = (self.tok.convert_tokens_to_ids(t) for t in ("+", "-"))

    @torch.inference_mode()
    def __call__(self, question: str, steps: list[str]) -> float:
        """The score of the last of ``steps`` (steps before it are its path)."""
        text = self.prm.render(question, steps)
        enc = self.tok.encode
        if self.format in ("math-shepherd", "qwen-prm"):  # the whole rendering, read at the last marker
            ids = enc(text, add_special_tokens=True)
            marker = self.tok.convert_tokens_to_ids(MATH_SHEPHERD_TAG if self.format == "math-shepherd" else QWEN_STEP_SEP)
            pos = [i for i, t in enumerate(ids) if t == marker]
            assert len(pos) == len(steps)
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, pos[-1]]
            if self.format == "math-shepherd":
                return logits[[self.plus, self.minus]].softmax(-1)[0].item()
            return logits.softmax(-1)[1].item()
        if self.format == "rlhflow":  # the turns of all steps, read at the position predicting the last "+"
            ids = enc(text, add_special_tokens=False)
            last = max(i for i, t in enumerate(ids) if t == self.plus)  # only the end of turn follows it
            return self.model(input_ids=torch.tensor([ids])).logits[0, last - 1, [self.plus, self.minus]].softmax(-1)[0].item()
        # implicit-prm: every token after the question part, up to the end of the assistant's text
        probe = self.prm.render(question, ["PONDERSTEPSENTINEL"])
        start = len(enc(probe[: probe.find("PONDERSTEPSENTINEL")].rstrip(), add_special_tokens=False))
        x = torch.tensor([enc(text[: text.rfind(self.tok.eos_token)], add_special_tokens=False)])
        ratio = (self.model(input_ids=x).logits[0].log_softmax(-1) - self.ref(input_ids=x).logits[0].log_softmax(-1)).double()
        per_token = ratio[:-1].gather(-1, x[0, 1:, None]).squeeze(-1)
        return 1.0 / (1.0 + math.exp(-BETA * per_token[start - 1 :].sum().item()))


_DIR = {"math-shepherd": "causal", "rlhflow": "causal", "qwen-prm": "token", "implicit-prm": "implicit"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny: one thread is fastest (and unaffected by a busy machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def prms(tmp_path_factory):
    """(kind, format) -> (a new HFPRM with the default settings, so no example inherits another's
    state; the oracle, built once)."""
    root = tmp_path_factory.mktemp("prm_incremental")
    dirs = {kind: save_models(root, kind) for kind in KINDS}
    oracles: dict[tuple[str, str], FullPath] = {}

    def get(kind: str, fmt: str) -> tuple[HFPRM, FullPath]:
        prm = HFPRM(dirs[kind][_DIR[fmt]], format=fmt, kv_budget=16384)
        if (kind, fmt) not in oracles:
            oracles[kind, fmt] = FullPath(prm, dirs[kind])
        oracles[kind, fmt].prm = prm
        return prm, oracles[kind, fmt]

    get.dirs = dirs
    return get


# ----------------------------------------------------------------------------- the seen bug


def test_implicit_prm_step_after_an_empty_step_reads_its_left_context(prms):
    """Llama-3 style: "So 5." then an empty step adds no text, so the next step's "\\n\\n" merges
    with the "." before it (".\\n\\n" is one token). A later child of the call must still be
    tokenized with that context, not as if its text stood alone."""
    prm, full = prms("llama3", "implicit-prm")
    q = QUESTIONS[0]
    prm.start([0], [q])
    try:
        prm.score_steps([0], [1], ["Add 2 and 3 to get 5."])
        prm.score_steps([1], [2], [""])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # lost reuse may be reported; scores must not change
            got = prm.score_steps([0, 2], [3, 4], ["So the answer is 5.", "The answer is \\boxed{5}."])
        want = [full(q, ["So the answer is 5."]), full(q, ["Add 2 and 3 to get 5.", "", "The answer is \\boxed{5}."])]
        assert got == pytest.approx(want, abs=ATOL)
    finally:
        prm.release(range(5))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_steps_that_add_no_text_keep_the_left_context(prms, kind, fmt):
    """The seen structure for every format and tokenizer, at every child position of a call:
    a step that is empty, whitespace or a combining accent after steps ending in punctuation
    (".\n\n" and "e" + U+0301 merge across the boundary), then ordinary steps below it."""
    prm, full = prms(kind, fmt)
    q = QUESTIONS[1]
    prm.start([0], [q])
    paths = {0: []}
    calls = [
        [(0, "So 5."), (0, "Café"), (0, "e")],
        [(1, ""), (2, "  \n\n"), (3, "\u0301 accent."), (1, "\n\n")],
        [(2, "x = 12 - 7."), (4, "The answer is \\boxed{5}."), (5, "So 5."), (6, "π ≈ 3."), (7, "")],
        [(4, ""), (8, "5"), (11, "e\u0301."), (12, "Add 2 and 3 to get 5.")],
    ]
    try:
        nxt = 1
        for level in calls:
            children = list(range(nxt, nxt + len(level)))
            nxt += len(level)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # lost reuse may be reported; scores must not change
                got = prm.score_steps([p for p, _ in level], children, [s for _, s in level])
            for (p, step), c, g in zip(level, children, got):
                paths[c] = paths[p] + [step]
                assert g == pytest.approx(full(q, paths[c]), abs=ATOL), paths[c]
    finally:
        prm.release(list(paths))


# ----------------------------------------------------------------------------- any step text

_CHARS = "abxyz ABZ 0123456789 .,;:!?+-=*/^()[]{}$\\ \n\t éπ√∑≈中文😀\u0301"
_PAD = st.sampled_from(["", " ", "  ", "\n", "\n\n", " \n\n", "\n\n\n", "\t", "\u3000"])
_END = st.sampled_from(["", ".", "?", ":", "!", ".\n", ". ", ",", "\u0301", "…", "5", ")"])
# Steps as a solver writes them (the corpus's words, so BPE merges them), ends that merge with
# what follows (". " and ".\n\n" are single pre-tokens; NFC joins a combining accent to the
# letter before it), and text made of anything.
_WORDS = st.sampled_from(["So 5", "Add 2 and 3 to get 5", "The answer is \\boxed{5}", "x = 12 - 7", "Café", "π ≈ 3",
                          "中文 数学", "e", "😀", "\u0301 accent", "5"])
STEP_TEXT = st.one_of(
    st.just(""),
    _PAD,
    st.builds(lambda a, body, end, b: a + body + end + b, _PAD, _WORDS, _END, _PAD),
    st.builds(lambda a, body, end, b: a + body + end + b, _PAD, st.text(_CHARS, max_size=24), _END, _PAD),
    st.builds(lambda a, body, end: a + body + end, _PAD, st.text(_CHARS, min_size=80, max_size=240), _END),
)
_IDS = iter(range(10**9))  # node ids are never reused across examples


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_incremental_scores_equal_full_path_scores(prms, kind, fmt, data):
    """Random trees of random step texts, scored a few children per call (lookahead on some):
    every score equals the full-path score of the node's path (plus its lookahead)."""
    prm, full = prms(kind, fmt)
    roots = data.draw(st.lists(st.sampled_from(QUESTIONS), min_size=1, max_size=2), label="questions")
    paths = {next(_IDS): (q, []) for q in roots}
    prm.start(list(paths), [q for q, _ in paths.values()])
    try:
        for _ in range(data.draw(st.integers(1, 5), label="calls")):
            nodes = list(paths)
            # later nodes more often, so paths get deep
            pick = st.one_of(st.sampled_from(nodes), st.sampled_from(nodes[-4:]))
            level = data.draw(st.lists(st.tuples(pick, STEP_TEXT), min_size=1, max_size=5), label="children")
            ahead = data.draw(st.lists(st.lists(STEP_TEXT, max_size=2), min_size=len(level), max_size=len(level)),
                              label="lookahead")
            children = [next(_IDS) for _ in level]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # lost reuse may be reported; scores must not change
                got = prm.score_steps([p for p, _ in level], children, [s for _, s in level], lookahead=ahead)
            for (p, step), c, extra, g in zip(level, children, ahead, got):
                q, prev = paths[p]
                paths[c] = (q, prev + [step])
                assert g == pytest.approx(full(q, prev + [step] + extra), abs=ATOL), (q, prev + [step] + extra)
    finally:
        prm.release(list(paths))
    assert prm.stats()["live_nodes"] == 0 and prm.stats()["kv_blocks_in_use"] == 0


# ----------------------------------------------------------------------------- whole solutions at once


def _chain(prm: HFPRM, q: str, steps: list[str]) -> list[float]:
    """Every step's score through score_steps, one call per step (the incremental path)."""
    ids = [next(_IDS) for _ in range(len(steps) + 1)]
    prm.start([ids[0]], [q])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return [prm.score_steps([ids[k]], [ids[k + 1]], [s])[0] for k, s in enumerate(steps)]
    finally:
        prm.release(ids)


def _score_paths(prm: HFPRM, questions: list[str], solutions: list[list[str]]) -> list[list[float]]:
    """score_paths from freshly started roots (released after); nothing else may stay held."""
    roots = [next(_IDS) for _ in questions]
    prm.start(roots, questions)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return prm.score_paths(roots, solutions)
    finally:
        prm.release(roots)
        st_ = prm.stats()
        assert st_["live_nodes"] == 0 and st_["kv_blocks_in_use"] == 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_score_paths_equals_step_by_step_on_merging_boundaries(prms, kind, fmt):
    """The seen structure (empty / whitespace / combining-accent steps that merge across a
    boundary) as whole solutions: score_paths gives every step the score score_steps gives it,
    and the oracle's; nothing is kept."""
    prm, full = prms(kind, fmt)
    questions = [QUESTIONS[1], QUESTIONS[1], QUESTIONS[0], QUESTIONS[1]]
    solutions = [["So 5.", "", "x = 12 - 7.", "The answer is \\boxed{5}."],
                 ["Café", "\u0301 accent.", "e\u0301.", "Add 2 and 3 to get 5."],
                 ["e", "  \n\n", "π ≈ 3.", "", "5"],
                 ["So 5."]]
    got = _score_paths(prm, questions, solutions)
    # the recompute baseline (plain full-path forwards, no cache) reads the same scores
    plain = RecomputePRM(prm)
    plain.start(list(range(len(questions))), questions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        baseline = plain.score_paths(list(range(len(questions))), solutions)
        baseline_steps = plain.score_steps([0, 3], [10, 11], ["So 5.", "Add 2 and 3 to get 5."])
    assert baseline_steps == pytest.approx([full(questions[0], ["So 5."]), full(questions[3], ["Add 2 and 3 to get 5."])],
                                           abs=ATOL)
    for q, steps, g, b in zip(questions, solutions, got, baseline):
        assert len(g) == len(steps)
        assert g == pytest.approx(_chain(prm, q, steps), abs=ATOL)
        assert g == pytest.approx([full(q, steps[: k + 1]) for k in range(len(steps))], abs=ATOL)
        assert b == pytest.approx(g, abs=ATOL)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_score_paths_equals_full_path_scores(prms, kind, fmt, data):
    """Random solutions of random step texts (some empty, questions repeated), and
    continuations of a scored node: every step score of score_paths equals the full-path
    score of its prefix; nothing is kept."""
    prm, full = prms(kind, fmt)
    n = data.draw(st.integers(1, 4), label="solutions")
    questions = data.draw(st.lists(st.sampled_from(QUESTIONS), min_size=n, max_size=n), label="questions")
    solutions = data.draw(st.lists(st.lists(STEP_TEXT, max_size=4), min_size=n, max_size=n), label="steps")
    got = _score_paths(prm, questions, solutions)
    assert [len(g) for g in got] == [len(s) for s in solutions]
    for q, steps, g in zip(questions, solutions, got):
        assert g == pytest.approx([full(q, steps[: k + 1]) for k in range(len(steps))], abs=ATOL), (q, steps)
    # from a scored node (not a root): its path + the continuation
    first, rest = data.draw(STEP_TEXT, label="first"), data.draw(st.lists(STEP_TEXT, min_size=1, max_size=3), label="rest")
    a, b = next(_IDS), next(_IDS)
    prm.start([a], [questions[0]])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            prm.score_steps([a], [b], [first])
            got = prm.score_paths([b, b], [rest, rest[:1]])
    finally:
        prm.release([a, b])
    want = [full(questions[0], [first, *rest[: k + 1]]) for k in range(len(rest))]
    assert got[0] == pytest.approx(want, abs=ATOL) and got[1] == pytest.approx(want[:1], abs=ATOL)


def test_score_paths_bad_arguments(prms):
    prm, _ = prms("llama3", "math-shepherd")
    prm.start([0], [QUESTIONS[0]])
    try:
        with pytest.raises(ValueError, match="node_ids has 1 entries but paths has 2"):
            prm.score_paths([0], [["a"], ["b"]])
        with pytest.raises(TypeError, match="paths\\[0\\] must be a sequence"):
            prm.score_paths([0], ["a step"])
        with pytest.raises(KeyError, match="not held"):
            prm.score_paths([7], [["a"]])
        assert prm.score_paths([], []) == [] and prm.score_paths([0], [[]]) == [[]]
    finally:
        prm.release([0])


@pytest.mark.parametrize("fmt", ["math-shepherd", "implicit-prm"])
def test_score_paths_fits_a_pool_smaller_than_all_solutions(prms, fmt):
    """score_paths keeps nothing, so it scores in chunks that fit the blocks free: eight
    solutions that need about four times the pool together (each fits alone) get the scores a
    large pool gives, and the pool is empty afterwards."""
    kind = KINDS[0]
    big, _ = prms(kind, fmt)
    questions = [QUESTIONS[0]] * 8
    solutions = [[f"Add {i} and 3 to get {i + 3}, then 7 more gives {i + 10}."] * 5 for i in range(8)]
    want = _score_paths(big, questions, solutions)
    bs = int(big.kv.block_size)
    row_blocks = -(-len(big.encode_full(big.render(questions[0], solutions[0]))) // bs) + 2
    small = HFPRM(prms.dirs[kind][_DIR[fmt]], format=fmt, kv_budget=2 * row_blocks * bs)
    assert 8 * (row_blocks - 2) > 3 * small.kv_free_blocks()  # all eight at once cannot fit
    got = _score_paths(small, questions, solutions)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5)
