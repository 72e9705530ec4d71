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

from .. import data as _data
from ..data import register_builtin

__all__ = ["load_arith"]


def load_arith(split: str = "test", limit: int | None = None) -> list:
    """``builtin:arith`` (see ``ponder.toy.arith.load_arith``)."""
    from .arith import load_arith as load

    return load(split=split, limit=limit)


# ``ponder.data`` imports this package lazily, on the first ``builtin:`` look-up, which may come
# after a program registered its own loader under one of these names: that loader wins.
if "arith" not in _data._BUILTINS:
    register_builtin("arith", load_arith)
