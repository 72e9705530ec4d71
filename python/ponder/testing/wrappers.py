"""Wrappers that change what a model offers the engine, for side-by-side comparisons."""

from __future__ import annotations


class StepByStep:
    """A PRM with its optional ``score_paths`` hidden (every other attribute is the wrapped
    PRM's): the engine then scores every step as it is sampled, as it does for PRMs without
    ``ponder.protocols.PathScorer``."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        if name == "score_paths":
            raise AttributeError(name)
        return getattr(self.inner, name)
