"""HFPolicy and HFPRM on tiny random models, fully offline.

Tokenizers are byte-level BPEs trained here on a few math strings (``tokenizers``), wrapped in
``PreTrainedTokenizerFast`` with eos/pad, the PRM formats' tokens (" ки", "<extra_0>") and small
Llama-3 / Qwen style chat templates; models are random Llama / Qwen2 configs (hidden 64, 2
layers). Everything is saved with ``save_pretrained`` and loaded back by path.

The PRM oracle for every format is the *published usage*, written out independently here: the
whole path rendered as text, tokenized at once and run through a plain (SDPA, no cache) model,
the score read at every step tag. Incremental scores must equal it step by step (fp32, 1e-4).
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ponder.hf.policy import HFPolicy, sample_next
from ponder.hf.prm import HFPRM, detect_format
from ponder.protocols import PRM, Policy, SamplingParams

ATOL = 1e-4
LLAMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Not prefix-stable: the header counts the turns, so adding a turn rewrites the start.
UNSTABLE_CHAT = "[{{ messages | length }} turns]" + LLAMA_CHAT
SPECIALS = ["<s>", "</s>", "<pad>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]

QUESTIONS = [
    "What is 2 + 3?",
    "Compute 4 * 6 - 5.",
    "If x + 7 = 12, what is x?",
]
STEPS = [
    "Step 1: add 2 and 3 to get 5.\n\n",
    "We multiply 4 by 6 to get 24.\n\n",
    "Then subtract 5 from 24.\n\n",
    "So x = 12 - 7 = 5.\n\n",
    "The answer is \\boxed{5}.",
    "Check: 5 + 7 = 12, which is right.\n\n",
    "  Let me think again about it.\n\n",
    "Hence 24 - 5 = 19.",
]
# Steps that can be followed by more steps end with the delimiter (the others end a solution).
DELIMITED = [s for s in STEPS if s.endswith("\n\n")]
CORPUS = QUESTIONS + STEPS + ["The answer is 19. So the result is 5 and x is 5."] * 3


# ----------------------------------------------------------------------------- building blocks


def _base_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def make_tokenizer(kind: str):
    """kinds: plain (BOS via post-processor, no template), ms (plain + " ки"), llama (Llama-3 style
    chat), unstable (non-prefix-stable chat), qwen (Qwen chat + <extra_0>), ambiguous (llama + " ки")."""
    tok = _base_tokenizer()
    if kind in ("plain", "ms"):
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    eos = "<|im_end|>" if kind == "qwen" else ("<|eot_id|>" if kind in ("llama", "unstable", "ambiguous") else "</s>")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>")
    if kind in ("ms", "ambiguous"):
        fast.add_tokens([" ки"])
    if kind == "qwen":
        fast.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    fast.chat_template = {"llama": LLAMA_CHAT, "unstable": UNSTABLE_CHAT, "ambiguous": LLAMA_CHAT, "qwen": QWEN_CHAT}.get(kind)
    return fast


def _config(arch: str, vocab: int, eos: int, **extra):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=1024, eos_token_id=eos, pad_token_id=2, tie_word_embeddings=False, **extra)
    if arch == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    return transformers.Qwen2Config(num_key_value_heads=1, **common)


def _boost(model, tok, words=("Ġthe", "Ġis", "5")):
    """Make a few tokens (EOS, newlines, some words) dominate the random LM head so that sampled
    steps end at the delimiter, at EOS and by the limit, all reasonably often."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = model.lm_head.weight
        w.mul_(0.05)
        ids = {tok.eos_token_id, *tok.encode("\n", add_special_tokens=False), *tok.encode("\n\n", add_special_tokens=False)}
        ids |= {tok.convert_tokens_to_ids(t) for t in words}
        for i in sorted(ids):
            w[i] = torch.randn(w.shape[1], generator=g)


def save_causal(path, kind: str, arch: str, boost: bool = False):
    tok = make_tokenizer(kind)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(arch, len(tok), tok.eos_token_id))
    if boost:
        _boost(model, tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_implicit_prm(path, reference_dir, beta=0.5):
    """A causal LM saved as an implicit PRM: its config names its reference (relative to its own
    directory, as ``ponder toy train`` writes it) and beta. The weights differ from the
    reference's (another seed), so the log-likelihood ratios are far from zero."""
    tok = make_tokenizer("llama")
    torch.manual_seed(3)
    cfg = _config("llama", len(tok), tok.eos_token_id)
    cfg.implicit_prm = {"reference": os.path.relpath(reference_dir, path), "beta": beta}
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_token_classifier(path):
    tok = make_tokenizer("qwen")
    torch.manual_seed(1)
    cfg = _config("qwen2", len(tok), tok.eos_token_id, num_labels=2)
    model = transformers.AutoModelForTokenClassification.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_process_reward_model(path):
    """The released Qwen2.5-Math-PRM layout: decoder weights under ``model.``, a Linear-ReLU-Linear
    ``score`` head, architecture Qwen2ForProcessRewardModel (a class transformers lacks)."""
    from safetensors.torch import save_file

    tok = make_tokenizer("qwen")
    torch.manual_seed(2)
    cfg = _config("qwen2", len(tok), tok.eos_token_id)
    base = transformers.AutoModel.from_config(cfg)
    head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    state = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()}
    state.update({f"score.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg.architectures = ["Qwen2ForProcessRewardModel"]
    # As released: auto_map names remote-code classes (whose files are absent here) -- HFPRM
    # must load the checkpoint without them.
    cfg.auto_map = {"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig", "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"}
    cfg.save_pretrained(path)
    tok.save_pretrained(path)
    return path, base.eval(), head.eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    mk = tmp_path_factory.mktemp
    prm_native, base, head = save_process_reward_model(mk("native"))
    implicit_ref = save_causal(mk("implicit_ref"), "llama", "llama")
    return {
        "implicit": save_implicit_prm(mk("implicit"), implicit_ref),
        "implicit_ref": implicit_ref,
        "policy_llama": save_causal(mk("pol_llama"), "llama", "llama", boost=True),
        "policy_qwen2": save_causal(mk("pol_qwen2"), "qwen", "qwen2", boost=True),
        "policy_plain": save_causal(mk("pol_plain"), "plain", "llama", boost=True),
        "ms": save_causal(mk("ms"), "ms", "llama"),
        "rlhflow": save_causal(mk("rl"), "llama", "qwen2"),
        "unstable": save_causal(mk("unst"), "unstable", "llama"),
        "qwen_cls": save_token_classifier(mk("qcls")),
        "qwen_native": prm_native,
        "native_modules": (base, head),
    }


def plain_lm(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


# ----------------------------------------------------------------------------- policy


def check_well_formed(step, params, eos_ids, tok):
    delim = params.step_delimiter
    assert 1 <= len(step.tokens) <= params.max_step_tokens
    assert step.text == tok.decode([t for t in step.tokens if t not in eos_ids], skip_special_tokens=False)
    before = tok.decode(step.tokens[:-1], skip_special_tokens=False)
    assert delim not in before, "the step runs past its first delimiter"
    if step.eos:
        assert step.tokens[-1] in eos_ids and not step.truncated
        return "eos"
    assert not any(t in eos_ids for t in step.tokens)
    if step.truncated:
        assert len(step.tokens) == params.max_step_tokens and delim not in step.text
        return "truncated"
    assert delim in step.text
    return "delimiter"


def test_policy_steps_are_well_formed_and_roots_use_the_chat_template(dirs):
    policy = HFPolicy(dirs["policy_llama"], system_prompt="Be brief.", kv_budget=4096, block_size=8)
    assert isinstance(policy, Policy)
    tok = policy.tokenizer
    prompts = policy.start([0, 1], QUESTIONS[:2])
    for q, p in zip(QUESTIONS, prompts):
        text = tok.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        assert p == tok.encode(text, add_special_tokens=False) and p[0] == tok.bos_token_id
    params = SamplingParams(temperature=1.0, max_step_tokens=5, seed=0)
    steps = policy.sample_steps([0] * 12 + [1] * 12, list(range(2, 26)), params)
    kinds = {check_well_formed(s, params, policy.eos_ids, tok) for s in steps}
    assert kinds == {"eos", "truncated", "delimiter"}
    # A second level from unfinished children, then a rollout; stats add up.
    live = [2 + i for i, s in enumerate(steps) if not s.eos][:4]
    more = policy.sample_steps(live, [100, 101, 102, 103], params)
    for s in more:
        check_well_formed(s, params, policy.eos_ids, tok)
    rolled = policy.rollout([100, 101], 3, SamplingParams(temperature=0.0, max_step_tokens=5))
    for row in rolled:
        assert 1 <= len(row) <= 3 and all(not s.eos for s in row[:-1])
    generated = sum(len(s.tokens) for s in steps + more) + sum(len(s.tokens) for r in rolled for s in r)
    st = policy.stats()
    assert st["tokens_generated"] == generated
    assert st["num_parameters"] == sum(p.numel() for p in policy.model.parameters()) > 0
    # A delimiter several tokens long is found across token boundaries too.
    long_delim = SamplingParams(temperature=1.0, max_step_tokens=12, seed=3, step_delimiter=" the")
    for s in policy.sample_steps([100] * 6, list(range(200, 206)), long_delim):
        check_well_formed(s, long_delim, policy.eos_ids, tok)


def test_policy_is_deterministic_for_a_seed(dirs):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=5, max_step_tokens=6, seed=7)

    def run(seed):
        pol = HFPolicy(dirs["policy_llama"], kv_budget=2048)
        pol.start([0, 1], QUESTIONS[:2])
        a = pol.sample_steps([0, 0, 0, 1, 1, 1], [2, 3, 4, 5, 6, 7], SamplingParams(**{**params.__dict__, "seed": seed}))
        b = pol.sample_steps([2, 3, 5], [8, 9, 10], SamplingParams(**{**params.__dict__, "seed": seed}))
        return [(s.tokens, s.eos, s.truncated) for s in a + b]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sample_next_filters():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0.0), None), greedy)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=1.0, top_k=1), g), greedy)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=1.0, top_p=1e-6), g), greedy)
    # top_k = 3: only the three best tokens are ever drawn.
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(20):
        picked = sample_next(logits, SamplingParams(temperature=5.0, top_k=3), g)
        assert all(picked[i] in top3[i] for i in range(4))


@pytest.mark.parametrize("which", ["policy_llama", "policy_qwen2"])
def test_batched_greedy_equals_one_problem_at_a_time(dirs, which):
    greedy = SamplingParams(temperature=0.0, max_step_tokens=6)

    def run(pol, roots, problems):
        pol.start(roots, problems)
        first = pol.sample_steps([r for r in roots for _ in range(2)], [10 + 10 * r + k for r in roots for k in (1, 2)], greedy)
        second = pol.sample_steps([11 + 10 * r for r in roots], [13 + 10 * r for r in roots], greedy)
        rolled = pol.rollout([12 + 10 * r for r in roots], 2, greedy)
        key = lambda s: (s.tokens, s.text, s.eos, s.truncated)
        return {
            r: ([key(s) for s in first[2 * i : 2 * i + 2]], key(second[i]), [key(s) for s in rolled[i]])
            for i, r in enumerate(roots)
        }

    batched = run(HFPolicy(dirs[which], kv_budget=2048, block_size=4), [0, 1, 2], QUESTIONS)
    single = HFPolicy(dirs[which], kv_budget=2048, block_size=4)
    for r, q in enumerate(QUESTIONS):
        assert run(single, [r], [q])[r] == batched[r]
        # Siblings of a greedy expansion are identical.
        assert batched[r][0][0] == batched[r][0][1]


def test_prefilled_tokens_equal_the_unique_tokens_of_the_tree(dirs):
    pol = HFPolicy(dirs["policy_plain"], kv_budget=4096, block_size=4)
    tok = pol.tokenizer
    problems = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0]]  # root 2 repeats root 0's prompt: forked
    prompts = pol.start([0, 1, 2], problems)
    assert prompts[0] == tok.encode(QUESTIONS[0]) and prompts[0][0] == tok.bos_token_id  # no template: BOS added
    assert prompts[2] == prompts[0]
    assert pol.stats()["tokens_prefilled"] == len(prompts[0]) + len(prompts[1])
    params = SamplingParams(temperature=1.0, max_step_tokens=6, seed=1)
    a = pol.sample_steps([0, 0, 1, 2, 2], [3, 4, 5, 6, 7], params)
    b = pol.sample_steps([3, 3, 5], [8, 9, 10], params)
    c = pol.sample_steps([8], [11], params)
    steps = {3: a[0], 4: a[1], 5: a[2], 6: a[3], 7: a[4], 8: b[0], 9: b[1], 10: b[2], 11: c[0]}
    expanded = {3, 5, 8}
    # Every prompt token once, every step token once, except the last token of steps whose node
    # was never expanded (it was sampled but running it through the model is not needed yet).
    unique = len(prompts[0]) + len(prompts[1]) + sum(len(s.tokens) for s in steps.values())
    assert pol.stats()["tokens_prefilled"] == unique - (len(steps) - len(expanded))
    # A rollout from node 9 runs its pending token once, then each lookahead step but its last token.
    before = pol.stats()["tokens_prefilled"]
    rolled = pol.rollout([9], 3, SamplingParams(temperature=0.0, max_step_tokens=4))[0]
    assert pol.stats()["tokens_prefilled"] - before == 1 + sum(len(s.tokens) for s in rolled) - 1
    # Releasing everything returns every block to the pool (cached full blocks stay evictable).
    pol.release(list(range(12)))
    pol.release([3, 999])  # idempotent
    kv = pol.stats()
    assert kv["live_nodes"] == 0 and kv["kv_blocks_in_use"] == 0


def test_policy_rejects_bad_calls(dirs):
    pol = HFPolicy(dirs["policy_llama"], kv_budget=1024, max_steps_per_rollout=2)
    pol.start([0], QUESTIONS[:1])
    p = SamplingParams(temperature=0.0, max_step_tokens=3)
    with pytest.raises(KeyError, match="not held"):
        pol.sample_steps([5], [6], p)
    with pytest.raises(ValueError, match="already held"):
        pol.sample_steps([0], [0], p)
    with pytest.raises(ValueError, match="repeat"):
        pol.sample_steps([0, 0], [1, 1], p)
    with pytest.raises(ValueError, match="max_steps_per_rollout"):
        pol.rollout([0], 3, p)
    with pytest.raises(ValueError, match="max_step_tokens"):
        pol.sample_steps([0], [1], SamplingParams(max_step_tokens=0))
    with pytest.raises(ValueError, match="already held"):
        pol.start([0], QUESTIONS[:1])
    assert pol.sample_steps([0], [1], p)[0].tokens  # still usable


# ----------------------------------------------------------------------------- PRM oracles


@torch.inference_mode()
def ref_math_shepherd(model, tok, question, steps):
    """The model card / search-and-learn usage: blank-line delimiters become ' ки\\n\\n', a
    final tag is added, the whole text is encoded (BOS included) and scored at every tag."""
    text = (question + " " + "".join(steps)).replace("\n\n", " ки\n\n")
    if not text.endswith("\n\n"):
        text += " ки"
    ids = tok.encode(text)
    tag = tok.convert_tokens_to_ids(" ки")
    good, bad = tok.encode("+", add_special_tokens=False)[-1], tok.encode("-", add_special_tokens=False)[-1]
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    pos = [i for i, t in enumerate(ids) if t == tag]
    assert len(pos) == len(steps)
    return logits[pos][:, [good, bad]].softmax(-1)[:, 0].tolist()


@torch.inference_mode()
def ref_rlhflow(model, tok, question, steps):
    """search-and-learn's RLHFlow scoring: for every k the conversation of the first k steps is
    rendered and encoded in full; the score is read at position -3 (predicting the final '+')."""
    plus, minus = tok.encode("+", add_special_tokens=False)[-1], tok.encode("-", add_special_tokens=False)[-1]
    conv, out = [], []
    for k, s in enumerate(steps):
        piece = s.split("\n\n")[0]
        conv.append({"role": "user", "content": question + " " + piece if k == 0 else piece})
        conv.append({"role": "assistant", "content": "+"})
        ids = tok.encode(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)
        assert ids[-2] == plus
        logits = model(input_ids=torch.tensor([ids])).logits[0, -3, [plus, minus]]
        out.append(logits.softmax(-1)[0].item())
    return out


@torch.inference_mode()
def ref_qwen(score_fn, tok, question, steps, system="Please reason step by step, and put your final answer within \\boxed{}."):
    """The Qwen2.5-Math-PRM model card: system + user + assistant '<extra_0>'-joined steps,
    ``tokenizer.encode`` of the rendered string, softmax(logits)[1] at every <extra_0>."""
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": question},
        {"role": "assistant", "content": "<extra_0>".join(s.strip() for s in steps) + "<extra_0>"},
    ]
    ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
    sep = tok.encode("<extra_0>")[0]
    logits = score_fn(torch.tensor([ids]))[0]  # [T, 2]
    mask = torch.tensor(ids) == sep
    return logits[mask].softmax(-1)[:, 1].tolist()


@torch.inference_mode()
def ref_implicit(model, ref_model, tok, question, steps, beta=0.5):
    """EurusPRM's usage: the chat of the question and the "\n\n"-joined steps, per-token
    log pi - log pi_ref summed with coefficient beta from the first token after the question
    part. Step k reads the sum over the rendering of its first k steps cut at the end of the
    turn, encoded on its own (the same as slicing the whole path's sums wherever the cut is a
    token boundary). sigmoid of it for every step."""
    marker = "PONDERSTEPSENTINEL"
    probe = tok.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": marker}], tokenize=False)
    answer_start = len(tok.encode(probe[: probe.find(marker)].rstrip(), add_special_tokens=False))
    out = []
    for k in range(1, len(steps) + 1):
        text = tok.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": "\n\n".join(s.strip() for s in steps[:k])}],
            tokenize=False)
        x = torch.tensor([tok.encode(text[: text.rfind(tok.eos_token)], add_special_tokens=False)])
        ratio = (model(input_ids=x).logits[0].log_softmax(-1) - ref_model(input_ids=x).logits[0].log_softmax(-1)).double()
        per_token = ratio[:-1].gather(-1, x[0, 1:, None]).squeeze(-1)  # [T-1]: token t+1
        q = beta * per_token[answer_start - 1 :].sum().item()
        out.append(1.0 / (1.0 + math.exp(-q)))
    return out


def oracle(name, dirs):
    """(HFPRM directory, format, reference function(question, steps) -> per-step scores)."""
    if name == "math-shepherd":
        path = dirs["ms"]
        model, tok = plain_lm(path), transformers.AutoTokenizer.from_pretrained(path)
        return path, lambda q, s: ref_math_shepherd(model, tok, q, s)
    if name in ("rlhflow", "rlhflow-unstable"):
        path = dirs["rlhflow" if name == "rlhflow" else "unstable"]
        model, tok = plain_lm(path), transformers.AutoTokenizer.from_pretrained(path)
        return path, lambda q, s: ref_rlhflow(model, tok, q, s)
    if name == "implicit-prm":
        path = dirs["implicit"]
        model, ref, tok = plain_lm(path), plain_lm(dirs["implicit_ref"]), transformers.AutoTokenizer.from_pretrained(path)
        return path, lambda q, s: ref_implicit(model, ref, tok, q, s)
    if name == "qwen-prm":
        path = dirs["qwen_cls"]
        model = transformers.AutoModelForTokenClassification.from_pretrained(path, local_files_only=True).eval()
        tok = transformers.AutoTokenizer.from_pretrained(path)
        return path, lambda q, s: ref_qwen(lambda ids: model(input_ids=ids).logits, tok, q, s)
    path = dirs["qwen_native"]
    base, head = dirs["native_modules"]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return path, lambda q, s: ref_qwen(lambda ids: head(base(input_ids=ids).last_hidden_state), tok, q, s)


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


def save_small_vocab_lm(path):
    cfg = _config("llama", 64, 1)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


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
