"""The built-in multi-step arithmetic task ``builtin:arith``.

Problems are integer expressions over ``+ - *`` ("Compute (7 - 4) * 3 + 8 * (2 + 5).") at
difficulty levels 1-5: the number of operations, the nesting depth and the operand sizes grow
with the level, and every intermediate value (so also the answer) satisfies ``|v| < 1000`` (tighter bounds at lower levels).

The reference solution rewrites the expression one operation per step; steps are separated by
a blank line (``"\\n\\n"``) and the last one is ``"The answer is \\boxed{N}."``::

    13 * 3 + 8 * (2 + 5)

    13 * 3 + 8 * 7

    39 + 8 * 7

    39 + 56

    95

    The answer is \\boxed{95}.

Order of the reference steps: among the operations whose operands are both numbers, the one
inside the most parentheses first, then multiplication before addition/subtraction, then the
leftmost. (``label_steps`` accepts any order: every single valid rewrite is correct.)

``label_steps`` gives exact Math-Shepherd-style process labels for any candidate solution;
see its docstring. Expressions are read with a small recursive-descent parser (never
``eval``) into trees: an ``int`` is a number, ``(op, left, right)`` an operation.

Splits: ``write_eval_set`` writes the held-out evaluation set (500 problems, 100 per level,
from a fixed seed), shipped as ``arith_eval.jsonl`` next to this module and regenerated with
``python -m ponder.toy.arith --write-eval``; ``train_stream(seed)`` is an endless stream of
training problems that never repeats an evaluation expression; ``load_arith`` (registered as
``builtin:arith``) reads split ``"test"`` (the evaluation set) or ``"train"`` (a fixed sample
of 1000 problems of ``train_stream(TRAIN_SEED)``).
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Union

__all__ = [
    "EVAL_PATH",
    "EVAL_PER_LEVEL",
    "EVAL_SEED",
    "LEVELS",
    "MAX_ABS",
    "DEFAULT_PER_LEVEL",
    "SEARCH_LIMITS",
    "TASK",
    "TRAIN_SAMPLE_SIZE",
    "TRAIN_SEED",
    "ArithProblem",
    "count_operations",
    "eval_problems",
    "evaluate",
    "generate_problem",
    "is_single_rewrite",
    "label_steps",
    "load_arith",
    "parse_expression",
    "parse_question",
    "render",
    "solution_text",
    "train_stream",
    "write_eval_set",
]

Tree = Union[int, tuple]  # int: a number; (op, left, right): an operation

MAX_ABS = 1_000  # every value in a generated problem has |v| < MAX_ABS (levels bound it tighter)
LEVELS = (1, 2, 3, 4, 5)
EVAL_SEED = 20_240_501
TRAIN_SEED = 7_919
EVAL_PER_LEVEL = 100
TRAIN_SAMPLE_SIZE = 1000
#: ``ponder.data.Problem.task`` of this task's problems (``load_arith`` sets it)
TASK = "arith"
#: search limits for this task (``ponder.toy.task_defaults``): its solutions have at most ~10 steps
#: of at most ~70 tokens, so tighter limits than the generic ones (``SearchConfig``'s 40 iterations,
#: 64 steps x 256 tokens, which let one path run to 16k tokens) stop a runaway sample early
SEARCH_LIMITS = {"num_iterations": 16, "max_steps": 16, "max_step_tokens": 96}
#: the default slice of the test split in an evaluation: the first 6 problems of each level
DEFAULT_PER_LEVEL = 6
EVAL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arith_eval.jsonl")

_PREC = {"+": 1, "-": 1, "*": 2}


@dataclass(frozen=True)
class _LevelSpec:
    ops: tuple[int, int]  # number of operations, inclusive range
    height: int  # maximum tree height (so nesting depth)
    operand: int  # operands of + and - are in 1..operand
    factor: int  # operands of * that are numbers are in 2..factor
    max_abs: int  # every value of the problem (and of its reference steps) has |v| < max_abs


# Small numbers on purpose: the shipped ~1M-parameter policy has to learn the arithmetic facts
# from a CPU-sized training budget, and its errors should be ones that sampling several times
# and verifying can fix. Difficulty grows with the level through the number of operations,
# the nesting and the size of the numbers.
_SPECS = {
    1: _LevelSpec(ops=(1, 2), height=2, operand=9, factor=5, max_abs=100),
    2: _LevelSpec(ops=(2, 3), height=2, operand=12, factor=6, max_abs=100),
    3: _LevelSpec(ops=(3, 4), height=3, operand=15, factor=7, max_abs=200),
    4: _LevelSpec(ops=(4, 6), height=3, operand=20, factor=8, max_abs=500),
    5: _LevelSpec(ops=(6, 8), height=4, operand=30, factor=9, max_abs=MAX_ABS),
}


@dataclass(frozen=True)
class ArithProblem:
    """One generated problem: ``expression`` (rendered), ``question`` ("Compute <expr>."),
    the integer ``answer`` and the reference ``solution_steps`` (one operation per step, then
    ``"The answer is \\boxed{N}."``)."""

    id: str
    level: int
    expression: str
    question: str
    answer: int
    solution_steps: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- trees


def evaluate(tree: Tree) -> int:
    """The value of an expression tree."""
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    a, b = evaluate(left), evaluate(right)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def count_operations(tree: Tree) -> int:
    """The number of operations in a tree."""
    return (
        0
        if isinstance(tree, int)
        else 1 + count_operations(tree[1]) + count_operations(tree[2])
    )


def _needs_parens(parent_op: str, child: Tree, right: bool) -> bool:
    if isinstance(child, int):
        return False
    prec, child_prec = _PREC[parent_op], _PREC[child[0]]
    return child_prec < prec or (right and child_prec == prec)


def render(tree: Tree, _top: bool = True) -> str:
    """The text of a tree with the fewest parentheses that keep its shape (a right operand of
    equal precedence is parenthesized, so ``a + (b + c)`` stays as written); a negative number
    is written ``(-7)`` inside an expression and ``-7`` alone."""
    if isinstance(tree, int):
        return str(tree) if tree >= 0 or _top else f"({tree})"
    op, left, right = tree
    parts = []
    for child, is_right in ((left, False), (right, True)):
        text = render(child, False)
        parts.append(f"({text})" if _needs_parens(op, child, is_right) else text)
    return f"{parts[0]} {op} {parts[1]}"


def _redexes(tree: Tree) -> list[tuple[tuple[int, int, int], tuple[int, ...]]]:
    """The operations whose operands are both numbers: (sort key, path); the key orders them
    as the reference solution does (most parentheses, then ``*``, then leftmost)."""
    found: list[tuple[tuple[int, int, int], tuple[int, ...]]] = []

    def walk(node: Tree, path: tuple[int, ...], depth: int) -> None:
        if isinstance(node, int):
            return
        op, left, right = node
        if isinstance(left, int) and isinstance(right, int):
            found.append(((-depth, 0 if op == "*" else 1, len(found)), path))
            return
        for index, child, is_right in ((1, left, False), (2, right, True)):
            walk(child, (*path, index), depth + _needs_parens(op, child, is_right))

    walk(tree, (), 0)
    return found


def _reduce_at(tree: Tree, path: tuple[int, ...]) -> Tree:
    if not path:
        return evaluate(tree)
    node = list(tree)
    node[path[0]] = _reduce_at(tree[path[0]], path[1:])
    return tuple(node)


def _reference_trees(tree: Tree) -> list[Tree]:
    """The trees after each step of the reference solution (the last one is the answer)."""
    trees = []
    while not isinstance(tree, int):
        _, path = min(_redexes(tree))
        tree = _reduce_at(tree, path)
        trees.append(tree)
    return trees


def is_single_rewrite(prev: Tree, cur: Tree) -> bool:
    """True iff ``cur`` is ``prev`` with exactly one operation whose operands are both numbers
    replaced by its value, everything else unchanged (compared as trees)."""
    if isinstance(prev, int):
        return False
    op, left, right = prev
    if isinstance(left, int) and isinstance(right, int):
        return isinstance(cur, int) and cur == evaluate(prev)
    if isinstance(cur, int) or cur[0] != op:
        return False
    return (is_single_rewrite(left, cur[1]) and right == cur[2]) or (
        left == cur[1] and is_single_rewrite(right, cur[2])
    )


# ----------------------------------------------------------------------------- parsing

_TOKEN_RE = re.compile(r"\s*(?:(\d+)|([-+*()]))")
_MAX_TEXT = 4000
_MAX_DIGITS = 18


def _tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise ValueError(
                f"unexpected character {text[pos:].lstrip()[:1]!r} in {text!r}"
            )
        token = match.group(1) or match.group(2)
        if match.group(1) and len(token) > _MAX_DIGITS:
            raise ValueError(f"number too long in {text!r}")
        tokens.append(token)
        pos = match.end()
    return tokens


def parse_expression(text: str) -> Tree:
    """Parse ``+ - *`` integer arithmetic with parentheses and standard precedence (``*``
    before ``+ -``, left-associative) into a tree. A minus directly before a number makes a
    negative number (``-7``, ``3 * (-7)``); there is no other unary operator. Raises
    ValueError for anything else."""
    if not isinstance(text, str) or len(text) > _MAX_TEXT:
        raise ValueError("expression must be a string of at most 4000 characters")
    tokens = _tokenize(text)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"unexpected end of {text!r}")
        pos += 1
        return tokens[pos - 1]

    def expr() -> Tree:
        node = term()
        while peek() in ("+", "-"):
            op = take()
            node = (op, node, term())
        return node

    def term() -> Tree:
        node = factor()
        while peek() == "*":
            take()
            node = ("*", node, factor())
        return node

    def factor() -> Tree:
        token = take()
        if token.isdigit():
            return int(token)
        if token == "-" and (peek() or "").isdigit():
            return -int(take())
        if token == "(":
            node = expr()
            if take() != ")":
                raise ValueError(f"expected ')' in {text!r}")
            return node
        raise ValueError(f"unexpected {token!r} in {text!r}")

    tree = expr()
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r} in {text!r}")
    return tree


_QUESTION_RE = re.compile(
    r"^\s*(?:(?:compute|calculate|evaluate|what\s+is)\s*:?\s*)?(.*?)\s*[.?]?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_ANSWER_RE = re.compile(
    r"^\s*the\s+answer\s+is\s*:?\s*\\boxed\{\s*(-?\d{1,18})\s*\}\s*\.?\s*$",
    re.IGNORECASE,
)


def parse_question(question_or_expression: str) -> Tree:
    """The expression of a question ("Compute <expr>.", also "Calculate", "Evaluate",
    "What is ...?") or a bare expression, as a tree."""
    match = _QUESTION_RE.match(question_or_expression)
    return parse_expression(match.group(1) if match else question_or_expression)


def _parse_step(step: str) -> tuple[Tree, bool] | None:
    """(tree, is_answer_line), or None when the step is neither an expression nor an answer
    line. An expression step may start with ``=`` and end with ``.``."""
    if not isinstance(step, str):
        return None
    match = _ANSWER_RE.match(step)
    if match:
        return int(match.group(1)), True
    text = step.strip()
    text = text.removeprefix("=")
    text = text.removesuffix(".")
    try:
        return parse_expression(text), False
    except ValueError:
        return None


def label_steps(question_or_expression: str, steps: list[str]) -> list[bool]:
    """Exact process labels for a candidate solution, one per step.

    A step is correct iff all earlier steps are correct and it is either

    * an expression (optionally ``"= ..."`` or ending in ``.``) whose value equals the
      previous expression's value and that is a single valid rewrite of it: exactly one
      operation of the previous expression (both operands numbers) replaced by its value,
      everything else unchanged, compared on parsed trees (so spacing and redundant
      parentheses do not matter, but doing two operations at once, none, or the wrong one
      does); or
    * the answer line ``"The answer is \\boxed{N}."`` where ``N`` is the previous expression
      when that is a number already, or its value when a single operation is left.

    The answer line ends a solution: any step after it is incorrect. The "previous
    expression" of the first step is the question's. Math-Shepherd convention: once a step is
    incorrect, every later step is incorrect too (a solution that went wrong cannot recover,
    even if a later step happens to be right relative to the wrong one).

    Raises ValueError if the question's expression does not parse.
    """
    prev = parse_question(question_or_expression)
    target = evaluate(prev)
    labels: list[bool] = []
    ok, done = True, False
    for step in steps:
        if ok:
            parsed = None if done else _parse_step(step)
            ok = False
            if parsed is not None:
                cur, is_answer = parsed
                if evaluate(cur) == target and (
                    is_single_rewrite(prev, cur) or (is_answer and cur == prev)
                ):
                    ok, prev, done = True, cur, is_answer
        labels.append(ok)
    return labels


def solution_text(problem: ArithProblem) -> str:
    """The reference solution: its steps joined by blank lines."""
    return "\n\n".join(problem.solution_steps)


# ----------------------------------------------------------------------------- generation


def _shape(rng: random.Random, ops: int, height: int) -> Tree:
    """A random tree shape with ``ops`` operations (all ``"?"``, leaves 0) of height <= height."""
    if ops == 0:
        return 0
    capacity = 2 ** (height - 1) - 1  # most operations a subtree of height-1 holds
    left = rng.randint(max(0, ops - 1 - capacity), min(ops - 1, capacity))
    return ("?", _shape(rng, left, height - 1), _shape(rng, ops - 1 - left, height - 1))


def _fill(
    rng: random.Random, shape: Tree, spec: _LevelSpec, parent: str | None
) -> Tree:
    if isinstance(shape, int):
        return (
            rng.randint(2, spec.factor)
            if parent == "*"
            else rng.randint(1, spec.operand)
        )
    op = rng.choice("+-*")
    return (op, _fill(rng, shape[1], spec, op), _fill(rng, shape[2], spec, op))


def _bounded(tree: Tree, limit: int) -> bool:
    if isinstance(tree, int):
        return abs(tree) < limit
    return _bounded(tree[1], limit) and _bounded(tree[2], limit) and abs(evaluate(tree)) < limit


def _random_tree(rng: random.Random, level: int) -> Tree:
    spec = _SPECS[level]
    ops = rng.randint(*spec.ops)
    while True:
        tree = _fill(rng, _shape(rng, ops, spec.height), spec, None)
        if _bounded(tree, spec.max_abs) and all(
            abs(evaluate(t)) < spec.max_abs for t in _reference_trees(tree)
        ):
            return tree


def _problem_from_tree(tree: Tree, level: int, id: str) -> ArithProblem:
    expression = render(tree)
    steps = [render(t) for t in _reference_trees(tree)]
    answer = evaluate(tree)
    steps.append(f"The answer is \\boxed{{{answer}}}.")
    return ArithProblem(
        id=id,
        level=level,
        expression=expression,
        question=f"Compute {expression}.",
        answer=answer,
        solution_steps=steps,
    )


def generate_problem(
    rng: random.Random, level: int, id: str | None = None
) -> ArithProblem:
    """A random problem of difficulty ``level`` (1-5) drawn with ``rng`` (a
    ``random.Random``; the same state gives the same problem). ``id`` defaults to
    ``"arith-L<level>-<expression>"`` with the spaces removed."""
    if level not in _SPECS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    tree = _random_tree(rng, level)
    if id is None:
        id = f"arith-L{level}-{render(tree).replace(' ', '')}"
    return _problem_from_tree(tree, level, id)


# ----------------------------------------------------------------------------- splits


def eval_problems() -> list[ArithProblem]:
    """The held-out evaluation problems: 100 distinct expressions per level, levels 1-5 in
    order, ids ``arith-test-0000`` .. ``arith-test-0499``."""
    return list(_eval_problems())


@functools.lru_cache(maxsize=1)
def _eval_problems() -> tuple[ArithProblem, ...]:
    problems: list[ArithProblem] = []
    seen: set[str] = set()
    for level in LEVELS:
        rng = random.Random(EVAL_SEED * 10 + level)
        count = 0
        while count < EVAL_PER_LEVEL:
            problem = generate_problem(rng, level, id=f"arith-test-{len(problems):04d}")
            if problem.expression in seen:
                continue
            seen.add(problem.expression)
            problems.append(problem)
            count += 1
    return tuple(problems)


def _eval_expressions() -> frozenset[str]:
    return frozenset(p.expression for p in _eval_problems())


def train_stream(seed: int, levels: tuple[int, ...] = LEVELS) -> Iterator[ArithProblem]:
    """An endless, reproducible stream of training problems: each level drawn uniformly from
    ``levels``, ids ``arith-train-<seed>-<n>``; expressions of the evaluation set are skipped."""
    levels = tuple(levels)
    for level in levels:
        if level not in _SPECS:
            raise ValueError(f"levels must be among {LEVELS}, got {level!r}")
    rng = random.Random(seed)
    held_out = _eval_expressions()
    n = 0
    while True:
        level = rng.choice(levels)
        problem = generate_problem(rng, level, id=f"arith-train-{seed}-{n}")
        if problem.expression in held_out:
            continue
        n += 1
        yield problem


def _row(problem: ArithProblem) -> dict:
    return {
        "id": problem.id,
        "problem": problem.question,
        "answer": str(problem.answer),
        "level": problem.level,
        "solution": solution_text(problem),
    }


def write_eval_set(path: str | os.PathLike = EVAL_PATH) -> str:
    """Write the evaluation set as JSONL (fields id, problem, answer, level, solution; one
    object per line, ``\\n`` line ends, UTF-8) and return the path."""
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(
            json.dumps(_row(problem), ensure_ascii=False) + "\n"
            for problem in _eval_problems()
        )
    return path


def _spread_over_levels(rows: list[dict], limit: int) -> list[dict]:
    """``limit`` rows taken level by level in turn (each level's rows in file order), in file order."""
    by_level: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_level.setdefault(int(row["level"]), []).append(i)
    queues = [by_level[level] for level in sorted(by_level)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(limit, len(rows)):
        for queue in queues:
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    return [rows[i] for i in sorted(chosen)]


def load_arith(split: str = "test", limit: int | None = None) -> list:
    """``builtin:arith``: the evaluation set (``split="test"``, read from the shipped
    ``arith_eval.jsonl``) or the fixed training sample (``split="train"``: the first 1000
    problems of ``train_stream(TRAIN_SEED)``) as ``ponder.data.Problem`` objects with
    ``level`` set, ``meta={"solution": <reference solution>}`` and ``task=TASK``.

    ``limit=K`` keeps K problems: on the test split (sorted by level) the first problems of
    every level in turn (level 1's first, level 2's first, ..., then each level's second, ...),
    so any K spreads over the levels, returned in file order; on the train split (levels
    mixed) the first K."""
    from ..data import Problem

    if split == "test":
        with open(EVAL_PATH, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif split == "train":
        stream = train_stream(TRAIN_SEED)
        rows = [_row(next(stream)) for _ in range(TRAIN_SAMPLE_SIZE)]
    else:
        raise ValueError(f"builtin:arith has splits 'test' and 'train', got {split!r}")
    if limit is not None and split == "test":
        rows = _spread_over_levels(rows, limit)
    elif limit is not None:
        rows = rows[:limit]
    return [
        Problem(
            id=row["id"],
            problem=row["problem"],
            answer=str(row["answer"]),
            level=int(row["level"]),
            meta={"solution": row["solution"]},
            task=TASK,
        )
        for row in rows
    ]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m ponder.toy.arith", description="The built-in arithmetic task."
    )
    parser.add_argument(
        "--write-eval",
        nargs="?",
        const=EVAL_PATH,
        metavar="PATH",
        help=f"write the evaluation set (default: {EVAL_PATH})",
    )
    args = parser.parse_args(argv)
    if args.write_eval is None:
        parser.print_help()
        return 2
    print(write_eval_set(args.write_eval))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
