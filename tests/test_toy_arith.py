"""The built-in arithmetic task (ponder.toy.arith): generation, exact step labels, splits."""

from __future__ import annotations

import json
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ponder.data import Problem, builtin_names, load_problems
from ponder.grading import extract_answer
from ponder.toy import arith
from ponder.toy.arith import (
    EVAL_PATH,
    ArithProblem,
    count_operations,
    evaluate,
    generate_problem,
    label_steps,
    parse_expression,
    parse_question,
    render,
    solution_text,
    train_stream,
    write_eval_set,
)

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
seeds = st.integers(0, 2**32 - 1)
levels = st.integers(1, 5)


def make(seed: int, level: int) -> ArithProblem:
    return generate_problem(random.Random(seed), level)


def expressions(p: ArithProblem) -> list[str]:
    """The question's expression followed by every expression step."""
    return [p.expression, *p.solution_steps[:-1]]


# ----------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("10 - 4 - 3", 3),
        ("10 - (4 - 3)", 9),
        ("2 * 3 * 4", 24),
        ("-7", -7),
        ("3 * (-7) + 1", -20),
        ("((5))", 5),
        ("  12+3*  4 ", 24),
    ],
)
def test_parser_values(text, value):
    assert evaluate(parse_expression(text)) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1 +",
        "(1 + 2",
        "1 + 2)",
        "2 ** 3",
        "1 / 2",
        "-(1 + 2)",
        "__import__('os')",
        "1 2",
        "1.5",
    ],
)
def test_parser_rejects(text):
    with pytest.raises(ValueError):
        parse_expression(text)


def test_parse_question_forms():
    tree = parse_expression("(17 - 4) * 3 + 8 * (2 + 5)")
    for text in (
        "Compute (17 - 4) * 3 + 8 * (2 + 5).",
        "(17 - 4) * 3 + 8 * (2 + 5)",
        "What is (17-4)*3+8*(2+5)?",
    ):
        assert parse_question(text) == tree


def test_worked_example():
    tree = parse_expression("(17 - 4) * 3 + 8 * (2 + 5)")
    p = arith._problem_from_tree(tree, 3, "x")
    assert p.question == "Compute (17 - 4) * 3 + 8 * (2 + 5)."
    assert p.answer == 95
    assert p.solution_steps == [
        "13 * 3 + 8 * (2 + 5)",
        "13 * 3 + 8 * 7",
        "39 + 8 * 7",
        "39 + 56",
        "95",
        "The answer is \\boxed{95}.",
    ]
    assert label_steps(p.question, p.solution_steps) == [True] * 6
    # any order of single rewrites is correct; restating, answering early or late is handled
    assert (
        label_steps(
            p.question,
            [
                "(17 - 4) * 3 + 8 * 7",
                "= 13*3 + ((8*7)).",
                "13 * 3 + 56",
                "39 + 56",
                "95",
                "The answer is \\boxed{95}.",
            ],
        )
        == [True] * 6
    )
    assert label_steps(p.question, ["(17 - 4) * 3 + 8 * 7", "13 * 3 + 56"]) == [
        True,
        False,
    ]
    assert label_steps("2 + 3", ["The answer is \\boxed{5}."]) == [True]
    assert label_steps("2 + 3 * 4", ["The answer is \\boxed{14}."]) == [False]
    assert label_steps("2 + 3", ["5", "5"]) == [True, False]
    assert label_steps("2 + 3", ["5", "The answer is \\boxed{5}.", "5"]) == [
        True,
        True,
        False,
    ]
    assert label_steps("2 + 3", ["5", "The answer is \\boxed{6}."]) == [True, False]
    # wrong precedence, then a step that is right relative to the wrong one: still wrong
    assert (
        label_steps("2 + 3 * 4", ["5 * 4", "20", "The answer is \\boxed{20}."])
        == [False] * 3
    )
    assert label_steps("2 + 3 * 4", ["2 + 12", "14 + 0", "14"]) == [True, False, False]
    assert label_steps("2 + 3 * 4", []) == []


# ----------------------------------------------------------------------------- generation


@SETTINGS
@given(seeds, levels)
def test_reference_solution_is_correct(seed, level):
    p = make(seed, level)
    assert p == make(seed, level)  # deterministic
    tree = parse_question(p.question)
    assert render(tree) == p.expression and evaluate(tree) == p.answer
    assert p.question == f"Compute {p.expression}."
    assert len(p.solution_steps) == count_operations(tree) + 1
    assert label_steps(p.question, p.solution_steps) == [True] * len(p.solution_steps)
    exprs = expressions(p)
    for before, after in zip(exprs, exprs[1:]):
        t0, t1 = parse_expression(before), parse_expression(after)
        assert evaluate(t1) == p.answer
        assert count_operations(t1) == count_operations(t0) - 1
        assert arith.is_single_rewrite(t0, t1)
    assert parse_expression(exprs[-1]) == p.answer
    assert p.solution_steps[-1] == f"The answer is \\boxed{{{p.answer}}}."
    assert extract_answer(solution_text(p)) == str(p.answer)
    assert solution_text(p).split("\n\n") == p.solution_steps
    # bounded values: every subexpression of every step
    for text in exprs:
        stack = [parse_expression(text)]
        while stack:
            node = stack.pop()
            assert abs(evaluate(node)) < arith.MAX_ABS
            if not isinstance(node, int):
                stack += [node[1], node[2]]


def test_levels_get_harder():
    stats = []
    for level in arith.LEVELS:
        rng = random.Random(level)
        ps = [generate_problem(rng, level) for _ in range(200)]
        trees = [parse_expression(p.expression) for p in ps]
        stats.append(
            (
                sum(map(count_operations, trees)) / len(ps),
                sum(max(map(int, re.findall(r"\d+", p.expression))) for p in ps)
                / len(ps),
                sum(p.expression.count("(") for p in ps) / len(ps),
            )
        )
    for easier, harder in zip(stats, stats[1:]):
        assert harder[0] > easier[0]  # more operations
        assert harder[1] > easier[1]  # larger operands
    assert stats[-1][2] > stats[0][2]  # more nesting
    with pytest.raises(ValueError):
        generate_problem(random.Random(0), 6)


# ----------------------------------------------------------------------------- corruptions


def _bump_number(text: str, rng: random.Random) -> str:
    numbers = list(re.finditer(r"\d+", text))
    m = numbers[rng.randrange(len(numbers))]
    return text[: m.start()] + str(int(m.group()) + rng.randint(1, 9)) + text[m.end() :]


def _wrong_precedence(prev: str) -> str | None:
    """Do ``a + b`` of ``a + b * c`` first (ignoring that ``*`` binds tighter)."""
    tokens = re.findall(r"\d+|[-+*()]", prev)
    for i in range(len(tokens) - 3):
        a, op, b, nxt = tokens[i : i + 4]
        if a.isdigit() and op in "+-" and b.isdigit() and nxt == "*":
            if i > 0 and tokens[i - 1] in ("*", "-"):
                continue
            value = int(a) + int(b) if op == "+" else int(a) - int(b)
            return " ".join(
                tokens[:i]
                + [f"({value})" if value < 0 else str(value)]
                + tokens[i + 3 :]
            )
    return None


def _check_corrupted(p: ArithProblem, k: int, steps: list[str]) -> None:
    labels = label_steps(p.question, steps)
    assert labels == [True] * k + [False] * (len(steps) - k), (
        p.question,
        steps,
        labels,
    )


@SETTINGS
@given(seeds, levels, st.data())
def test_changed_number_is_wrong_from_there_on(seed, level, data):
    p = make(seed, level)
    k = data.draw(st.integers(0, len(p.solution_steps) - 1))
    steps = list(p.solution_steps)
    steps[k] = _bump_number(steps[k], random.Random(seed))
    _check_corrupted(p, k, steps)


@SETTINGS
@given(seeds, levels, st.data())
def test_skipped_operation_is_wrong_from_there_on(seed, level, data):
    p, _ = _with_candidates(seed, level, lambda p: len(p.solution_steps) >= 3)
    n = len(p.solution_steps) - 1  # expression steps, >= 2
    k = data.draw(st.integers(0, n - 2))
    skipped = (
        p.solution_steps[:k] + p.solution_steps[k + 1 :]
    )  # two operations in step k
    _check_corrupted(p, k, skipped)
    merged = list(
        p.solution_steps
    )  # two operations at once, then a (now) repeated step
    merged[k] = merged[k + 1]
    _check_corrupted(p, k, merged)
    early = p.solution_steps[:k] + [
        p.solution_steps[-1]
    ]  # answering with operations left
    _check_corrupted(p, k, early)


def _with_candidates(seed: int, level: int, find) -> tuple[ArithProblem, list]:
    """The first problem drawn from ``Random(seed)`` at ``level`` with a non-empty
    ``find(problem)`` (drawing again instead of filtering keeps hypothesis' filter low)."""
    rng = random.Random(seed)
    for _ in range(200):
        p = generate_problem(rng, level)
        candidates = find(p)
        if candidates:
            return p, candidates
    raise AssertionError(
        f"no problem with candidates at level {level} from seed {seed}"
    )


def _double_rewrites(p: ArithProblem) -> list[tuple[int, str]]:
    """(k, expression k with two of its operations done at once) for every such k."""
    found = []
    for k, text in enumerate(expressions(p)[:-1]):
        tree = parse_expression(text)
        redexes = arith._redexes(tree)
        if len(redexes) >= 2:  # disjoint subtrees: reducing one keeps the other's path
            both = arith._reduce_at(
                arith._reduce_at(tree, redexes[0][1]), redexes[1][1]
            )
            found.append((k, render(both)))
    return found


@SETTINGS
@given(seeds, st.integers(2, 5), st.data())
def test_two_operations_at_once_is_wrong(seed, level, data):
    p, candidates = _with_candidates(seed, level, _double_rewrites)
    k, both = data.draw(st.sampled_from(candidates))
    steps = p.solution_steps[:k] + [both] + p.solution_steps[k + 1 :]
    _check_corrupted(p, k, steps)


def _precedence_errors(p: ArithProblem) -> list[tuple[int, str]]:
    return [
        (k, w) for k, e in enumerate(expressions(p)[:-1]) if (w := _wrong_precedence(e))
    ]


@SETTINGS
@given(seeds, st.integers(1, 5), st.data())
def test_wrong_precedence_is_wrong_from_there_on(seed, level, data):
    p, candidates = _with_candidates(seed, level, _precedence_errors)
    k, wrong = data.draw(st.sampled_from(candidates))
    steps = p.solution_steps[:k] + [wrong] + p.solution_steps[k + 1 :]
    _check_corrupted(p, k, steps)


@SETTINGS
@given(seeds, levels, st.data(), st.text(max_size=20))
def test_garbage_step_is_wrong(seed, level, data, junk):
    p = make(seed, level)
    k = data.draw(st.integers(0, len(p.solution_steps) - 1))
    steps = list(p.solution_steps)
    steps[k] = "I think " + junk
    _check_corrupted(p, k, steps)


# ----------------------------------------------------------------------------- splits


def test_shipped_eval_set_matches_generator(tmp_path):
    regenerated = write_eval_set(tmp_path / "eval.jsonl")
    with open(EVAL_PATH, "rb") as shipped, open(regenerated, "rb") as fresh:
        assert shipped.read() == fresh.read()
    with open(EVAL_PATH, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 500
    assert all(
        set(row) == {"id", "problem", "answer", "level", "solution"} for row in rows
    )
    assert [sum(row["level"] == level for row in rows) for level in arith.LEVELS] == [
        100
    ] * 5
    assert len({row["id"] for row in rows}) == 500
    assert len({row["problem"] for row in rows}) == 500
    for row in rows:
        steps = row["solution"].split("\n\n")
        assert label_steps(row["problem"], steps) == [True] * len(steps)
        assert extract_answer(row["solution"]) == row["answer"]
        assert str(evaluate(parse_question(row["problem"]))) == row["answer"]


def test_train_stream_is_reproducible_and_held_out():
    first = [next(s) for s in [train_stream(3)] for _ in range(400)]
    again = train_stream(3)
    assert [next(again) for _ in range(400)] == first
    assert {p.level for p in first} == set(arith.LEVELS)
    held_out = {p.expression for p in arith.eval_problems()}
    assert not held_out & {p.expression for p in first}
    assert [p.expression for p in first] != [
        next(train_stream(4)).expression for _ in range(400)
    ]
    only_1 = train_stream(5, levels=(1,))
    assert {next(only_1).level for _ in range(50)} == {1}


def test_load_problems_builtin():
    assert "arith" in builtin_names()
    problems = load_problems("builtin:arith", limit=5)
    assert len(problems) == 5
    assert all(isinstance(p, Problem) and p.level in arith.LEVELS for p in problems)
    # the file is sorted by level: a limit takes each level's first problems in turn
    assert [p.id for p in problems] == [f"arith-test-{i:04d}" for i in range(0, 500, 100)]
    assert [p.level for p in problems] == list(arith.LEVELS)
    assert all(extract_answer(p.meta["solution"]) == p.answer for p in problems)
    full = load_problems("builtin:arith")
    assert len(full) == 500 and {p.level for p in full} == set(arith.LEVELS)
    seven = load_problems("builtin:arith", limit=7)
    assert [p.level for p in seven] == [1, 1, 2, 2, 3, 4, 5]
    assert [p.id for p in seven] == [p.id for p in full if p.id in {q.id for q in seven}]  # file order
    assert [p.id for p in seven[:2]] == [full[0].id, full[1].id]
    train = load_problems("builtin:arith", split="train")
    assert len(train) == arith.TRAIN_SAMPLE_SIZE
    assert not {p.problem for p in train} & {p.problem for p in full}
    assert load_problems("builtin:arith", split="train", limit=3) == train[:3]
    with pytest.raises(ValueError, match="splits"):
        load_problems("builtin:arith", split="validation")
