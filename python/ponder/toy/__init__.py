"""ponder's built-in toy tasks, registered for ``ponder.data.load_problems("builtin:<name>")``.

* ``builtin:arith``: multi-step integer arithmetic at levels 1-5 with exact step labels
  (``ponder.toy.arith``).

Its models ship in ``models/`` (``builtin:policy-small``, ``builtin:policy-large``,
``builtin:prm``; see ``ponder.toy.builtin``) and are retrained by ``ponder toy train``
(``ponder.toy.train``).

``ponder.data`` imports this package on the first ``builtin:`` look-up. The task modules are
imported only when a task is loaded. A name that is already registered when this package
is first imported keeps its loader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .. import data as _data
from ..data import register_builtin

__all__ = ["TaskDefaults", "load_arith", "task_defaults"]


@dataclass(frozen=True)
class TaskDefaults:
    """What an evaluation of a built-in task's problems uses unless told otherwise: the search
    limits (``SearchConfig.num_iterations``, ``max_steps``, ``sampling.max_step_tokens``) and
    ``per_level``, the default slice (the first K problems of each level; None: all)."""

    num_iterations: int
    max_steps: int
    max_step_tokens: int
    per_level: int | None = None


def task_defaults(problems: Sequence) -> TaskDefaults | None:
    """The defaults of the built-in task that every one of ``problems`` comes from, found by
    what the problems are (``Problem.task``, set by the task's loader), not by the name of the
    dataset; None when they are not all from one built-in task (or there are none)."""
    tasks = {getattr(p, "task", None) for p in problems}
    if len(tasks) != 1:
        return None
    (task,) = tasks
    from . import arith

    if task == arith.TASK:
        return TaskDefaults(**arith.SEARCH_LIMITS, per_level=arith.DEFAULT_PER_LEVEL)
    return None


def load_arith(split: str = "test", limit: int | None = None) -> list:
    """``builtin:arith`` (see ``ponder.toy.arith.load_arith``)."""
    from .arith import load_arith as load

    return load(split=split, limit=limit)


# ``ponder.data`` imports this package lazily, on the first ``builtin:`` look-up, which may come
# after a program registered its own loader under one of these names: that loader wins.
if "arith" not in _data._BUILTINS:
    register_builtin("arith", load_arith)
