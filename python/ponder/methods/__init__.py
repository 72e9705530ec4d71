"""Search methods: one module per method, each a per-search state machine (``method.Method``)
that the engine (``ponder.engine``) drives over one shared forest (``tree.SearchTree``).

``majority``, ``best_of_n`` (vanilla and weighted), ``beam_search``, ``dvts``,
``particle_filtering``, ``rebase``; ``adaptive`` picks one per problem (``strategy``) and
``stopping`` ends sampling once the answer is settled. ``config`` holds ``SearchConfig`` and
``SearchResult``. The methods follow huggingface/search-and-learn except where
``docs/search_and_learn_differences.md`` says otherwise; ``ponder.baselines.oracle`` is a
per-problem re-implementation written its way, the tests' oracle.
"""

from __future__ import annotations

from .config import METHODS, Budget, Completion, SearchConfig, SearchResult

__all__ = ["METHODS", "Budget", "Completion", "SearchConfig", "SearchResult"]
