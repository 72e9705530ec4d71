"""``HFPRM``: a Hugging Face process reward model scored incrementally on a paged KV cache.

The three popular PRM input formats (``/work/shared/design.md``) are all causal: the score of
step k depends only on the tokens up to step k's tag. So the PRM keeps one
:class:`ponder.hf.kv.PagedKVCache` sequence per node holding *the PRM's input* for that node's path,
and scoring a child runs only the new step's tokens on a fork of the parent's sequence (the
reference implementation, search-and-learn, rescores the whole prefix every step: O(depth^2)).

Formats (``format=``):

* ``"math-shepherd"`` (peiyi9979/math-shepherd-mistral-7b-prm): ``question + " " + step_1 + " ки"
  + step_2 + " ки" ...``; a step's trailing whitespace (its delimiter) goes after its tag, as in
  search-and-learn (``"\\n\\n"`` -> ``" ки\\n\\n"``). Score: softmax over the logits of the good
  / bad tokens ``"+"`` / ``"-"`` at the tag position, P(good). The tokenizer's own special
  tokens (BOS) are added, as ``tokenizer.encode`` does in the model card.
* ``"rlhflow"`` (RLHFlow/Llama3.1-8B-PRM-*): a chat rendered with the tokenizer's chat template:
  user turn ``question + " " + step_1``, assistant ``"+"``, user ``step_2``, assistant ``"+"``, ...
  (a step's trailing whitespace, i.e. its delimiter, is dropped, as search-and-learn splits on
  it; the Llama-3 template trims each turn anyway). Score:
  softmax over {"+", "-"} at the position predicting the assistant's "+", P("+").
* ``"qwen-prm"`` (Qwen/Qwen2.5-Math-PRM-7B): chat template with an optional system message
  (default: Qwen's "Please reason step by step, ..."), the question as user message and
  ``step_1<extra_0>step_2<extra_0>...`` as the assistant message (steps stripped of surrounding
  whitespace, like the list of steps of the model card). The model has a 2-logit head
  per token; score: softmax(head logits)[1] at each ``<extra_0>``. Supported checkpoints: a
  ``*ForTokenClassification`` model with ``num_labels=2`` (e.g. ``Qwen2ForTokenClassification``,
  head ``score``), or the released ``Qwen2ForProcessRewardModel`` layout (decoder weights under
  ``model.``, head ``score.0`` / ``score.2`` = Linear-ReLU-Linear) loaded *without* remote code:
  the decoder through ``AutoModel`` (native class of ``model_type``), the head read from the
  safetensors files; or with ``trust_remote_code=True`` the checkpoint's own class (it must
  expose ``.model`` and ``.score``).

* ``"implicit-prm"`` (PRIME-RL/EurusPRM-Stage1/-Stage2, arXiv 2412.01981): a causal LM
  pi_theta trained as an outcome reward model whose reward is ``beta * log pi_theta(y) /
  pi_ref(y)`` against a *reference* causal LM pi_ref with the same vocabulary. Input: the chat
  template with the question as user message and ``"\n\n".join(steps)`` (stripped) as the
  assistant message, as the model card's usage. Score of step k: sigmoid(q_k) with
  ``q_k = beta * sum log pi_theta(y_t | y_<t) - log pi_ref(y_t | y_<t)`` over every token
  after the question part up to the end of step k (the implicit Q value; sigmoid(q_n) is the
  ORM's P(correct)). The reference and beta come from ``reference=`` / ``beta=``, else from
  the checkpoint's ``config.json`` key ``"implicit_prm": {"reference": ..., "beta": ...}``
  (a relative reference path is taken relative to the PRM's directory; beta defaults to
  0.001, the model card's coefficient). The reference model runs over the same KV block
  tables (:meth:`ponder.hf.kv.PagedKVCache.companion`); each node keeps its q, its per-token
  log-ratio sums and the log-ratio row of its last position, so a child runs only its new
  tokens through both models (a child whose boundary merged tokens: from the shared prefix on).

How a path is turned into tokens incrementally (and checked):

* ``render(question, steps)`` is the full reference text of a path. A node's *text* is that
  rendering cut right after its last step's marker (" ки", "+", "<extra_0>"): whatever the
  template appends after it (end-of-turn tokens, trailing whitespace) belongs to the next step;
  implicit-prm has no marker: its node text ends with the last step's text.
  A root's text is the rendering cut before the first step (trailing whitespace left to the
  step, because BPE tokenizers attach a space to the following word).
* A path's tokens are always the tokenization of its whole text (``encode_full``, batched over
  the children of a call), so its scores are those of the full path whatever the tokenizer
  merges across a step boundary (an empty or whitespace-only step, a "." followed by a blank
  line that BPE writes as one token, a combining accent that NFC joins to the previous
  character). Only the model's work is incremental: a child whose tokens extend its parent's
  forks the parent's sequence and runs the new tokens; any other child (the boundary merged, or
  the template is not *prefix-stable*: rendering k+1 steps does not start with the rendering
  of k) starts a new sequence over the cached full blocks of its longest equal prefix (counted
  in ``stats()["full_reencodes"]``, warned once per cause). Scores stay exact either way.

Marker formats take the model's logits only at the scored positions (``logits_to_keep``),
never a vocabulary-sized row per new token; implicit-prm needs the log-probability of every
new token under both models, so it takes every new position's logits (batched as for prefill).
"""

from __future__ import annotations

import abc
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from ..protocols import check_score_steps_args
from .kv import ATTN_IMPLEMENTATION
from .kv_fallback import cache_for_model, with_companion
from .policy import (
    _PREFILL_BATCH_TOKENS,
    _check_new_ids,
    _hub_kwargs,
    _model_stats,
    default_device,
    load_tokenizer,
    resolve_dtype,
    resolve_model_ref,
)

__all__ = [
    "FORMATS",
    "HFPRM",
    "IMPLICIT_PRM_BETA",
    "MATH_SHEPHERD_TAG",
    "QWEN_PRM_SYSTEM",
    "QWEN_STEP_SEP",
    "TokenScoreModel",
    "detect_format",
]

FORMATS = ("math-shepherd", "rlhflow", "qwen-prm", "implicit-prm")
MATH_SHEPHERD_TAG = " ки"
QWEN_STEP_SEP = "<extra_0>"
# EurusPRM's model card scales the log-likelihood ratio by this coefficient.
IMPLICIT_PRM_BETA = 0.001
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# Bounds the [tokens, vocab] float32 log-probability rows one implicit-PRM batch materialises
# per model (1 GiB): a 150k vocabulary gets ~1.7k new tokens a batch, the toy one the default.
_LOGRATIO_ELEMENTS = 1 << 28
# Stands for step text when locating where the first step starts in a rendering.
_SENTINEL = "PONDERSTEPSENTINEL"


# ----------------------------------------------------------------------------- token probes


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _tag_token(tokenizer, tag: str) -> int | None:
    """The id of ``tag`` when, written after some text, it is one token of its own."""
    ids = _ids(tokenizer, "x" + tag)
    if len(ids) < 2:
        return None
    last = tokenizer.decode(ids[-1:], clean_up_tokenization_spaces=False)
    head = tokenizer.decode(ids[:-1], clean_up_tokenization_spaces=False)
    return ids[-1] if last.strip() == tag.strip() and head.strip() == "x" else None


def _single_token(tokenizer, text: str) -> int | None:
    """The id of ``text`` when it encodes to exactly one token."""
    ids = _ids(tokenizer, text)
    return ids[0] if len(ids) == 1 else None


def _leading_special(tokenizer) -> list[int]:
    """The tokens ``encode(add_special_tokens=True)`` puts *before* the text (BOS); trailing
    ones (an EOS some tokenizers append) would break the concatenation of segments."""
    with_sp = list(tokenizer.encode("x y", add_special_tokens=True))
    plain = _ids(tokenizer, "x y")
    for k in range(len(with_sp) - len(plain) + 1):
        if with_sp[k : k + len(plain)] == plain:
            return with_sp[:k]
    return []


def detect_format(tokenizer, config: Any = None, name: str = "") -> str:
    """Pick the PRM format from the tokenizer and the model config.

    * ``config.implicit_prm`` present (written by ponder's trainer) -> ``"implicit-prm"`` (an
      implicit PRM is a plain causal LM: without that key pass ``format="implicit-prm"``);
    * a 2-logit token head (architecture ``*ForTokenClassification`` / ``*ProcessRewardModel``)
      and a single-token ``<extra_0>`` -> ``"qwen-prm"``;
    * " ки" is a token of its own and there is no chat template -> ``"math-shepherd"``;
    * a chat template and single-token "+" / "-" and no " ки" token -> ``"rlhflow"``;
    * both (large multilingual vocabularies may hold " ки"): decided by the model name
      (``math-shepherd`` / ``rlhflow`` in it), else ValueError. ValueError when nothing fits.
    """
    if getattr(config, "implicit_prm", None) is not None:
        return "implicit-prm"
    archs = list(getattr(config, "architectures", None) or [])
    head = any(a.endswith(("ForTokenClassification", "ProcessRewardModel")) for a in archs)
    sep = _single_token(tokenizer, QWEN_STEP_SEP) is not None
    tag = _tag_token(tokenizer, MATH_SHEPHERD_TAG) is not None
    plus_minus = _single_token(tokenizer, "+") is not None and _single_token(tokenizer, "-") is not None
    chat = bool(getattr(tokenizer, "chat_template", None)) and plus_minus
    if head:
        if sep:
            return "qwen-prm"
        raise ValueError(
            f"cannot tell the PRM format of {name or 'this model'}: it has a token-classification head "
            f"({archs}) but {QWEN_STEP_SEP!r} is not a single token of its tokenizer (qwen-prm needs it); "
            f"pass format= one of {FORMATS}"
        )
    if tag and not chat:
        return "math-shepherd"
    if chat and not tag:
        return "rlhflow"
    lowered = name.lower()
    if tag and chat:
        if "shepherd" in lowered:
            return "math-shepherd"
        if "rlhflow" in lowered:
            return "rlhflow"
        raise ValueError(
            f"cannot tell the PRM format of {name or 'this model'}: its tokenizer has both the math-shepherd "
            f"step tag {MATH_SHEPHERD_TAG!r} and a chat template with '+'/'-' tokens (rlhflow); "
            f"pass format='math-shepherd' or format='rlhflow'"
        )
    raise ValueError(
        f"cannot tell the PRM format of {name or 'this model'}: no math-shepherd step tag {MATH_SHEPHERD_TAG!r} "
        f"token, no chat template with single-token '+'/'-' (rlhflow), no 2-label token head with "
        f"{QWEN_STEP_SEP!r} (qwen-prm); pass format= one of {FORMATS}"
    )


# ----------------------------------------------------------------------------- formats


class _Format(abc.ABC):
    """How a path is written for one PRM family and how its score is read.

    marker: the text ending every scored step; offset: the scored position relative to the
    marker's token (0: at it, -1: the position predicting it); columns: the vocabulary ids whose
    logits are compared (None: the model's own 2-logit head); good: index of the "correct" class.
    """

    name = ""
    marker = ""
    offset = 0
    add_special_tokens = False
    columns: list[int] | None = None
    good = 0

    def __init__(self, tokenizer, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    @abc.abstractmethod
    def render(self, question: str, steps: Sequence[str]) -> str:
        """The full text the PRM reads for a question and its steps."""

    @abc.abstractmethod
    def marker_id(self) -> int:
        """The token id of the marker that ends every scored step."""

    def probability(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: float32 [B, 2] (the two compared classes) -> P(correct) float32 [B]."""
        return logits.float().softmax(dim=-1)[:, self.good]

    def root_text(self, question: str) -> str:
        """The rendering cut before the first step (its trailing whitespace is left to the step,
        because BPE tokenizers attach a space to the following word)."""
        full = self.render(question, [_SENTINEL])
        k = full.find(_SENTINEL)
        if k < 0:
            raise ValueError(f"format {self.name!r}: the rendering does not contain the step text verbatim")
        return full[:k].rstrip()

    def node_end(self, question: str, steps: Sequence[str], full: str) -> int:
        """Where a path's node text ends in ``full`` (= ``render(question, steps)``): right
        after the last marker."""
        k = full.rfind(self.marker)
        if k < 0:
            raise ValueError(f"format {self.name!r}: the rendering of a path lacks the marker {self.marker!r}")
        return k + len(self.marker)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _need(value: int | None, what: str, fmt: str) -> int:
    if value is None:
        raise ValueError(f"format {fmt!r}: {what} is not a single token of this tokenizer")
    return value


class _MathShepherd(_Format):
    name, marker, offset, add_special_tokens, good = "math-shepherd", MATH_SHEPHERD_TAG, 0, True, 0

    def __init__(self, tokenizer, system_prompt=None):
        super().__init__(tokenizer, system_prompt)
        self.tag_id = _need(_tag_token(tokenizer, MATH_SHEPHERD_TAG), f"the step tag {MATH_SHEPHERD_TAG!r}", self.name)
        # As the model card: the last token of encode("+") / encode("-") (SentencePiece: "▁+").
        self.columns = [_ids(tokenizer, "+")[-1], _ids(tokenizer, "-")[-1]]

    def render(self, question, steps):
        parts = [question, " "]
        for s in steps:
            body = s.rstrip()
            parts += [body, MATH_SHEPHERD_TAG, s[len(body) :]]
        return "".join(parts)

    def marker_id(self):
        return self.tag_id


class _RLHFlow(_Format):
    name, marker, offset, add_special_tokens, good = "rlhflow", "+", -1, False, 0

    def __init__(self, tokenizer, system_prompt=None):
        super().__init__(tokenizer, system_prompt)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("format 'rlhflow' needs a tokenizer with a chat template")
        plus = _need(_single_token(tokenizer, "+"), "'+'", self.name)
        minus = _need(_single_token(tokenizer, "-"), "'-'", self.name)
        self.columns = [plus, minus]

    def render(self, question, steps):
        conv = []
        for k, s in enumerate(steps):
            # Trailing whitespace is the delimiter search-and-learn splits off; leading whitespace
            # stays (the step is appended to the question verbatim, as there).
            conv.append({"role": "user", "content": f"{question} {s.rstrip()}" if k == 0 else s.rstrip()})
            conv.append({"role": "assistant", "content": "+"})
        return self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)

    def marker_id(self):
        return self.columns[0]


class _QwenPRM(_Format):
    name, marker, offset, add_special_tokens, good = "qwen-prm", QWEN_STEP_SEP, 0, True, 1

    def __init__(self, tokenizer, system_prompt=None):
        super().__init__(tokenizer, QWEN_PRM_SYSTEM if system_prompt is None else system_prompt)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("format 'qwen-prm' needs a tokenizer with a chat template")
        self.sep_id = _need(_single_token(tokenizer, QWEN_STEP_SEP), repr(QWEN_STEP_SEP), self.name)

    def render(self, question, steps):
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": "".join(s.strip() + QWEN_STEP_SEP for s in steps)})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def marker_id(self):
        return self.sep_id


class _ImplicitPRM(_Format):
    """EurusPRM-style implicit PRM: no marker and no head; the score is read from the
    log-likelihood ratio of every token (see the module docstring)."""

    name, marker, offset, add_special_tokens = "implicit-prm", "", 0, False

    def __init__(self, tokenizer, system_prompt=None):
        super().__init__(tokenizer, system_prompt)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("format 'implicit-prm' needs a tokenizer with a chat template")

    def render(self, question, steps):
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": "\n\n".join(s.strip() for s in steps)})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def node_end(self, question, steps, full):
        # Where the last step starts is where a sentinel in its place starts (searching for the
        # step text itself could match inside the template's end-of-turn text); an empty step
        # ends right there, after its "\n\n".
        probe = self.render(question, [*steps[:-1], _SENTINEL])
        k = probe.find(_SENTINEL)
        last = steps[-1].strip()
        if k >= 0 and not last:
            # a template may trim the message, dropping the delimiter before an empty last step:
            # the node then ends where the rendering stops agreeing with the probe
            return len(os.path.commonprefix([full, probe[:k]]))
        if k < 0 or full[:k] != probe[:k] or full[k : k + len(last)] != last:
            raise ValueError(f"format {self.name!r}: the rendering does not contain the step text {last!r} verbatim")
        return k + len(last)

    def marker_id(self):
        return -1  # no marker token: every token counts

    def spans(self, question: str, steps: Sequence[str]) -> tuple[list[int], int, list[int]]:
        """The whole path as the PRM reads it: (token ids of ``render(question, steps)``, index
        of the first scored token (after the question part), per step the index of its last
        token). Raises ValueError when a step's tokens are not a prefix of the whole path's."""
        full = self.render(question, steps)
        ids = _ids(self.tokenizer, full)
        answer_start = len(_ids(self.tokenizer, self.root_text(question)))
        ends = []
        for k in range(1, len(steps) + 1):
            part = self.render(question, steps[:k])
            cut = _ids(self.tokenizer, part[: self.node_end(question, steps[:k], part)])
            if ids[: len(cut)] != cut or len(cut) <= answer_start:
                raise ValueError(f"format {self.name!r}: step {k} does not end at a token boundary of the whole path")
            ends.append(len(cut) - 1)
        return ids, answer_start, ends


_FORMAT_CLASSES = {"math-shepherd": _MathShepherd, "rlhflow": _RLHFlow, "qwen-prm": _QwenPRM, "implicit-prm": _ImplicitPRM}


# ----------------------------------------------------------------------------- reward-head models


class TokenScoreModel(torch.nn.Module):
    """A decoder (``base``, returns ``last_hidden_state`` [B, T, H]) plus a per-token head
    (``head``: [.., H] -> [.., C]) called like a causal LM: ``model(..., logits_to_keep=idx)``
    returns ``.logits`` [B, len(idx), C] -- the head runs only at the kept positions."""

    def __init__(self, base: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.base = base
        self.head = head
        self.config = base.config

    def set_attn_implementation(self, implementation: str) -> None:
        self.base.set_attn_implementation(implementation)

    def forward(self, *, logits_to_keep: int | torch.Tensor = 0, **kwargs):
        hidden = self.base(**kwargs).last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return SimpleNamespace(logits=self.head(hidden))


def _checkpoint_tensors(path: str, prefix: str, hub: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors whose names start with ``prefix`` from a (possibly sharded) safetensors checkpoint."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def fetch(filename: str) -> str | None:
        try:
            return cached_file(path, filename, local_files_only=hub["local_files_only"])
        except OSError:
            return None

    index = fetch("model.safetensors.index.json")
    if index is not None:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({v for k, v in weight_map.items() if k.startswith(prefix)})
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        local = fetch(name)
        if local is None:
            continue
        with safe_open(local, framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key[len(prefix) :]] = f.get_tensor(key)
    return out


def _head_from_checkpoint(path: str, hub: dict[str, Any]) -> torch.nn.Module:
    """The ``score`` head of a Qwen2ForProcessRewardModel-style checkpoint: ``score.weight`` (one
    Linear) or ``score.<i>.weight`` Linear layers with ReLU between them (``score.0`` / ``score.2``)."""
    tensors = _checkpoint_tensors(path, "score.", hub)
    if not tensors:
        raise ValueError(
            f"{path}: no 'score.*' head weights in the checkpoint; qwen-prm needs a 2-logit token head "
            "(a *ForTokenClassification model with num_labels=2, a Qwen2ForProcessRewardModel checkpoint, "
            "or trust_remote_code=True)"
        )
    if "weight" in tensors:
        layers = [("", tensors)]
    else:
        idx = sorted({int(k.split(".")[0]) for k in tensors})
        layers = [(str(i), {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".")[0] == str(i)}) for i in idx]
    modules: list[torch.nn.Module] = []
    for j, (_, params) in enumerate(layers):
        w = params["weight"]
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias="bias" in params)
        lin.load_state_dict(params)
        modules.append(lin)
        if j + 1 < len(layers):
            modules.append(torch.nn.ReLU())
    return modules[0] if len(modules) == 1 else torch.nn.Sequential(*modules)


def _load_token_head_model(path: str, config, dtype, device, hub: dict[str, Any]) -> TokenScoreModel:
    from transformers import AutoModel, AutoModelForTokenClassification

    archs = list(getattr(config, "architectures", None) or [])
    common = dict(dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, **hub)
    if any(a.endswith("ForTokenClassification") for a in archs):
        model = AutoModelForTokenClassification.from_pretrained(path, **common)
        base = getattr(model, model.base_model_prefix)
        head = model.score if hasattr(model, "score") else model.classifier
    elif hub.get("trust_remote_code"):
        model = AutoModel.from_pretrained(path, **common)
        base, head = model.model, model.score
    else:
        # The decoder is the native class of config.model_type (checkpoint keys "model.*" are
        # mapped onto it by transformers); the head weights are read from the files directly.
        base = AutoModel.from_pretrained(path, **common)
        head = _head_from_checkpoint(path, hub).to(dtype)
    wrapped = TokenScoreModel(base, head).to(device).eval()
    out = getattr(head[-1] if isinstance(head, torch.nn.Sequential) else head, "out_features", None)
    if out != 2:
        raise ValueError(f"{path}: qwen-prm needs a head with 2 logits per token, this one has {out}")
    return wrapped


# ----------------------------------------------------------------------------- the PRM


@dataclass
class _Path:
    """What the PRM keeps for one node: its path and the PRM input it has been turned into.

    text: the rendered input up to and including the last step's marker (a root: the question
    part); tokens: ``encode_full(text)``; seq: its KV sequence (None for an empty root).
    """

    question: str
    steps: tuple[str, ...]
    text: str
    tokens: list[int]
    seq: int | None
    # implicit-prm: tokens before answer_start are the question part (not scored); q is the
    # path's beta-scaled log-ratio sum, tail the log-ratio row [V] of its last position (it
    # scores a child's first token).
    answer_start: int = 0
    q: float = 0.0
    tail: torch.Tensor | None = field(default=None, repr=False)
    # implicit-prm: float64 [len(tokens) - answer_start] (CPU), cum[i] = the unscaled log-ratio
    # sum of tokens answer_start .. answer_start + i (None: empty); a child that cannot fork
    # takes its sums up to the prefix it shares with this path
    cum: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class _Plan:
    """How to build one new path: ``tokens`` in full; fork ``base`` (holding the first
    ``base_len`` tokens) and append the rest, or (base None) start a new sequence."""

    path: _Path
    base: int | None
    base_len: int
    pos: int  # absolute index of the scored position in tokens
    parent: _Path | None = None


class HFPRM:
    """A Hugging Face PRM implementing :class:`ponder.protocols.PRM`, scoring incrementally.

    Args:
        model_id_or_path: local directory, hub id (``HF_HUB_OFFLINE=1``: local cache only) or
            ``builtin:prm`` (the shipped PRM).
        format: ``"auto"`` (see :func:`detect_format`), ``"math-shepherd"``, ``"rlhflow"``,
            ``"qwen-prm"`` or ``"implicit-prm"`` (see the module docstring for what each one
            writes and reads).
        device, dtype: as :class:`ponder.hf.policy.HFPolicy` (device None: cuda when torch sees a
            GPU, else cpu; dtype None: float32 on CPU, bf16 else).
        kv_budget, block_size: the PRM's own KV pool (tokens; default
            :data:`ponder.hf.kv.DEFAULT_TOKEN_BUDGET`) and its block size.
        system_prompt: the system message of qwen-prm (None: Qwen's default; "" for none) and of
            implicit-prm (None or "": none, as EurusPRM's usage; the chat template may add its own).
        trust_remote_code: load a checkpoint's own model class (qwen-prm only).
        self_check: as :class:`ponder.hf.policy.HFPolicy` (paged KV cache when exact, else
            transformers' own cache; ``stats()["kv_backend"]`` says which).
        reference: implicit-prm only: the reference causal LM (directory or hub id; None: the
            checkpoint's ``implicit_prm.reference``). It must share the PRM's vocabulary.
        beta: implicit-prm only: the log-ratio coefficient (None: the checkpoint's
            ``implicit_prm.beta``, else :data:`IMPLICIT_PRM_BETA`).
    """

    def __init__(
        self,
        model_id_or_path: str | os.PathLike,
        *,
        format: str = "auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        kv_budget: int | None = None,
        block_size: int = 16,
        system_prompt: str | None = None,
        trust_remote_code: bool = False,
        reference: str | os.PathLike | None = None,
        beta: float | None = None,
        self_check: bool = True,
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        if format not in ("auto",) + FORMATS:
            raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
        path = resolve_model_ref(model_id_or_path)
        hub = _hub_kwargs(path, trust_remote_code)
        self.device = default_device() if device is None else torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        config = AutoConfig.from_pretrained(path, **hub)
        if format == "auto":
            format = detect_format(self.tokenizer, config, path)
        self.format = format
        self._fmt: _Format = _FORMAT_CLASSES[format](self.tokenizer, system_prompt)
        if format == "qwen-prm":
            self.model = _load_token_head_model(path, config, self.dtype, self.device, hub)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, **hub).to(self.device).eval()
        # paged when the model passes the self-check, else transformers' own cache (ponder.hf.kv_fallback)
        self.kv = cache_for_model(self.model, block_size=block_size, token_budget=kv_budget, self_check=self_check)
        self.ref_model = None
        self.beta = None
        if format == "implicit-prm":
            self.ref_model, self.beta = self._load_reference(path, config, reference, beta, trust_remote_code)
            # one set of block tables: every fork / new sequence / free of self.kv holds for both
            self.kv, self.ref_kv = with_companion(self.kv, self.model, self.ref_model, self_check=self_check)
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._logratio_batch_tokens = min(_PREFILL_BATCH_TOKENS, max(1, _LOGRATIO_ELEMENTS // vocab))
        elif reference is not None or beta is not None:
            raise ValueError(f"reference= and beta= apply to format 'implicit-prm' only (this PRM is {format!r})")
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        if self.ref_model is not None:  # both run for every token
            self.num_parameters += sum(p.numel() for p in self.ref_model.parameters())
        self._lead = _leading_special(self.tokenizer) if self._fmt.add_special_tokens else []
        self._marker_id = self._fmt.marker_id()
        self._columns = None if self._fmt.columns is None else torch.tensor(self._fmt.columns, device=self.device)
        self._nodes: dict[int, _Path] = {}
        self._warned: set[str] = set()
        self._steps_scored = 0
        self._reencodes = 0

    def _load_reference(self, path: str, config, reference, beta, trust_remote_code: bool):
        from transformers import AutoModelForCausalLM

        spec = getattr(config, "implicit_prm", None) or {}
        ref = reference if reference is not None else spec.get("reference")
        if ref is None:
            raise ValueError(
                "format 'implicit-prm' needs its reference model: pass reference= (the model the PRM "
                "was trained against, e.g. Qwen/Qwen2.5-Math-7B-Instruct for PRIME-RL/EurusPRM-Stage2)"
            )
        ref = resolve_model_ref(ref)
        if reference is None and not os.path.isabs(ref) and os.path.isdir(path):
            # the checkpoint names its reference relative to its own directory
            ref = os.path.normpath(os.path.join(path, ref))
        beta = float(beta if beta is not None else spec.get("beta", IMPLICIT_PRM_BETA))
        if not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"beta must be a finite number > 0, got {beta}")
        model = AutoModelForCausalLM.from_pretrained(
            ref, dtype=self.dtype, **_hub_kwargs(ref, trust_remote_code)
        ).to(self.device).eval()
        ours, theirs = self.model.get_output_embeddings(), model.get_output_embeddings()
        if ours is None or theirs is None or ours.weight.shape[0] != theirs.weight.shape[0]:
            raise ValueError(
                f"the implicit PRM's reference {ref!r} does not share the PRM's vocabulary "
                f"(output rows {None if theirs is None else theirs.weight.shape[0]} vs "
                f"{None if ours is None else ours.weight.shape[0]}): pass the model the PRM was trained against"
            )
        return model, beta

    # ---------------------------------------------------------------- text and tokens
    def render(self, question: str, steps: Sequence[str]) -> str:
        """The full reference input text of a path (what the published usage feeds the model)."""
        return self._fmt.render(question, list(steps))

    def encode_full(self, text: str) -> list[int]:
        """The reference tokenization of a whole input text (leading special tokens included
        where the format's reference adds them)."""
        return self._lead + _ids(self.tokenizer, text)

    def _node_text(self, question: str, steps: Sequence[str]) -> str:
        full = self._fmt.render(question, list(steps))
        return full[: self._fmt.node_end(question, steps, full)]

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        """``encode_full`` of each text (one batched call for a fast tokenizer)."""
        if len(texts) > 1 and getattr(self.tokenizer, "is_fast", False):
            encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        else:
            encoded = [_ids(self.tokenizer, t) for t in texts]
        return [self._lead + list(ids) for ids in encoded]

    def _note(self, reason: str) -> None:
        """Warn once per cause that some paths cannot extend their parent's tokens."""
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"HFPRM ({self.format}): {reason}; such paths are recomputed from their longest cached "
                "prefix instead of extending their parent's sequence (scores stay exact)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _plans(self, parents: Sequence[_Path], new_steps: Sequence[Sequence[str]]) -> list[_Plan]:
        """One plan per (parent, steps appended to its path). The tokens of a path are the
        tokenization of its whole text, so incremental scores equal full-path scores at every
        position; the plan forks the parent only where the parent's tokens are a prefix of them."""
        texts = [self._node_text(p.question, p.steps + tuple(s)) for p, s in zip(parents, new_steps)]
        plans = []
        for parent, steps, text, tokens in zip(parents, new_steps, texts, self._encode_many(texts)):
            n = len(parent.tokens)
            # implicit-prm: an empty step may add no token (its path then scores as its parent's;
            # pos < n below makes it a recompute, which handles that)
            if self.ref_model is None and (not tokens or tokens[-1] != self._marker_id):
                raise ValueError(
                    f"format {self.format!r}: the marker {self._fmt.marker!r} did not end up as token "
                    f"{self._marker_id} at the end of the step (it merged with neighbouring text?)"
                )
            pos = len(tokens) - 1 + self._fmt.offset
            extends = tokens[:n] == parent.tokens
            if not text.startswith(parent.text):
                self._note("the chat template is not prefix-stable (rendering k+1 steps does not extend k)")
            elif not extends:
                self._note("a step boundary is not a token boundary of this tokenizer (the text around it "
                           "tokenizes differently as a whole)")
            base = parent.seq if (parent.seq is not None and extends and pos >= n) else None
            if base is None:
                self._reencodes += 1
            path = _Path(parent.question, parent.steps + tuple(steps), text, tokens, None, answer_start=parent.answer_start)
            plans.append(_Plan(path, base, n if base is not None else 0, pos, parent))
        return plans

    # ---------------------------------------------------------------- model
    @staticmethod
    def _batches(new_tokens: list[list[int]], limit: int = _PREFILL_BATCH_TOKENS):
        """(i, j) row ranges of at most ``limit`` new tokens (one row at least). A range also
        ends before a row that would make its padded size (rows x longest row) more than 1.25x
        its tokens + 64: rows are padded to the longest, so mixed lengths waste compute
        (callers that sort rows by length get few ranges)."""
        i = 0
        while i < len(new_tokens):
            j, total, longest = i, 0, 0
            while j < len(new_tokens):
                m = len(new_tokens[j])
                if j > i and (total + m > limit or (j - i + 1) * max(longest, m) > 1.25 * (total + m) + 64):
                    break
                total, longest = total + m, max(longest, m)
                j += 1
            yield i, j
            i = j

    @torch.inference_mode()
    def _logratios(self, seqs: list[int], new_tokens: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """implicit-prm: append ``new_tokens[i]`` to ``seqs[i]`` in both models. Returns, per
        row, float32 [m-1] (CPU): log pi_theta - log pi_ref of new token t+1 at new position t,
        and float32 [V] (model device): the log-ratio row of the last new position."""
        gathered: list[torch.Tensor] = []
        tails: list[torch.Tensor] = []
        for i, j in self._batches(new_tokens, self._logratio_batch_tokens):
            batch = self.kv.prepare(seqs[i:j], new_tokens[i:j])
            ratio = batch.run(self.model).logits.float().log_softmax(-1)
            ratio -= batch.on(self.ref_kv).run(self.ref_model).logits.float().log_softmax(-1)
            for r, toks in enumerate(new_tokens[i:j]):
                m = len(toks)
                nxt = torch.tensor(toks[1:], dtype=torch.long, device=ratio.device)
                gathered.append(ratio[r, : m - 1].gather(-1, nxt[:, None]).squeeze(-1).cpu())
                tails.append(ratio[r, m - 1].clone())
        return gathered, tails

    def _implicit_scores(self, plans: list[_Plan], seqs: list[int], rows: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Run the rows through both models and set each plan's q and tail; sigmoid(q) float32 [B]."""
        gathered, tails = self._logratios(seqs, rows)
        qs = []
        for plan, g, tail, start, row in zip(plans, gathered, tails, starts, rows):
            g, a = g.double(), plan.path.answer_start
            parent_cum = plan.parent.cum if plan.parent.cum is not None else torch.zeros(0, dtype=torch.float64)
            if plan.base is not None:  # the parent's tail scores the first new token
                prefix = parent_cum
                new = torch.cat([torch.tensor([float(plan.parent.tail[row[0]])], dtype=torch.float64), g])
            elif start >= a:  # tokens a..start are the parent's (token start is in the shared prefix)
                prefix, new = parent_cum[: start - a + 1], g
            else:  # recomputed from the question part: count the tokens from answer_start on
                prefix, new = parent_cum[:0], g[a - start - 1 :]
            offset = float(prefix[-1]) if len(prefix) else 0.0
            cum = torch.cat([prefix, offset + torch.cumsum(new, 0)])
            q = self.beta * (float(cum[-1]) if len(cum) else 0.0)
            plan.path.q, plan.path.tail, plan.path.cum = q, tail, cum
            qs.append(q)
        return torch.sigmoid(torch.tensor(qs, dtype=torch.float64)).float()

    @torch.inference_mode()
    def _scores_at(self, seqs: list[int], new_tokens: list[list[int]], positions: list[int]) -> torch.Tensor:
        """Append ``new_tokens[i]`` to ``seqs[i]``; P(correct) read at index ``positions[i]`` of
        each row's new tokens. Returns float32 [B] (CPU). Rows go in batches of bounded size."""
        out = []
        for i, j in self._batches(new_tokens):
            batch = self.kv.prepare(seqs[i:j], new_tokens[i:j])
            pos = torch.tensor(positions[i:j], dtype=torch.long)
            keep, where = torch.unique(pos, return_inverse=True)
            # Only the scored positions get logits (a vocabulary-sized row per new token would
            # dominate memory for large vocabularies).
            logits = batch.run(self.model, logits_to_keep=keep.to(self.device)).logits
            rows = logits[torch.arange(j - i, device=self.device), where.to(self.device)]  # [b, V or 2]
            if self._columns is not None:
                rows = rows[:, self._columns]
            out.append(self._fmt.probability(rows).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def _realize(self, plans: list[_Plan]) -> tuple[list[int], torch.Tensor]:
        """Create one sequence per plan (fork of its base, or a new sequence over the cached
        prefix) and run its new tokens; returns (sequences, scores float32 [B])."""
        seqs: list[int] = []
        rows: list[list[int]] = []
        positions: list[int] = []
        starts: list[int] = []
        try:
            for plan in plans:
                toks = plan.path.tokens
                if plan.base is not None:
                    (seq,) = self.kv.fork(plan.base, 1)
                    start = plan.base_len
                elif self.ref_model is not None:
                    # Every token from answer_start on is scored: the cache may give the question
                    # part, or the prefix shared with the parent (whose sums cover it), minus its
                    # last token (whose log-ratio row scores the next).
                    shared = _common_prefix(toks, plan.parent.tokens)
                    seq, start = self.kv.new_sequence(toks[: max(plan.path.answer_start, shared)])
                else:
                    # At most pos tokens come from the cache: the scored position is computed.
                    seq, start = self.kv.new_sequence(toks[: plan.pos + 1])
                seqs.append(int(seq))
                rows.append(toks[start:])
                positions.append(plan.pos - start)
                starts.append(start)
            if self.ref_model is not None:
                scores = self._implicit_scores(plans, seqs, rows, starts)
            else:
                scores = self._scores_at(seqs, rows, positions)
        except BaseException:
            self.kv.free(seqs)
            raise
        return seqs, scores

    # ---------------------------------------------------------------- PRM protocol
    def start(self, root_ids: Sequence[int], problems: Sequence[str]) -> None:
        """Prefill each distinct question part once (identical ones fork the first)."""
        root_ids = [int(r) for r in root_ids]
        if len(root_ids) != len(problems):
            raise ValueError(f"root_ids has {len(root_ids)} entries but problems has {len(problems)}")
        self._check_new(root_ids)
        paths = []
        for q in problems:
            text = self._fmt.root_text(q)
            tokens = self.encode_full(text)
            if self.ref_model is not None and not tokens:
                raise ValueError(f"format {self.format!r}: the question part of the input is empty, so no "
                                 "token can score the first step (a chat template renders at least the user turn)")
            paths.append(_Path(q, (), text, tokens, None, answer_start=len(tokens)))
        first: dict[tuple[int, ...], int] = {}
        for i, p in enumerate(paths):
            if p.tokens:
                first.setdefault(tuple(p.tokens), i)
        owners = sorted(first.values())
        created: list[int] = []
        try:
            rows = []
            for i in owners:
                seq, cached = self.kv.new_sequence(paths[i].tokens)
                created.append(seq)
                paths[i].seq = seq
                rows.append(paths[i].tokens[cached:])
            if owners and self.ref_model is not None:
                _, tails = self._logratios([paths[i].seq for i in owners], rows)
                for i, tail in zip(owners, tails):
                    paths[i].tail = tail
            elif owners:
                self._scores_at([paths[i].seq for i in owners], rows, [len(r) - 1 for r in rows])
            for i, p in enumerate(paths):
                if p.tokens and first[tuple(p.tokens)] != i:
                    owner = paths[first[tuple(p.tokens)]]
                    (seq,) = self.kv.fork(owner.seq, 1)
                    created.append(int(seq))
                    p.seq, p.tail = int(seq), owner.tail
        except BaseException:
            self.kv.free(created)
            raise
        for r, p in zip(root_ids, paths):
            self._nodes[r] = p

    def score_steps(
        self,
        parent_ids: Sequence[int],
        child_ids: Sequence[int],
        steps: Sequence[str],
        lookahead: Sequence[Sequence[str]] | None = None,
    ) -> list[float]:
        """Score ``steps[i]`` as the next step of ``parent_ids[i]``'s path and keep the extended
        path as node ``child_ids[i]``; with ``lookahead[i]`` non-empty the score is that of the
        last lookahead step, computed on a temporary fork of the child (freed at once)."""
        check_score_steps_args(parent_ids, child_ids, steps, lookahead)
        parent_ids = [int(p) for p in parent_ids]
        child_ids = [int(c) for c in child_ids]
        if not child_ids:
            return []
        missing = sorted({p for p in parent_ids if p not in self._nodes})
        if missing:
            raise KeyError(f"nodes {missing[:8]} are not held by this PRM (never started/scored, or released)")
        self._check_new(child_ids)

        plans = self._plans([self._nodes[p] for p in parent_ids], [[s] for s in steps])
        seqs, scores = self._realize(plans)
        for c, plan, seq in zip(child_ids, plans, seqs):
            plan.path.seq = seq
            self._nodes[c] = plan.path
        result = scores.tolist()
        self._steps_scored += len(child_ids)

        ahead = [i for i in range(len(child_ids)) if lookahead is not None and len(lookahead[i]) > 0]
        if ahead:
            temp = self._plans([plans[i].path for i in ahead], [list(lookahead[i]) for i in ahead])
            tseqs, tscores = self._realize(temp)
            self.kv.free(tseqs)
            for i, s in zip(ahead, tscores.tolist()):
                result[i] = s
            self._steps_scored += sum(len(lookahead[i]) for i in ahead)
        return [float(s) for s in result]

    def release(self, node_ids: Sequence[int]) -> None:
        """Free the nodes' sequences; ids not held are ignored."""
        seqs = []
        for n in node_ids:
            p = self._nodes.pop(int(n), None)
            if p is not None and p.seq is not None:
                seqs.append(p.seq)
        if seqs:
            self.kv.free(seqs)

    def kv_free_blocks(self) -> int:
        """KV blocks a new sequence may take now: free + evictable (cached, unreferenced)."""
        st = self.kv.stats()
        return int(st["blocks_free"]) + int(st.get("blocks_evictable", 0))

    @property
    def kv_block_size(self) -> int:
        return int(self.kv.block_size)

    def stats(self) -> dict[str, int]:
        """Counters: tokens_scored (tokens run through the PRM = the KV cache's tokens_appended),
        steps_scored (lookahead steps included), full_reencodes (paths that could not extend their
        parent's sequence: a step boundary merged tokens, the template is not prefix-stable, or an
        implicit-prm step added no token; computed from their longest cached prefix), live_nodes, num_parameters (an implicit PRM: its reference's
        too), and the cache's counters as ``kv_*``."""
        kv = self.kv.stats()
        return _model_stats(
            {
                "tokens_scored": kv["tokens_appended"],
                "steps_scored": self._steps_scored,
                "full_reencodes": self._reencodes,
            },
            len(self._nodes), self.num_parameters, kv,
        )

    def _check_new(self, ids: Sequence[int]) -> None:
        _check_new_ids(ids, self._nodes, "PRM")
