"""PRM input formats: how a path (question, steps) is rendered for the PRM and where its step
scores are read. ``detect_format`` picks one from the tokenizer and config.

* ``"math-shepherd"`` (peiyi9979/math-shepherd-mistral-7b-prm): ``question + " " + step_1 + " ки"
  + step_2 + " ки" ...``; a step's trailing whitespace (its delimiter) goes after its tag. Score:
  softmax over the logits of ``"+"`` / ``"-"`` at the tag position, P(good). BOS added as
  ``tokenizer.encode`` does.
* ``"rlhflow"`` (RLHFlow/Llama3.1-8B-PRM-*): the chat template; user ``question + " " + step_1``,
  assistant ``"+"``, user ``step_2``, ...; a step's trailing delimiter is dropped. Score: softmax
  over {"+", "-"} at the position predicting the assistant's "+".
* ``"qwen-prm"`` (Qwen/Qwen2.5-Math-PRM-7B): chat template, optional system message (default
  ``QWEN_PRM_SYSTEM``), ``step_1<extra_0>step_2<extra_0>...`` as the assistant message (steps
  stripped). Score: softmax(2-logit head)[1] at each ``<extra_0>`` (``heads.TokenScoreModel``).
* ``"implicit-prm"`` (PRIME-RL/EurusPRM, arXiv 2412.01981): chat template, ``"\n\n".join(steps)``
  as the assistant message. Score of step k: sigmoid(beta * sum over the answer's tokens up to
  the end of step k of log pi_theta - log pi_ref), against a reference LM with the same
  vocabulary (``reference=`` / ``beta=`` or the checkpoint's ``config.json`` key
  ``"implicit_prm"``; beta defaults to ``IMPLICIT_PRM_BETA``).

A node's *text* is ``render(question, steps)`` cut right after its last step's marker (" ки",
"+", "<extra_0>"; implicit-prm: after the last step's text); a root's text is cut before the
first step. Design notes: docs/prm.md.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["FORMATS", "IMPLICIT_PRM_BETA", "MATH_SHEPHERD_TAG", "QWEN_PRM_SYSTEM", "QWEN_STEP_SEP", "detect_format"]

FORMATS = ("math-shepherd", "rlhflow", "qwen-prm", "implicit-prm")
MATH_SHEPHERD_TAG = " ки"
QWEN_STEP_SEP = "<extra_0>"
# EurusPRM's model card scales the log-likelihood ratio by this coefficient.
IMPLICIT_PRM_BETA = 0.001
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
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
