"""Final answers: extraction, normalization, equivalence, metrics.

The stages, in the order a completion goes through them::

    text --extract_answer--> answer --normalize_answer--> normalized --answer_id--> int64 id
    answer, gold --is_equivalent--> correct            (grade() does all four at once)

* ``extract_answer`` takes the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or
  ``\\boxed 42`` without braces), with correctly nested braces.
* ``normalize_answer`` is a cheap, deterministic, purely textual canonical form: answers
  that differ only in presentation (spacing, ``\\dfrac`` vs ``\\frac``, ``0.50`` vs ``0.5``,
  ``x = 3`` vs ``3``, units, ``\\$``...) get the same string, hence the same ``answer_id``,
  hence vote together. It does not compute: ``0.5`` and ``\\frac{1}{2}`` stay different
  strings (use ``is_equivalent`` to compare values).
* ``answer_id`` hashes a normalized answer into the int64 id the search forest votes on.
* ``is_equivalent`` decides correctness against a reference answer: equal normalized strings,
  else a symbolic comparison by the ``math_verify`` library (imported lazily: it takes
  about a second and a half to import). Two answers with the same ``answer_id`` are always
  equivalent: voting never merges answers that grading keeps apart.
* ``pass_at_k``, ``accuracy`` and ``accuracy_by_level`` are the metrics of a run.

docs/grading.md has the comma rules (lists vs thousands separators) and the deliberate
differences from math-verify's own test cases (tests/test_grading_mathverify.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import re
import signal
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from ._core import NO_ANSWER  # the search forest's "no answer" sentinel (-2**63); answer_id never returns it

__all__ = [
    "FALLBACKS",
    "NO_ANSWER",
    "GradeResult",
    "accuracy",
    "accuracy_by_level",
    "answer_id",
    "extract_answer",
    "grade",
    "is_equivalent",
    "normalize_answer",
    "pass_at_k",
]


FALLBACKS = ("none", "last_number", "answer_is")
"""The ``fallback`` names ``extract_answer`` accepts (alone or as a sequence tried in order)."""

MAX_SYMBOLIC_CHARS = 1000
"""``is_equivalent`` compares longer answers (either side) only as normalized strings."""

# ----------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]}.])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?(?![\d])"
)
_ANSWER_IS_RE = re.compile(
    r"(?:the\s+)?(?:final\s+)?answer\s*(?:is\b|:)\s*:?", re.IGNORECASE
)


def _braced_end(text: str, start: int) -> int | None:
    """Index just past the ``}`` matching the ``{`` at ``text[start]``, or None if unclosed.

    A backslash escapes the next character, so ``\\{`` and ``\\}`` (literal braces) do not
    count, and ``\\\\`` (a line break) is one unit.
    """
    depth = 0
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """Every top-level complete box as (start, end, stripped content), in text order.

    Boxes nested inside an earlier complete box are skipped (the outer one is the answer).
    """
    spans: list[tuple[int, int, str]] = []
    covered = 0  # end of the last complete box: matches before it are nested in it
    for match in _BOX_RE.finditer(text):
        if match.start() < covered:
            continue
        i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _braced_end(text, i)
            if end is None:  # unclosed (e.g. a truncated generation): not an answer
                continue
            content = text[i + 1 : end - 1]
        elif i > match.end():  # "\boxed 42": up to the next "$" or line end
            end = i
            while end < len(text) and text[end] not in "$\n":
                end += 1
            content = text[i:end].rstrip().rstrip(".")
        else:
            continue
        spans.append((match.start(), end, content.strip()))
        covered = end
    return spans


def _last_number(text: str) -> str | None:
    found = _NUMBER_RE.findall(text)
    return found[-1] if found else None


def _answer_is(text: str) -> str | None:
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].split("\n", 1)[0]
    rest = rest.strip().strip("*").strip()
    rest = rest.rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if (
            rest.startswith(left)
            and rest.endswith(right)
            and len(rest) >= len(left) + len(right)
        ):
            rest = rest[len(left) : len(rest) - len(right)].strip()
            break
    rest = rest.rstrip(".").strip()
    return rest or None


_FALLBACK_FNS = {
    "none": lambda text: None,
    "last_number": _last_number,
    "answer_is": _answer_is,
}


def extract_answer(text: str, fallback: str | Sequence[str] = "none") -> str | None:
    """The final answer written in ``text``: the content of its last box, else a fallback.

    The box is ``\\boxed{...}`` or ``\\fbox{...}``; its content is taken with correctly nested
    braces (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; the escaped braces ``\\{ \\}``
    of a set do not count) and stripped of surrounding whitespace. ``\\boxed 42`` (no braces)
    takes everything up to the next ``$`` or line end, minus a trailing period. When several
    boxes occur the last one wins; a box nested inside another belongs to the outer one; an
    unclosed box (a truncated generation) and an empty box are ignored, so the last
    *complete, non-empty* box wins.

    Without a box, ``fallback`` decides (a name, or a sequence of names tried in order until
    one finds something):

    * ``"none"`` (default): None.
    * ``"last_number"``: the last number in the text, as written (``-12``, ``3.5``,
      ``1,000``); a ``-`` right after a word, digit or bracket (``3-5``) is not a sign.
    * ``"answer_is"``: the rest of the line after the last "The answer is", "Final answer:"
      or "answer:" (case-insensitive), without surrounding ``$``/``**`` and trailing period.

    Returns None when nothing is found. Raises ValueError for an unknown fallback name.
    """
    names = (fallback,) if isinstance(fallback, str) else tuple(fallback)
    for name in names:
        if name not in _FALLBACK_FNS:
            raise ValueError(f"unknown fallback {name!r}; expected one of {FALLBACKS}")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    for _, _, content in reversed(_boxed_spans(text)):
        if content:
            return content
    for name in names:
        found = _FALLBACK_FNS[name](text)
        if found:
            return found
    return None


# ----------------------------------------------------------------------------- normalization

_TEXT_CMDS = r"(?:text|textrm|textbf|textnormal|mbox|mathrm)"
_UNIT_SUFFIX_RE = re.compile(
    r"^(?P<head>.*?\S)\s*\\"
    + _TEXT_CMDS
    + r"\s*\{\s*[A-Za-z][A-Za-z .]*\}(?:\s*\^\s*\{?\s*\d\s*\}?)?\s*$",
    re.DOTALL,
)
_TEXT_WRAP_RE = re.compile(r"\\" + _TEXT_CMDS + r"\s*\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\(?:[,;:> ]|quad\b|qquad\b|displaystyle\b|left\b|right\b)")
_NEG_SPACE_RE = re.compile(r"\\!")  # a negative thin space joins: ``10,\!000`` is ``10,000``
_BRACED_COMMA_RE = re.compile(r"(?<!\\)\{\s*,\s*\}")  # ``{,}``: a comma without math spacing
_NULL_DELIM_RE = re.compile(r"\\(?:left|right)\s*\.")
_DEGREE_RE = re.compile(
    r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|\\degree(?![A-Za-z])|°"
)
_LEADING_VAR_RE = re.compile(r"^(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?=(?!=)")
_FRAC_SHORT_RE = re.compile(r"\\frac\s*(\d|\{[^{}]*\})\s*(\d|\{[^{}]*\})")
_FRAC_TWO_DIGITS_RE = re.compile(r"\\frac(\d)(\d)")
_SQRT_SHORT_RE = re.compile(r"\\sqrt\s*(\d)")
_INT_RE = re.compile(r"[+-]?\d+")
# A thousands-separated number: 1-3 digits (not starting with 0), then ","-separated groups of
# exactly 3 digits, no space after a comma; an optional decimal part.
_THOUSANDS_RE = re.compile(r"[+-]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")
# A comma followed by whitespace and exactly three digits: written tight, it would read as a
# thousands separator (``2, 100`` vs ``2,100``), so its space is kept until the whole answer is
# known (see ``_BARE_LIST_RE``).
_SPACED_GROUP_RE = re.compile(r",\s+(?=\d{3}(?!\d))")
# A bare list of numbers (``2, 100``; ``-2,1``): the one form where a comma's spacing matters.
_BARE_LIST_RE = re.compile(r"[+-]?\d+(?:\.\d+)?(?:, ?[+-]?\d+(?:\.\d+)?)+")
_DECIMAL_RE = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_FRAC_RE = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}")
_SLASH_RE = re.compile(r"([+-]?)(\d+)/(\d+)")
_CHOICE_RE = re.compile(r"\(([A-Z])\)")
_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _unwrap_box(s: str) -> str:
    spans = _boxed_spans(s)
    if len(spans) == 1 and spans[0][0] == 0 and spans[0][1] == len(s):
        return spans[0][2]
    return s


def _canonical_number(s: str) -> str:
    """Exact canonical text of a plain integer, decimal or integer fraction; else ``s``."""
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if _INT_RE.fullmatch(s):
        return str(int(s))
    if _DECIMAL_RE.fullmatch(s):
        try:
            d = Decimal(s)
        except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
            return s
        if d == d.to_integral_value():
            return str(int(d))
        return format(d.normalize(), "f")
    m = _FRAC_RE.fullmatch(s) or _SLASH_RE.fullmatch(s)
    if m:
        sign, num, den = m.group(1), int(m.group(2)), int(m.group(3))
        if den == 0:
            return s
        value = Fraction(num, den) * (-1 if sign == "-" else 1)
        if value.denominator == 1:
            return str(value.numerator)
        minus = "-" if value < 0 else ""
        return f"{minus}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"
    return s


def normalize_answer(ans: str) -> str:
    """A canonical string for an answer, so that presentation variants vote together.

    Deterministic and purely textual (no symbolic algebra, no timeouts). In order:

    1. strip; unwrap one enclosing ``\\boxed{}``/``\\fbox{}`` and math delimiters
       (``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``);
    2. drop ``\\left``/``\\right`` (and their null delimiter ``.``), ``\\displaystyle`` and
       the negative thin space ``\\!`` (it joins: ``10,\\!000`` is ``10,000``); spacing
       commands (``\\,``, ``\\;``, ``\\:``, ``\\quad``...) become spaces; ``{,}`` -> ``,``;
    3. ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\dbinom``/``\\tbinom`` -> ``\\binom``;
    4. drop degrees (``^\\circ``, ``^{\\circ}``, ``°``), percent signs (``\\%``, ``%``) and
       dollar signs (``\\$``, ``$``);
    5. drop a trailing unit wrapper (letters only) after a value that has a digit or a command
       (``5\\text{ cm}^2`` -> ``5``, ``\\pi\\text{ units}`` -> ``\\pi``),
       then unwrap the remaining ``\\text{..}``/``\\textbf``/``\\mbox``/``\\mathrm`` groups;
    6. remove all whitespace and trailing periods, but keep one space that ends a control word
       before a letter (``\\circ g``) and, for now, one space between a comma and exactly three
       digits (``2, 100``): it is what tells a list from a thousands-separated number;
    7. drop a leading ``x=`` (one letter or command, optional subscript) when it is the only
       ``=``;
    8. brace short arguments: ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt2`` -> ``\\sqrt{2}``;
    9. commas: unless the whole answer is a bare list of numbers (``2, 100``, ``-2,1``), the
       space kept in step 6 goes (``(2, 100)`` -> ``(2,100)``). A thousands separator is a
       comma with no space after it between digit groups of exactly three, the first group 1-3
       digits not starting with 0, and it counts only when the whole answer is such a number:
       ``1,000`` and ``12,345,678.5`` are numbers, while ``2, 100`` (a list), ``1000,99``,
       ``1,00``, ``0,111`` (no decimal comma is recognised) and ``(2,100)`` (a pair) stay as
       they are, so they never vote with a number;
    10. canonical numbers, exact: integers (``+007`` -> ``7``, ``1,000`` -> ``1000``),
        decimals (``0.50`` -> ``0.5``, ``5.0`` -> ``5``, ``.5`` -> ``0.5``), integer fractions
        ``a/b`` and ``\\frac{a}{b}`` reduced to ``\\frac{p}{q}`` with the sign in front, or
        an integer. Decimals stay decimals: ``0.5`` and ``\\frac{1}{2}`` differ here;
    11. a lone multiple-choice letter ``(C)`` -> ``C``.

    Case is kept (``A`` and ``a`` may be different answers). The result is empty only for a
    blank answer: an answer made only of presentation (``$``, ``\\%``) is its own canonical
    form (without whitespace), so it votes only with itself. Idempotent:
    ``normalize_answer(normalize_answer(a)) == normalize_answer(a)``.
    """
    if not isinstance(ans, str):
        raise TypeError(f"answer must be a str, got {type(ans).__name__}")
    s = _unwrap_box(ans.strip())
    for left, right in _DELIMS:
        if (
            s.startswith(left)
            and s.endswith(right)
            and len(s) >= len(left) + len(right)
        ):
            s = s[len(left) : len(s) - len(right)].strip()
            break
    s = _NULL_DELIM_RE.sub("", s)
    s = _NEG_SPACE_RE.sub("", s)
    s = _SPACING_RE.sub(" ", s)
    s = _BRACED_COMMA_RE.sub(",", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\[dt]binom(?![A-Za-z])", r"\\binom", s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = s.strip()
    unit = _UNIT_SUFFIX_RE.match(s)
    if unit and re.search(
        r"[\d\\]", unit.group("head")
    ):  # a value (digit or command) + unit
        s = unit.group("head")
    s = _TEXT_WRAP_RE.sub(lambda m: m.group(1), s)
    # Remove all whitespace, except one space that ends a control word before a letter
    # (``f \\circ g`` must not become ``\\circg``) and, for now, one space between a comma and
    # three digits: ``2, 100`` is a list, ``2,100`` a number, and this is the last step that
    # can tell them apart.
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", "\\1\0", s)
    s = _SPACED_GROUP_RE.sub(",\0", s)
    s = re.sub(r"\s+", "", s).replace("\0", " ")
    s = s.rstrip(".") or s
    if s.count("=") == 1:
        stripped = _LEADING_VAR_RE.sub("", s)
        if stripped:
            s = stripped
    s = _FRAC_TWO_DIGITS_RE.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_SHORT_RE.sub(
        lambda m: (
            "\\frac"
            + "".join(a if a.startswith("{") else "{" + a + "}" for a in m.groups())
        ),
        s,
    )
    s = _SQRT_SHORT_RE.sub(r"\\sqrt{\1}", s)
    if not _BARE_LIST_RE.fullmatch(s):  # only a bare list of numbers keeps ", 100"
        s = s.replace(", ", ",")
    s = _canonical_number(s)
    choice = _CHOICE_RE.fullmatch(s)
    if choice:
        s = choice.group(1)
    if not s:  # all presentation (``$``, ``\\%``): the answer itself is its canonical form
        s = re.sub(r"\s+", "", ans)
    return s


def answer_id(normalized: str) -> int:
    """A stable signed int64 id of a normalized answer (the forest's answer id).

    The first 8 bytes of BLAKE2b of the UTF-8 text, read little-endian as a signed integer;
    the one value that would equal ``NO_ANSWER`` (``-2**63``) maps to ``-2**63 + 1``. The id
    is the same across processes and platforms. Pass ``normalize_answer``'s output: the
    hash itself does not normalize.
    """
    if not isinstance(normalized, str):
        raise TypeError(
            f"normalized answer must be a str, got {type(normalized).__name__}"
        )
    digest = hashlib.blake2b(normalized.encode("utf-8"), digest_size=8).digest()
    value = int.from_bytes(digest, "little", signed=True)
    return NO_ANSWER + 1 if value == NO_ANSWER else value


# ----------------------------------------------------------------------------- equivalence

_WORD_RE = re.compile(r"[A-Za-z]{2,}")
# Inputs that can make sympy run for very long (power towers, huge exponents, factorials).
# They are compared symbolically only where math_verify's alarm-based timeout works.
_RISKY_RE = re.compile(
    r"\^\s*\{[^{}]*\^|\^\s*\(?\s*[\w.]+\s*\)?\s*\^|\^\s*\{?\s*-?\d{4,}|\d{3,}\s*!|[)}]\s*!|\\(?:prod|sum|int)(?![A-Za-z])"
)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _outer_alarm_kept():
    """Keep a caller's pending ITIMER_REAL alarm alive across math_verify's own alarm.

    math_verify arms ``signal.alarm`` and then cancels it with ``alarm(0)``, which would
    silently cancel an alarm the caller had armed (e.g. a test timeout). Yields the seconds
    left on that outer alarm (0.0 if none) and re-arms it afterwards.
    """
    if not hasattr(signal, "setitimer"):  # no interval timers (Windows)
        yield 0.0
        return
    left, interval = signal.setitimer(signal.ITIMER_REAL, 0)
    begin = time.monotonic()
    try:
        yield left
    finally:
        if left > 0:
            remaining = max(left - (time.monotonic() - begin), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, interval)


@functools.lru_cache(maxsize=8192)
def _parse(answer: str, timeout: int | None) -> tuple:
    """math_verify's parse of an answer: boxed first, then in ``$..$``, then raw."""
    from math_verify import parse

    for wrapped in ("\\boxed{" + answer + "}", "$" + answer + "$", answer):
        try:
            parsed = parse(wrapped, parsing_timeout=timeout)
        except Exception:  # noqa: BLE001 - any parser failure means "not parseable"
            parsed = []
        if parsed:
            return tuple(parsed)
    return ()


def _symbolic_equal(pred: str, gold: str, timeout_s: int) -> bool:
    from math_verify import verify
    from math_verify.errors import TimeoutException

    try:
        if _in_main_thread():
            with _outer_alarm_kept() as outer:
                timeout = (
                    max(1, min(int(timeout_s), math.ceil(outer)))
                    if outer > 0
                    else int(timeout_s)
                )
                g = _parse(gold, timeout)
                p = _parse(pred, timeout) if g else ()
                return bool(
                    g and p and verify(list(g), list(p), timeout_seconds=timeout)
                )
        # No SIGALRM outside the main thread: no timeout, so refuse inputs that could hang.
        if _RISKY_RE.search(pred) or _RISKY_RE.search(gold):
            return False
        g = _parse(gold, None)
        p = _parse(pred, None) if g else ()
        return bool(g and p and verify(list(g), list(p), timeout_seconds=None))
    except (Exception, TimeoutException):  # noqa: BLE001 - TimeoutException is a BaseException
        return False


def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, Fraction, Decimal)) and not isinstance(
        value, bool
    ):
        return str(value)
    return None


def is_equivalent(pred: str | None, gold: str, *, timeout_s: int = 5) -> bool:
    """Whether the predicted answer ``pred`` means the reference answer ``gold``.

    Both are bare answers (``extract_answer`` output, a dataset's answer field); numbers are
    accepted for either. In order:

    1. None, non-text input, or a blank side: False.
    2. Equal ``normalize_answer`` forms: True. Hence two answers that get the same voting id
       (``answer_id(normalize_answer(.))``) are always equivalent: majority voting never
       merges answers that this function keeps apart.
    3. If either normalized side is a word (two or more letters only, e.g. ``Monday``,
       ``even``): case-insensitive equality, never symbolic (math_verify would read ``even``
       as the product ``e*v*e*n`` and call it equal to ``neve``).
    4. Either side longer than ``MAX_SYMBOLIC_CHARS``: False.
    5. ``math_verify.parse`` of both (each wrapped in ``\\boxed{..}``, else ``$..$``, else raw)
       and ``math_verify.verify(gold, pred)``: values (``\\frac{1}{2}`` = ``0.5`` = ``1/2``),
       equations with a variable on the left (``x=3`` = ``3``), sets, intervals, matrices.
       In the main thread each of parse/verify is bounded by ``timeout_s`` seconds (math_verify
       uses SIGALRM; an alarm the caller had armed is kept). In other threads SIGALRM is not
       available: inputs that could make sympy run very long (power towers, exponents of 4+
       digits, big factorials, sums/products/integrals) are not compared symbolically (False).

    Never raises on any input; returns False when math_verify fails or times out.
    Parsed answers are cached (LRU), so grading N completions against one gold parses the
    gold once.
    """
    try:
        pred_s, gold_s = _as_text(pred), _as_text(gold)
        if pred_s is None or gold_s is None or not pred_s.strip() or not gold_s.strip():
            return False
        norm_pred, norm_gold = normalize_answer(pred_s), normalize_answer(gold_s)
        if not norm_pred or not norm_gold:
            return False
        if norm_pred == norm_gold:
            return True
        if _WORD_RE.fullmatch(norm_pred) or _WORD_RE.fullmatch(norm_gold):
            return norm_pred.casefold() == norm_gold.casefold()
        if len(pred_s) > MAX_SYMBOLIC_CHARS or len(gold_s) > MAX_SYMBOLIC_CHARS:
            return False
        return _symbolic_equal(pred_s.strip(), gold_s.strip(), timeout_s)
    except Exception:  # noqa: BLE001 - the contract: never raise on any input
        return False


@dataclass(frozen=True)
class GradeResult:
    """One completion graded against a reference answer.

    ``answer``: the extracted answer (None if the text has none); ``normalized``: its
    ``normalize_answer`` form and ``answer_id``: its id (both None without an answer; skip
    such completions when setting forest answers, whose sentinel is ``NO_ANSWER``);
    ``correct``: ``is_equivalent(answer, gold)``.
    """

    answer: str | None
    normalized: str | None
    answer_id: int | None
    correct: bool


def grade(text: str, gold: str, fallback: str | Sequence[str] = "none") -> GradeResult:
    """Extract the final answer of ``text`` (see ``extract_answer``) and grade it against ``gold``."""
    answer = extract_answer(text, fallback)
    if answer is None:
        return GradeResult(None, None, None, False)
    normalized = normalize_answer(answer)
    return GradeResult(
        answer, normalized, answer_id(normalized), is_equivalent(answer, gold)
    )


# ----------------------------------------------------------------------------- metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021).

    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` so that
    large ``n`` neither overflows nor loses precision. Requires ``0 <= c <= n`` and
    ``1 <= k <= n``; raises ValueError otherwise (TypeError for non-int arguments).
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def accuracy(flags: Iterable[Any]) -> float:
    """The fraction of truthy entries in ``flags``. Raises ValueError when it is empty."""
    values = [bool(f) for f in flags]
    if not values:
        raise ValueError("accuracy of an empty sequence is undefined")
    return sum(values) / len(values)


def _field(row: Any, key: str) -> Any:
    if isinstance(row, Mapping):
        return row[key]
    return getattr(row, key)


def accuracy_by_level(
    rows: Iterable[Any], level_key: str = "level", correct_key: str = "correct"
) -> dict[Any, tuple[float, int]]:
    """Accuracy per difficulty level: ``{level: (accuracy, count)}``.

    ``rows`` are mappings or objects (e.g. dataclasses) with ``level_key`` and ``correct_key``
    entries. Levels come out sorted, with None (no level) last; a level that is missing from
    a row raises KeyError/AttributeError.
    """
    groups: dict[Any, list[bool]] = {}
    for row in rows:
        groups.setdefault(_field(row, level_key), []).append(
            bool(_field(row, correct_key))
        )

    def order(level: Any) -> tuple:
        return (
            level is None,
            str(type(level).__name__) if level is not None else "",
            level if level is not None else 0,
        )

    return {
        level: (sum(v) / len(v), len(v))
        for level, v in sorted(groups.items(), key=lambda kv: order(kv[0]))
    }
