"""What every search method is to the engine: a state machine over the shared tree.

A method object belongs to one search. The engine asks it ``wants()`` (the expansions it needs
next: parents, children per parent, lookahead), expands and scores them together with every
other live search's, and hands it the scored children (``scored``). It keeps or prunes nodes
through the tree and says when it is ``done``; ``final()`` then gives the completions and the
vote(s). ``partial()`` is what it has when it is stopped early (limits, cancel).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .tree import Search, SearchTree


class Method(ABC):
    """Base of the per-search state machines (see the module docstring).

    subtrees: roots it needs (DVTS: N/M). After ``start(roots)``, each engine step calls
    ``wants()`` once and, when it wanted something, ``scored(children)`` with the children in
    the order of its wants (children of a parent consecutive).
    """

    subtrees = 1

    def __init__(self, tree: SearchTree, search: Search) -> None:
        self.tree = tree
        self.search = search
        self.config = search.config
        self.done = False
        self._ends: np.ndarray | None = None  # "to the end" phase: the path ends so far

    @abstractmethod
    def start(self, roots: np.ndarray) -> None:
        ...

    def wants(self) -> tuple[list[int], list[int], int]:
        """(parents, children per parent, lookahead) of the next expansion; ([], [], 0) when
        it wants nothing (then it is done)."""
        if self._ends is not None:
            open_ = self._open()
            return [int(self._ends[i]) for i in open_], [1] * len(open_), 0
        return self.expansion()

    @abstractmethod
    def expansion(self) -> tuple[list[int], list[int], int]:
        ...

    def scored(self, children: np.ndarray) -> None:
        if self._ends is not None:
            self._ends[self._open()] = children
            self._check_ends()
        else:
            self.expanded(children)

    @abstractmethod
    def expanded(self, children: np.ndarray) -> None:
        ...

    # "Generate to EOS": every unfinished leaf takes one step per engine step (no lookahead)
    # until it ends or has max_steps steps; then ``ended(ends)`` (input order kept).
    def to_end(self, leaves) -> None:
        self._ends = np.array(leaves, dtype=np.int32)
        self._check_ends()

    def _open(self) -> np.ndarray:
        return np.flatnonzero([self.tree.open(int(x)) for x in self._ends])

    def _check_ends(self) -> None:
        if self._open().size == 0:
            ends, self._ends = self._ends, None
            self.ended(ends)

    @abstractmethod
    def ended(self, ends: np.ndarray) -> None:
        ...

    @abstractmethod
    def final(self) -> tuple[list[int], str, str]:
        """(completions, vote, agg) once done."""
        ...

    @abstractmethod
    def partial(self) -> list[int]:
        """The completions it has now (stopped early): finished or not, they stand in."""
        ...

    @property
    def ends_so_far(self) -> list[int]:
        return [] if self._ends is None else self._ends.tolist()


class IterativeMethod(Method):
    """A method of ``num_iterations`` iterations (``it``: the ones done; set it to 0 in
    ``start``): each expansion is ``ended`` after one step, except the last iteration's,
    which runs every child to its end first (``to_end``)."""

    it = 0

    @property
    def last(self) -> bool:
        return self.it == self.config.num_iterations - 1

    def expanded(self, children: np.ndarray) -> None:
        if self.last:
            self.to_end(children)
        else:
            self.ended(children)
