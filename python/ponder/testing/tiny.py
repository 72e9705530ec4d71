"""Tiny random Hugging Face models, built from configs and saved: fully offline.

Tokenizers are byte-level BPEs trained here on a few math strings (``tokenizers``), wrapped in
``PreTrainedTokenizerFast`` with eos/pad, the PRM formats' tokens (" ки", "<extra_0>") and small
Llama-3 / Qwen style chat templates; models are random Llama / Qwen2 configs (hidden 64, 2
layers). Everything is saved with ``save_pretrained`` and loaded back by path.

Deterministic: the same call builds the same tokenizer (BPE training is deterministic) and the
same weights (each builder seeds torch itself: ``save_causal`` 0, ``save_token_classifier`` 1,
``save_process_reward_model`` 2, ``save_implicit_prm`` 3). Building a model resets torch's
global random state.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = [
    "CORPUS", "DELIMITED", "LLAMA_CHAT", "QUESTIONS", "QWEN_CHAT", "SPECIALS", "STEPS", "UNSTABLE_CHAT",
    "boost_lm_head", "load_plain_lm", "make_tokenizer", "save_causal", "save_implicit_prm", "save_process_reward_model",
    "save_small_vocab_lm", "save_test_models", "save_token_classifier", "tiny_config", "train_bpe",
]

LLAMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: Not prefix-stable: the header counts the turns, so adding a turn rewrites the start.
UNSTABLE_CHAT = "[{{ messages | length }} turns]" + LLAMA_CHAT
SPECIALS = ["<s>", "</s>", "<pad>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
            "<|im_end|>"]

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
#: Steps that can be followed by more steps end with the delimiter (the others end a solution).
DELIMITED = [s for s in STEPS if s.endswith("\n\n")]
CORPUS = QUESTIONS + STEPS + ["The answer is 19. So the result is 5 and x is 5."] * 3


# ----------------------------------------------------------------------------- tokenizers


def train_bpe(corpus=CORPUS, specials=SPECIALS, vocab_size: int = 360) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``corpus * 4`` (no prefix space, no
    post-processor), the ``specials`` first in its vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) * 4, trainer)
    return tok


def make_tokenizer(kind: str) -> transformers.PreTrainedTokenizerFast:
    """kinds: plain (BOS via post-processor, no template), ms (plain + " ки"), llama (Llama-3 style
    chat), unstable (non-prefix-stable chat), qwen (Qwen chat + <extra_0>), ambiguous (llama + " ки").
    bos ``<s>``, pad ``<pad>`` (id 2); eos ``<|im_end|>`` (qwen), ``<|eot_id|>`` (llama, unstable,
    ambiguous) or ``</s>``. ``ValueError`` for another kind."""
    kinds = ("plain", "ms", "llama", "unstable", "qwen", "ambiguous")
    if kind not in kinds:
        raise ValueError(f"tokenizer kind must be one of {kinds}, got {kind!r}")
    tok = train_bpe()
    if kind in ("plain", "ms"):
        bos = [("<s>", tok.token_to_id("<s>"))]
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=bos)
    eos = "<|im_end|>" if kind == "qwen" else ("<|eot_id|>" if kind in ("llama", "unstable", "ambiguous") else "</s>")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>")
    if kind in ("ms", "ambiguous"):
        fast.add_tokens([" ки"])
    if kind == "qwen":
        fast.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    templates = {"llama": LLAMA_CHAT, "unstable": UNSTABLE_CHAT, "ambiguous": LLAMA_CHAT, "qwen": QWEN_CHAT}
    fast.chat_template = templates.get(kind)
    return fast


# ----------------------------------------------------------------------------- models


def tiny_config(arch: str, vocab: int, eos: int, **extra):
    """A ``LlamaConfig`` (arch "llama": 2 KV heads) or ``Qwen2Config`` (any other arch: 1 KV
    head): hidden 64, intermediate 96, 2 layers, 4 heads, 1024 positions, pad id 2, untied
    embeddings; ``extra`` adds config fields."""
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=1024, eos_token_id=eos, pad_token_id=2, tie_word_embeddings=False, **extra)
    if arch == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    return transformers.Qwen2Config(num_key_value_heads=1, **common)


def boost_lm_head(model, tok, words=("Ġthe", "Ġis", "5"), seed: int = 1) -> None:
    """Make a few tokens (EOS, newlines, ``words``; words not in the vocabulary are skipped)
    dominate the random LM head (in place: weights x 0.05, those rows redrawn from
    ``seed``) so that sampled steps end at the delimiter, at EOS and by the limit, all
    reasonably often."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.lm_head.weight
        w.mul_(0.05)
        ids = {tok.eos_token_id, *tok.encode("\n", add_special_tokens=False),
               *tok.encode("\n\n", add_special_tokens=False)}
        ids |= {tok.convert_tokens_to_ids(t) for t in words}
        ids.discard(None)  # a word that is not in the vocabulary
        for i in sorted(ids):
            w[i] = torch.randn(w.shape[1], generator=g)


def save_causal(path, kind: str, arch: str, boost: bool = False):
    """A random causal LM (``tiny_config(arch)``, torch seed 0) with ``make_tokenizer(kind)``,
    saved to ``path``; ``boost``: ``boost_lm_head`` first (a policy that ends its steps).
    Returns ``path``."""
    tok = make_tokenizer(kind)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), tok.eos_token_id))
    if boost:
        boost_lm_head(model, tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_implicit_prm(path, reference_dir, beta=0.5):
    """A causal LM saved as an implicit PRM: its config names its reference (relative to its own
    directory, as ``ponder toy train`` writes it) and beta. The weights differ from the
    reference's (another seed), so the log-likelihood ratios are far from zero. Returns ``path``."""
    tok = make_tokenizer("llama")
    torch.manual_seed(3)
    cfg = tiny_config("llama", len(tok), tok.eos_token_id)
    cfg.implicit_prm = {"reference": os.path.relpath(reference_dir, path), "beta": beta}
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_token_classifier(path):
    """A Qwen2 token classifier (2 labels) with the qwen tokenizer: a qwen-prm checkpoint.
    Returns ``path``."""
    tok = make_tokenizer("qwen")
    torch.manual_seed(1)
    cfg = tiny_config("qwen2", len(tok), tok.eos_token_id, num_labels=2)
    model = transformers.AutoModelForTokenClassification.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_process_reward_model(path):
    """The released Qwen2.5-Math-PRM layout: decoder weights under ``model.``, a Linear-ReLU-Linear
    ``score`` head, architecture Qwen2ForProcessRewardModel (a class transformers lacks).
    Returns (``path``, the decoder, the head): the modules in eval mode, for a reference."""
    from safetensors.torch import save_file

    path = Path(path)
    tok = make_tokenizer("qwen")
    torch.manual_seed(2)
    cfg = tiny_config("qwen2", len(tok), tok.eos_token_id)
    base = transformers.AutoModel.from_config(cfg)
    head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    state = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()}
    state.update({f"score.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg.architectures = ["Qwen2ForProcessRewardModel"]
    # As released: auto_map names remote-code classes (whose files are absent here) -- HFPRM
    # must load the checkpoint without them.
    cfg.auto_map = {"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
                    "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"}
    cfg.save_pretrained(path)
    tok.save_pretrained(path)
    return path, base.eval(), head.eval()


def save_small_vocab_lm(path):
    """A Llama causal LM with a 64-token vocabulary and no tokenizer (a reference whose
    vocabulary does not match). Returns ``path``."""
    cfg = tiny_config("llama", 64, 1)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def load_plain_lm(path):
    """The causal LM at ``path`` as plain transformers loads it (fp32, eval, local files only)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def save_test_models(mktemp) -> dict:
    """Every tiny checkpoint the HF policy / PRM tests use, each in its own new directory
    ``mktemp(name)`` (e.g. pytest's ``tmp_path_factory.mktemp``). Keys: implicit, implicit_ref,
    policy_llama, policy_qwen2, policy_plain (boosted policies), ms (math-shepherd), rlhflow,
    unstable (rlhflow on a non-prefix-stable template), qwen_cls (token classifier), qwen_native
    (Qwen2ForProcessRewardModel layout) -> directory; native_modules -> (decoder, head) of
    qwen_native."""
    prm_native, base, head = save_process_reward_model(mktemp("native"))
    implicit_ref = save_causal(mktemp("implicit_ref"), "llama", "llama")
    return {
        "implicit": save_implicit_prm(mktemp("implicit"), implicit_ref),
        "implicit_ref": implicit_ref,
        "policy_llama": save_causal(mktemp("pol_llama"), "llama", "llama", boost=True),
        "policy_qwen2": save_causal(mktemp("pol_qwen2"), "qwen", "qwen2", boost=True),
        "policy_plain": save_causal(mktemp("pol_plain"), "plain", "llama", boost=True),
        "ms": save_causal(mktemp("ms"), "ms", "llama"),
        "rlhflow": save_causal(mktemp("rl"), "llama", "qwen2"),
        "unstable": save_causal(mktemp("unst"), "unstable", "llama"),
        "qwen_cls": save_token_classifier(mktemp("qcls")),
        "qwen_native": prm_native,
        "native_modules": (base, head),
    }
