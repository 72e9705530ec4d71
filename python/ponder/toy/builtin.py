"""The built-in models of ``builtin:arith``: their tokenizer, their configs and where they live.

Three real Hugging Face checkpoints ship in ``ponder/toy/models/`` (written by
``ponder toy train``, see ``ponder.toy.train``):

* ``builtin:policy-small`` -- a ~1M-parameter Llama, the policy whose test-time compute ponder
  scales;
* ``builtin:policy-large`` -- a ~5x larger Llama (twice the width, one more layer), the "bigger
  model" whose greedy accuracy search is compared with: grown from the small one (same function
  at first) and trained further on more data;
* ``builtin:prm`` -- an implicit PRM (format ``implicit-prm``, EurusPRM's: a Llama causal LM
  whose step score is sigmoid(beta * its log-likelihood ratio against ``builtin:policy-large``
  over the answer so far): the large policy trained further, at a fitted inverse temperature,
  with alpha and beta fitted on the small policy's own sampled solutions labelled exactly by
  :func:`ponder.toy.arith.label_steps`.

The tokenizer is a :class:`transformers.PreTrainedTokenizerFast` over a fixed vocabulary: every
printable ASCII character is a token, and a few frequent strings of the task (``" + "``,
``"\\n\\n"``, ``"The answer is \\boxed{"`` ...) are single tokens so solutions are short.
Digits are always single tokens (numbers are read and written digit by digit). The policies'
tokenizer has a chat template (``<s><|user|>question<|end|><|assistant|>``) and ends a solution
with ``<|end|>``; all three models share it (an implicit PRM reads the chat its reference reads).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "BUILTIN_MODELS",
    "MODELS_DIR",
    "STEP_TAG",
    "build_tokenizer",
    "builtin_model_path",
    "model_config",
    "resolve_model",
]

MODELS_DIR = Path(__file__).resolve().parent / "models"
#: the problems the shipped policies understand (builtin:arith's form)
PROBLEM_FORM = r"Compute [-+*() 0-9]+\."
#: builtin model name -> (directory under MODELS_DIR, what it is)
BUILTIN_MODELS = {
    "policy-small": "the small policy (~1M-parameter Llama)",
    "policy-large": "the larger policy (~5x the small one)",
    "prm": "the implicit PRM (format implicit-prm, reference policy-large; fitted on policy-small's samples)",
}
# The Math-Shepherd step tag (ponder.hf.prm.MATH_SHEPHERD_TAG): a token of the vocabulary the shipped
# models were trained with (an earlier PRM used that format), so it stays.
STEP_TAG = " ки"

SPECIAL_TOKENS = ["<pad>", "<s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Multi-character tokens of the task; longest first so the splitting regex prefers them.
WORD_TOKENS = ["The answer is \\boxed{", "Compute ", STEP_TAG, " + ", " - ", " * ", "}.", "\n\n", "(-"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

#: the three architectures (LlamaConfig keyword arguments besides the vocabulary)
ARCHITECTURES = {
    "policy-small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
    # twice the width (and heads, at the same head size) and one more layer: grown from
    # policy-small by ponder.toy.train.grow, then trained further
    "policy-large": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=5, num_attention_heads=8),
}
ARCHITECTURES["prm"] = ARCHITECTURES["policy-large"]  # trained further from the large policy
MAX_POSITIONS = 1024


def _vocabulary() -> list[str]:
    chars = [chr(c) for c in range(32, 127)] + ["\n", "к", "и"]
    return SPECIAL_TOKENS + WORD_TOKENS + chars


def build_tokenizer():
    """The task's tokenizer as a ``PreTrainedTokenizerFast``, shared by all three models: chat
    template ``<s><|user|>...<|end|><|assistant|>``, eos ``<|end|>``, digits always single
    tokens. Unknown characters become ``<unk>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # A word token that ends in a space must not take the space of a following step tag
    # ("4 + ки" is "4", " +", " ки"), or a cut-off step ending in " +" would lose its tag.
    alternatives = [re.escape(t) + ("(?!ки)" if t.endswith(" ") else "") for t in SPECIAL_TOKENS + WORD_TOKENS]
    pattern = "|".join(alternatives) + r"|[\s\S]"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(name: str, tokenizer):
    """The ``LlamaConfig`` of builtin model ``name`` for ``tokenizer``."""
    from transformers import LlamaConfig

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown builtin model {name!r}; choose from {', '.join(ARCHITECTURES)}")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **ARCHITECTURES[name],
    )


def builtin_model_path(name: str, models_dir: str | os.PathLike | None = None) -> Path:
    """The directory of builtin model ``name`` (``policy-small``, ``policy-large``, ``prm``).

    Raises ValueError for an unknown name and FileNotFoundError (saying how to make it) when
    the directory has no weights.
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; choose from " + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS))
    path = Path(models_dir) if models_dir is not None else MODELS_DIR
    path = path / name
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"builtin:{name} has no weights at {path}; this install lacks the shipped models. "
            f"Recreate them with `ponder toy train` (or reinstall ponder)"
        )
    return path


def resolve_model(spec: str | os.PathLike) -> str:
    """A ``--policy`` / ``--prm`` value as ``from_pretrained`` takes it: ``builtin:<name>``
    becomes the shipped directory; anything else (hub id, local path) is returned unchanged."""
    text = os.fspath(spec)
    if text.startswith("builtin:"):
        return str(builtin_model_path(text[len("builtin:") :]))
    return text


def is_builtin_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` (as ``resolve_model`` returns it) is one of the shipped models."""
    try:
        return Path(path).resolve().parent == MODELS_DIR
    except OSError:
        return False


def unlike_builtin_problems(problems) -> list[str]:
    """The problems (question texts) not of ``PROBLEM_FORM``: the shipped policies answer those
    no better than chance."""
    import re

    form = re.compile(PROBLEM_FORM)
    return [q for q in problems if not form.fullmatch(str(q).strip())]
