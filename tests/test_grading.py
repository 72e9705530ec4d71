"""ponder.grading: answer extraction, normalization, ids, equivalence, metrics."""

from __future__ import annotations

import itertools
import math
import re
import signal
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ponder import grading
from ponder.grading import (
    NO_ANSWER,
    GradeResult,
    accuracy,
    accuracy_by_level,
    answer_id,
    extract_answer,
    grade,
    is_equivalent,
    normalize_answer,
    pass_at_k,
)

# ----------------------------------------------------------------------------- extract_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("So the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{\\sqrt{2}+1}}", "\\frac{\\sqrt{3}}{\\sqrt{2}+1}"),
        ("$\\boxed{x^{2^{3}}}$", "x^{2^{3}}"),
        ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{3}", "3"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not nest
        ("\\boxed{\\}}", "\\}"),
        ("\\boxed{a \\\\ b}", "a \\\\ b"),  # \\ is a line break, not an escape of "}"
        ("\\fbox{7}", "7"),
        ("\\boxed{1} and \\fbox{2}", "2"),
        ("\\boxed {  9 }", "9"),
        ("\\boxed{ 5 } is it", "5"),
        ("The answer: $\\boxed 42$ done", "42"),
        ("\\boxed 42.\nNext line 7", "42"),
        (
            "\\boxed{\\boxed{3}}",
            "\\boxed{3}",
        ),  # a box nested in a box belongs to the outer one
        (
            "\\boxed{5} and then a truncated \\boxed{\\frac{1}{2",
            "5",
        ),  # unclosed box ignored
        ("\\boxed{5} and an empty \\boxed{}", "5"),
        ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}"),
        (
            "\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}",
            "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        ),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_answer(text) == expected
    # a box always wins over every fallback
    assert extract_answer(text, "last_number") == expected
    assert extract_answer(text, "answer_is") == expected


@pytest.mark.parametrize(
    "text",
    [
        "no answer here",
        "",
        "\\boxed{}",
        "\\boxed{1",
        "\\boxedx{3}",
        "\\boxed",
        "a }{ b",
    ],
)
def test_extract_none(text):
    assert extract_answer(text) is None
    assert extract_answer(text, "none") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3 apples and 12 pears", "12"),
        ("x = -5", "-5"),
        ("from 3-5", "5"),  # a minus after a digit is not a sign
        ("total 1,234,567.5 dollars", "1,234,567.5"),
        ("pi is 3.14.", "3.14"),
        ("x^2 plus H2O", "2"),  # digits glued to a letter are not a number
        ("the list 1,2,3", "3"),
        ("no digits", None),
        ("\\boxedx{3}", "3"),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_answer(text, "last_number") == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("So the final answer is 42", "42"),
        ("**Final Answer:** 42", "42"),
        ("Answer: 7\nmore text 9", "7"),
        ("answer: 1\nThe answer is 2.", "2"),  # the last one wins
        ("the answer is \\(x+1\\)", "x+1"),
        ("the answer is", None),
        ("nothing", None),
    ],
)
def test_extract_answer_is(text, expected):
    assert extract_answer(text, "answer_is") == expected


def test_extract_fallback_sequence():
    text = "The answer is x. Then 3 and 4"
    assert extract_answer(text, ["answer_is", "last_number"]) == "x. Then 3 and 4"
    assert extract_answer(text, ["last_number", "answer_is"]) == "4"
    assert extract_answer("just 5", ["answer_is", "last_number"]) == "5"
    assert extract_answer("nothing", ["answer_is", "last_number"]) is None
    assert extract_answer("nothing", []) is None


def test_extract_bad_arguments():
    with pytest.raises(ValueError, match="unknown fallback 'last'"):
        extract_answer("\\boxed{1}", "last")
    with pytest.raises(ValueError, match="unknown fallback"):
        extract_answer("x", ["none", "bogus"])
    with pytest.raises(TypeError, match="str"):
        extract_answer(None)  # type: ignore[arg-type]


_ATOMS = [
    "1",
    "42",
    "x",
    "+",
    "-",
    "=",
    ",",
    ".",
    " ",
    "^",
    "_",
    "(",
    ")",
    "\\frac",
    "\\{",
    "\\}",
    "\\\\",
    "\\pi",
]
_balanced = st.recursive(
    st.lists(st.sampled_from(_ATOMS), max_size=6).map("".join),
    lambda inner: st.lists(
        inner.map(lambda s: "{" + s + "}") | inner, min_size=1, max_size=4
    ).map("".join),
    max_leaves=20,
)


@settings(max_examples=120, deadline=None)
@given(
    s=_balanced.filter(lambda s: s and s == s.strip()),
    before=st.sampled_from(["", "So ", "$", "a}{ "]),
    after=st.sampled_from(["", ".", "$.", " and then } { 5"]),
)
def test_extract_property_balanced(s, before, after):
    assert extract_answer(f"{before}\\boxed{{{s}}}{after}") == s
    # an earlier box never wins over a later one
    assert extract_answer(f"\\boxed{{0}} {before}\\boxed{{{s}}}{after}") == s


# ----------------------------------------------------------------------------- normalize_answer

NORMALIZATION_TABLE = [
    ("3", "3"),
    ("  3  ", "3"),
    ("3.", "3"),
    ("+7", "7"),
    ("007", "7"),
    ("-0", "0"),
    ("1,000", "1000"),
    ("1,000,000.50", "1000000.5"),
    ("1{,}000", "1000"),
    ("1\\,000", "1000"),
    ("1 000", "1000"),
    ("1,2,3", "1,2,3"),  # not a thousands-separated integer
    ("1, 2, 3", "1,2,3"),
    ("12,345,678", "12345678"),
    ("-1,234.50", "-1234.5"),
    ("10,\\!000", "10000"),  # the negative thin space joins
    ("1{, }000", "1000"),
    # A comma followed by a space is a list separator, never a thousands separator (issue 12):
    ("2, 100", "2, 100"),
    ("2,100", "2100"),
    ("\\boxed{32, 349}", "32, 349"),
    ("x = 2, 100", "2, 100"),
    ("2,\\,100", "2, 100"),
    ("-2, 1", "-2,1"),  # spacing matters only before a group of three digits
    ("(2, 100)", "(2,100)"),  # in brackets a comma is a separator either way
    # ... and only groups of exactly three digits, the first not starting with 0, are thousands:
    ("1000,99", "1000,99"),
    ("1,00", "1,00"),
    ("0,111", "0,111"),
    ("0, 111", "0, 111"),
    ("1,000, 000", "1,000, 000"),
    ("0.50", "0.5"),
    ("5.0", "5"),
    (".5", "0.5"),
    ("-0.0", "0"),
    ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("\\dfrac12", "\\frac{1}{2}"),
    ("\\tfrac{1}{2}", "\\frac{1}{2}"),
    ("\\dfrac{1}2", "\\frac{1}{2}"),
    ("1/2", "\\frac{1}{2}"),
    ("2/4", "\\frac{1}{2}"),
    ("\\frac{-1}{2}", "-\\frac{1}{2}"),
    ("-\\frac{2}{4}", "-\\frac{1}{2}"),
    ("\\frac{4}{2}", "2"),
    ("\\frac{1}{0}", "\\frac{1}{0}"),
    ("0.5", "0.5"),  # decimals stay decimals (not \frac{1}{2})
    ("\\frac{\\sqrt{2}}{2}", "\\frac{\\sqrt{2}}{2}"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("\\dbinom{5}{2}", "\\binom{5}{2}"),
    ("x = 3", "3"),
    ("x=3.", "3"),
    ("y = 2x + 1", "2x+1"),
    ("\\theta = 30^\\circ", "30"),
    ("x_1 = 4", "4"),
    ("x=y=3", "x=y=3"),  # more than one "=": kept
    ("f(x) = 2", "f(x)=2"),
    ("90^{\\circ}", "90"),
    ("90^\\circ", "90"),
    ("45°", "45"),
    ("\\$5.00", "5"),
    ("$\\$12$", "12"),
    ("10\\%", "10"),
    ("10%", "10"),
    ("5 \\text{ cm}^2", "5"),
    ("5\\text{ dollars}", "5"),
    ("\\frac{1}{2} \\mbox{ inch}", "\\frac{1}{2}"),
    ("\\pi \\text{ square units}", "\\pi"),
    ("\\text{Evelyn}", "Evelyn"),
    ("\\textbf{Monday}", "Monday"),
    ("Mr. \\text{Smith}", "Mr.Smith"),  # no value before the text: not a unit
    ("\\text{(A)}", "A"),
    ("(B)", "B"),
    ("(b)", "(b)"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("\\left\\{1,2\\right\\}", "\\{1,2\\}"),
    ("\\left[0,1\\right)", "[0,1)"),
    ("\\left. x \\right|", "x|"),
    ("\\!5", "5"),
    ("\\displaystyle\\frac{1}{2}", "\\frac{1}{2}"),
    ("\\boxed{3}", "3"),
    ("\\boxed{x = \\dfrac{3}{6}}", "\\frac{1}{2}"),
    ("$\\frac{3}{4}$", "\\frac{3}{4}"),
    ("\\(7\\)", "7"),
    ("f \\circ g", "f\\circ g"),  # a control word keeps its separating space
    ("\\sin  x", "\\sin x"),
    ("\\alpha + \\beta", "\\alpha+\\beta"),
    ("A", "A"),
    ("a", "a"),  # case is kept
    ("...", "..."),
    ("", ""),
    ("  ", ""),
    ("$", "$"),  # only presentation: the answer itself, so it votes only with itself
    ("\\%", "\\%"),
    ("$ $", "$$"),
]


@pytest.mark.parametrize("raw, expected", NORMALIZATION_TABLE)
def test_normalize_table(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("raw", [raw for raw, _ in NORMALIZATION_TABLE])
def test_normalize_idempotent(raw):
    once = normalize_answer(raw)
    assert normalize_answer(once) == once


def test_normalize_rejects_non_str():
    with pytest.raises(TypeError, match="str"):
        normalize_answer(None)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_normalize_total_and_deterministic(s):
    out = normalize_answer(s)
    assert isinstance(out, str)
    assert normalize_answer(s) == out


# ----------------------------------------------------------------------------- answer_id


def test_answer_id_fixed_values():
    # blake2b(digest_size=8), little-endian signed: changing the scheme changes these values
    assert answer_id("3") == 112266347804173726
    assert answer_id("\\frac{1}{2}") == -8767741731797937035
    assert answer_id("") == -5426141060434712860


def test_answer_id_properties():
    ids = {
        answer_id(normalize_answer(s))
        for s in ["1", "2", "\\frac{1}{2}", "x", "X", "0.5"]
    }
    assert len(ids) == 6
    for s in ["1", "", "héllo", "\\frac{1}{2}" * 50]:
        value = answer_id(s)
        assert isinstance(value, int)
        assert -(2**63) < value < 2**63
        assert value != NO_ANSWER
        assert answer_id(s) == value
    assert answer_id(normalize_answer("\\dfrac12")) == answer_id(
        normalize_answer("1/2")
    )
    with pytest.raises(TypeError):
        answer_id(3)  # type: ignore[arg-type]


def test_answer_id_maps_the_sentinel_away(monkeypatch):
    sentinel_digest = (2**63).to_bytes(8, "little")  # reads as -(2**63) signed
    assert int.from_bytes(sentinel_digest, "little", signed=True) == NO_ANSWER
    fake = SimpleNamespace(
        blake2b=lambda data, digest_size: SimpleNamespace(
            digest=lambda: sentinel_digest
        )
    )
    monkeypatch.setattr(grading, "hashlib", fake)
    assert answer_id("anything") == NO_ANSWER + 1


def test_no_answer_matches_the_forest():
    import ponder

    assert NO_ANSWER == ponder.NO_ANSWER == -(2**63)


# ----------------------------------------------------------------------------- is_equivalent


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("\\dfrac12", "\\frac{1}{2}"),
        ("\\dfrac12", "0.5"),
        ("x=3", "3"),
        ("3", "x=3"),
        ("x = 3", "3"),
        ("1,000", "1000"),
        ("12,345,678", "12345678"),
        ("10,\\!000", "10000"),
        ("2, 100", "2,\\ 100"),
        ("(2, 100)", "(2,100)"),
        ("5.0", "5"),
        ("\\sqrt{12}", "2\\sqrt{3}"),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
        ("\\{2,1\\}", "\\{1,2\\}"),
        ("(x+1)^2", "x^2+2x+1"),
        ("\\text{Monday}", "monday"),
        ("\\text{(C)}", "C"),
        ("90^\\circ", "90"),
        ("\\$5", "5"),
        ("\\boxed{7}", "7"),
        ("[0, 1)", "\\left[0,1\\right)"),
        (
            "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
            "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        ),
        (3, "3"),
        ("3", 3),
    ],
)
def test_equivalent_true(pred, gold):
    assert is_equivalent(pred, gold) is True


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("3", "4"),
        ("\\frac{1}{3}", "0.33"),
        ("(1,2]", "[1,2)"),
        ("x", "y"),
        ("\\text{odd}", "\\text{even}"),
        ("neve", "even"),  # math_verify alone reads both as the product e*v*e*n
        ("Mon", "Monday"),
        ("\\pi", "3.14"),
        ("-\\frac{1}{2}", "\\frac{1}{2}"),
        ("2", "\\frac{1}{2}x"),
        # issue 12: a two-solution answer is not a number, a decimal comma is not a decimal
        ("2100", "2, 100"),
        ("2, 100", "2100"),
        ("2, 100", "2,100"),
        ("\\boxed{32, 349}", "32349"),
        ("1000,99", "100099"),
        ("1000,99", "1000.99"),
        ("1,00", "1"),
        ("1,00", "100"),
        ("0,111", "111"),
        ("$", "\\%"),
    ],
)
def test_equivalent_false(pred, gold):
    assert is_equivalent(pred, gold) is False


@pytest.mark.parametrize(
    "pred, gold",
    [
        (None, "3"),
        ("", "3"),
        ("   ", "3"),
        ("3", ""),
        ("3", None),
        ("}}{{\\frac", "3"),
        ("\\boxed{", "3"),
        ("$$$", "$"),
        ("\\left(", "\\right)"),
        ("\\frac{1}{0}", "\\infty"),
        ("3", ["3"]),
        ([3], "3"),
        (True, "1"),
        ("\x00\x01", "\x00\x02"),
        ("x" * 5000, "y" * 5000),
    ],
)
def test_equivalent_garbage_is_false(pred, gold):
    assert is_equivalent(pred, gold) is False


@settings(max_examples=40, deadline=None)
@given(pred=st.text(max_size=20), gold=st.text(max_size=20))
def test_equivalent_never_raises(pred, gold):
    assert is_equivalent(pred, gold) in (True, False)


def test_equivalent_times_out():
    start = time.monotonic()
    assert is_equivalent("2^{2^{2^{100}}}", "3", timeout_s=1) is False
    assert time.monotonic() - start < 10


def test_equivalent_keeps_an_outer_alarm():
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 60.0)
        assert is_equivalent("\\frac{2}{3}", "0.6666667") is True
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < left <= 60.0  # still armed after math_verify's own alarm
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert fired == []


def test_equivalent_in_a_thread():
    results = {}

    def work():
        results["half"] = is_equivalent("\\frac{1}{2}", "0.5")
        results["sqrt"] = is_equivalent("\\sqrt{8}", "2\\sqrt{2}")
        results["wrong"] = is_equivalent("3", "4")
        results["infty"] = is_equivalent(
            "x \\in (-\\infty, 3]", "(-\\infty, 3]"
        )  # \infty is not \int
        start = time.monotonic()
        results["tower"] = is_equivalent(
            "2^{2^{2^{100}}}", "3"
        )  # no alarm here: refused
        results["factorial"] = is_equivalent("1000!", "3")
        results["risky_seconds"] = time.monotonic() - start

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert (
        results["half"] is True and results["sqrt"] is True and results["infty"] is True
    )
    assert results["wrong"] is False
    assert results["tower"] is False and results["factorial"] is False
    assert results["risky_seconds"] < 1.0


# ----------------------------------------------------------------------------- grade


def test_grade():
    r = grade("So \\boxed{\\dfrac{1}{2}}.", "0.5")
    assert r == GradeResult(
        "\\dfrac{1}{2}", "\\frac{1}{2}", answer_id("\\frac{1}{2}"), True
    )
    r = grade("\\boxed{3}", "4")
    assert r == GradeResult("3", "3", answer_id("3"), False)
    assert grade("no box, 12", "12") == GradeResult(None, None, None, False)
    r = grade("no box, 12", "12", fallback="last_number")
    assert r == GradeResult("12", "12", answer_id("12"), True)
    r = grade("The answer is $x = 5$.", "5", fallback="answer_is")
    assert r.answer == "x = 5" and r.normalized == "5" and r.correct is True
    with pytest.raises(ValueError):
        grade("x", "1", fallback="nope")


def test_grade_keeps_a_two_solution_answer_apart_from_a_number():
    pair, number = grade("so \\boxed{32, 349}", "32349"), grade("so \\boxed{32349}", "32349")
    assert pair.correct is False and number.correct is True
    assert pair.answer_id != number.answer_id
    assert grade("\\boxed{32,349}", "32349").answer_id == number.answer_id


# ----------------------------------------------------------------------------- voting vs equivalence

# Answers whose value the generator knows: a number, a bare list of integers (``2, 100``) or a
# bracketed tuple (``(2,100)``), each written in one of many presentations. Voting must merge
# two of them exactly when they are the same value.
_THOUSANDS_SEPARATORS = [",", "{,}", ",\\!", "\\,", " "]
_LIST_SEPARATORS = [", ", ",\\ ", ",\\quad ", ",\\, ", ","]
_WRAPPERS = ["{}", "${}$", "\\boxed{{{}}}", "x = {}", " {} ", "\\({}\\)"]


def _number_text(draw, whole, cents, negative):
    digits = str(whole)
    sep = draw(st.sampled_from([None, ",", *_THOUSANDS_SEPARATORS])) if whole >= 1000 else None
    if sep is not None:
        head = digits[: len(digits) % 3 or 3]
        rest = digits[len(head) :]
        digits = sep.join([head, *(rest[i : i + 3] for i in range(0, len(rest), 3))])
    if cents:
        frac = f"{cents:02d}"
        if frac.endswith("0") and draw(st.booleans()):
            frac = frac[0]
        text = ("" if whole == 0 and draw(st.booleans()) else digits) + "." + frac
    else:
        text = digits + draw(st.sampled_from(["", ".0", ".00"]))
    return ("-" if negative else draw(st.sampled_from(["", "+"]))) + text


def _list_text(draw, items, bracketed):
    text = str(items[0])
    for item in items[1:]:
        sep = draw(st.sampled_from(_LIST_SEPARATORS))
        if sep == "," and not bracketed and re.fullmatch(r"\d{3}", str(item)):
            sep = ", "  # written tight, "2,100" is the number 2100: a writer must space it
        text += sep + str(item)
    return f"({text})" if bracketed else text


_WHOLES = st.one_of(st.integers(0, 999), st.integers(1000, 10**7))
_ITEMS = st.one_of(st.integers(-999, 99), st.integers(100, 999), st.integers(1000, 99999))
_NUMBER_VALUES = st.tuples(st.just("num"), _WHOLES, st.integers(0, 99), st.booleans())
_LIST_VALUES = st.tuples(st.sampled_from(["bare", "paren"]), st.lists(_ITEMS, min_size=2, max_size=3).map(tuple))
_VALUES = st.one_of(_NUMBER_VALUES, _LIST_VALUES)


def _value(spec):
    """The value a spec stands for: ("num", Decimal) or ("bare" | "paren", items)."""
    if spec[0] == "num":
        _, whole, cents, negative = spec
        value = Decimal(whole) + Decimal(cents) / 100
        return ("num", -value if negative else value)
    return spec


def _text(draw, spec):
    """One presentation of a spec's value, wrapped in one of ``_WRAPPERS``."""
    if spec[0] == "num":
        _, whole, cents, negative = spec
        body = _number_text(draw, whole, cents, negative and bool(whole or cents))
    else:
        body = _list_text(draw, spec[1], spec[0] == "paren")
    return draw(st.sampled_from(_WRAPPERS)).format(body)


def _neighbours(spec):
    """Different values whose texts look alike: 2100 / 2, 100 / (2,100); 1000.99 / 1000, 99."""
    if spec[0] == "num":
        _, whole, cents, negative = spec
        digits = str(whole)
        head = digits[: len(digits) % 3 or 3]
        groups = [head] + [digits[i : i + 3] for i in range(len(head), len(digits), 3)]
        out = [("bare", (whole, cents)), ("paren", (whole, cents))]
        if len(groups) > 1:
            out += [("bare", tuple(map(int, groups))), ("paren", tuple(map(int, groups)))]
        return out
    kind, items = spec
    out = [("paren" if kind == "bare" else "bare", items)]
    if all(item >= 0 for item in items):
        out.append(("num", int("".join(map(str, items))), 0, False))
    if len(items) == 2 and 0 <= items[1] <= 99 and items[0] >= 0:
        out.append(("num", items[0], items[1], False))
    return out


@st.composite
def _pairs(draw):
    """Two presented answers with their values: the same value written twice, a look-alike
    value, or an unrelated one."""
    spec_a = draw(_VALUES)
    how = draw(st.sampled_from(["same", "neighbour", "other"]))
    if how == "same":
        spec_b = spec_a
    elif how == "neighbour":
        spec_b = draw(st.sampled_from(_neighbours(spec_a)))
    else:
        spec_b = draw(_VALUES)
    return (_value(spec_a), _text(draw, spec_a)), (_value(spec_b), _text(draw, spec_b))


@settings(max_examples=300, deadline=None)
@given(_pairs())
def test_voting_merges_exactly_the_equal_values(pair):
    (value_a, text_a), (value_b, text_b) = pair
    same_vote = answer_id(normalize_answer(text_a)) == answer_id(normalize_answer(text_b))
    assert same_vote == (value_a == value_b), (text_a, text_b)


@st.composite
def _look_alikes(draw):
    spec_a = draw(_VALUES)
    spec_b = draw(st.sampled_from(_neighbours(spec_a)))
    return _text(draw, spec_a), _text(draw, spec_b)


@settings(max_examples=500, deadline=None)
@given(_look_alikes())
def test_voting_keeps_look_alikes_apart(pair):
    """2100 / 2, 100 / (2,100) / 1000.99 / 1000, 99: never one vote (issue 12)."""
    text_a, text_b = pair
    assert normalize_answer(text_a) != normalize_answer(text_b), pair


_TOKENS = ["1", "2", "100", "000", "0", ",", ", ", " ", "\\,", "\\!", "{,}", ".", "$", "\\%", "x=", "(", ")",
           "\\{", "\\}", "\\frac", "{", "}", "-", "+", "\\boxed{", "\\text{ cm}", "a", "A", "=", "/"]
_TOKEN_TEXT = st.lists(st.sampled_from(_TOKENS), max_size=8).map("".join)


@st.composite
def _token_pairs(draw):
    """Two answers from a small alphabet; often the second is a light rewrite of the first."""
    a = draw(_TOKEN_TEXT)
    i = draw(st.integers(0, len(a)))
    b = draw(st.sampled_from([
        draw(_TOKEN_TEXT), a[:i] + " " + a[i:], "$" + a + "$", "\\boxed{" + a + "}", a.replace(",", "{,}"),
        a.replace(", ", ","), a.replace(",", ", "), a + ".", "x = " + a,
    ]))
    return a, b


@settings(max_examples=300, deadline=None)
@given(_token_pairs())
def test_same_voting_id_implies_equivalent(pair):
    """The voting id never merges answers that ``is_equivalent`` keeps apart."""
    a, b = pair
    if a.strip() and b.strip() and answer_id(normalize_answer(a)) == answer_id(normalize_answer(b)):
        assert is_equivalent(a, b) is True
        assert is_equivalent(b, a) is True


# ----------------------------------------------------------------------------- metrics


def brute_pass_at_k(n, c, k):
    flags = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(flags[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(
                brute_pass_at_k(n, c, k), abs=1e-12
            )
            assert pass_at_k(n, c, k) == pytest.approx(
                1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12
            )


def test_pass_at_k_edges_and_large():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 6, 5) == 1.0  # fewer than k wrong samples
    big = pass_at_k(10_000, 17, 256)
    assert big == pytest.approx(
        1 - math.comb(10_000 - 17, 256) / math.comb(10_000, 256), rel=1e-9
    )
    for args in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1)]:
        with pytest.raises(ValueError, match="need"):
            pass_at_k(*args)
    for args in [(5.0, 2, 1), (5, True, 1), (5, 2, "1")]:
        with pytest.raises(TypeError, match="must be an int"):
            pass_at_k(*args)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_pass_at_k_monotone(nc):
    n, c = nc
    values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(c / n)
    if c < n:
        assert all(
            pass_at_k(n, c, k) <= pass_at_k(n, c + 1, k) + 1e-12
            for k in range(1, n + 1)
        )


def test_accuracy():
    assert accuracy([True, False, True, True]) == 0.75
    assert accuracy([1, 0]) == 0.5
    assert accuracy(iter([False])) == 0.0
    with pytest.raises(ValueError, match="empty"):
        accuracy([])


@dataclass
class Row:
    level: int | None
    correct: bool


def test_accuracy_by_level():
    rows = [
        {"level": 3, "correct": True},
        {"level": 1, "correct": False},
        {"level": 3, "correct": False},
        {"level": None, "correct": True},
        {"level": 1, "correct": True},
        {"level": 3, "correct": True},
    ]
    result = accuracy_by_level(rows)
    assert result == {1: (0.5, 2), 3: (pytest.approx(2 / 3), 3), None: (1.0, 1)}
    assert list(result) == [1, 3, None]
    assert accuracy_by_level([Row(2, True), Row(2, False)]) == {2: (0.5, 2)}
    renamed = [{"difficulty": "hard", "ok": 1}, {"difficulty": "easy", "ok": 0}]
    assert accuracy_by_level(renamed, level_key="difficulty", correct_key="ok") == {
        "easy": (0.0, 1),
        "hard": (1.0, 1),
    }
    assert accuracy_by_level([]) == {}
    with pytest.raises(KeyError):
        accuracy_by_level([{"correct": True}])
