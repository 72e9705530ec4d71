"""Where a request's search comes from besides ``search``: ``reasoning_effort`` and the
model-name suffix.

``reasoning_effort`` (OpenAI's field) picks a preset (see ``effort_preset`` and docs/serve.md):

=========  ==========================================  ===========================================
effort     with a strategy table (dynamic compute)     without one (fixed methods)
=========  ==========================================  ===========================================
none,      plain sampling (no search)                  plain sampling (no search)
minimal
low        ``method="auto", budget=2``                 ``weighted_best_of_n``, n=4,
                                                       ``early_stop=0.9`` (rounds of 2)
medium     ``method="auto", budget=8``                 ``beam_search``, n=8, beam_width=4
high       ``method="auto", budget=32``                ``dvts``, n=32, beam_width=4
=========  ==========================================  ===========================================

"With a strategy table" means ``method="auto"`` can load its table (the built-in one, or
``ponder serve --strategy PATH``); ``auto_available`` decides once per server.

A model name may carry a search after a colon: ``policy-small:dvts-16``,
``policy-small:beam_search-16``, ``policy-small:best_of_n-8``, ``policy-small:majority``,
``policy-small:auto-8`` (the number: n; for ``auto``: the budget). Aliases: ``bon`` =
best_of_n, ``wbon`` = weighted_best_of_n, ``beam`` = beam_search. ``parse_model`` splits it.
"""

from __future__ import annotations

import re
from typing import Any

from ..methods.config import METHODS

EFFORTS = ("none", "minimal", "low", "medium", "high")

AUTO_PRESETS: dict[str, dict[str, Any]] = {
    "low": {"method": "auto", "budget": 2},
    "medium": {"method": "auto", "budget": 8},
    "high": {"method": "auto", "budget": 32},
}
FIXED_PRESETS: dict[str, dict[str, Any]] = {
    "low": {"method": "weighted_best_of_n", "n": 4, "early_stop": {"threshold": 0.9, "round_size": 2}},
    "medium": {"method": "beam_search", "n": 8, "beam_width": 4},
    "high": {"method": "dvts", "n": 32, "beam_width": 4},
}

ALIASES = {"bon": "best_of_n", "wbon": "weighted_best_of_n", "beam": "beam_search", "beam-search": "beam_search",
           "best-of-n": "best_of_n", "weighted-best-of-n": "weighted_best_of_n"}

_SUFFIX = re.compile(r"(?P<method>[a-z_\-]+?)(?:-(?P<n>\d{1,6}))?")


def effort_preset(effort: str | None, auto_available: bool) -> dict[str, Any] | None:
    """The ``search`` fields of a ``reasoning_effort`` (None: plain sampling); ValueError for
    an unknown effort."""
    if effort is None or effort in ("none", "minimal"):
        return None
    table = AUTO_PRESETS if auto_available else FIXED_PRESETS
    if effort not in table:
        raise ValueError(f"reasoning_effort must be one of {', '.join(EFFORTS)}; got {effort!r}")
    return dict(table[effort])


def parse_model(name: str, served: str) -> tuple[str, dict[str, Any] | None]:
    """Split ``name`` into the served model and the search its suffix asks for.

    Returns (base, fields): base is ``served`` when ``name`` is ``served`` or
    ``served:<suffix>``; fields is None without a suffix. LookupError when ``name`` is not
    this server's model (-> 404); ValueError for a suffix that names no method (-> 400)."""
    if name == served:
        return served, None
    if not name.startswith(served + ":"):
        raise LookupError(name)
    suffix = name[len(served) + 1:]
    m = _SUFFIX.fullmatch(suffix)
    method = ALIASES.get(m.group("method"), m.group("method")) if m else None
    if m is None or method not in METHODS:
        raise ValueError(
            f"model suffix {suffix!r} names no search; use {served}:<method>[-<n>] with method one of "
            f"{', '.join(METHODS)} (e.g. {served}:dvts-16)"
        )
    fields: dict[str, Any] = {"method": method}
    if m.group("n") is not None:
        n = int(m.group("n"))
        if method == "auto":
            fields["budget"] = n
        else:
            fields["n"] = n
            if method in ("beam_search", "dvts") and n >= 1:
                fields["beam_width"] = max(d for d in range(1, min(4, n) + 1) if n % d == 0)
    return served, fields


def listed_models(served: str) -> list[str]:
    """The names ``GET /v1/models`` lists: the model and an example suffix per method."""
    return [served] + [f"{served}:{m}" for m in ("majority-8", "best_of_n-8", "weighted_best_of_n-8",
                                                  "beam_search-16", "dvts-16")]
