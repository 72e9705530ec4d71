"""What an evaluation runs (``EvalConfig``) and on which problems (``DatasetSpec``), each with
one ``validate()``: the only place method names, budgets, beam widths, "needs a PRM" and the
dataset options of an evaluation are checked (``ponder run`` calls the same ``validate``).

Messages name fields in backquotes (`ns`); ``validate(names=...)`` replaces them (and the field
names that ``SearchConfig.validate`` puts first or writes with ``_`` / ``.``) by the caller's
names, so that ``ponder run`` says ``--n`` where the Python API says ``ns``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..methods.config import IMPLIED_VOTE, METHODS, SearchConfig
from ..protocols import check_sampling_params

GREEDY = "greedy"
#: every method an evaluation accepts, in the order tables and plots list them: the pseudo-method
#: ``greedy`` (majority voting over one completion at temperature 0) and every search method of
#: ``ponder.methods.config.METHODS``
EVAL_METHODS = (GREEDY, *METHODS)
#: methods whose n is split into beams / subtrees of ``beam_width``
TREE_METHODS = ("beam_search", "dvts")
#: methods that never call the PRM (majority does when its early stop has a PRM gate)
PRM_FREE_METHODS = (GREEDY, "majority")
#: the methods ``base_config.early_stop`` applies to (the others run without it)
EARLY_STOP_METHODS = ("majority", "best_of_n", "weighted_best_of_n")


def method_config(base_config: SearchConfig, method: str, n: int) -> SearchConfig:
    """The ``SearchConfig`` that runs ``method`` with budget ``n`` on top of ``base_config``.

    ``greedy`` becomes majority voting over n=1 completion at temperature 0. Methods with an
    implied vote (majority, best-of-N variants) get ``vote=None``; the other methods keep
    ``base_config.vote``. A tree method (beam search, DVTS) at an n below ``beam_width`` is one
    tree n wide. ``budget`` / ``budget_tokens`` are kept for ``auto`` only, ``early_stop`` for
    ``EARLY_STOP_METHODS`` only. The result is validated (ValueError names the bad field).
    """
    if method not in EVAL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(EVAL_METHODS)}")
    if method == GREEDY:
        sampling = dataclasses.replace(base_config.sampling, temperature=0.0)
        config = dataclasses.replace(base_config, method="majority", n=1, vote=None, sampling=sampling)
    else:
        vote = None if method in IMPLIED_VOTE else base_config.vote
        # A budget below the beam width is one tree n wide (n=1: a single greedy-on-PRM path),
        # so a sweep like --n 1,4,16 runs every method at every n.
        width = min(base_config.beam_width, n) if method in TREE_METHODS else base_config.beam_width
        config = dataclasses.replace(base_config, method=method, n=n, vote=vote, beam_width=width)
    if method != "auto":  # budget_tokens / strategy belong to auto (dynamic compute)
        config = dataclasses.replace(config, budget=None, budget_tokens=None)
    if method not in EARLY_STOP_METHODS:  # early stop belongs to the sampling votes (greedy: one sample)
        config = dataclasses.replace(config, early_stop=None)
    return config.validate()


def plan(methods: Sequence[str], ns: Sequence[int]) -> list[tuple[str, int]]:
    """The (method, n) pairs an evaluation runs: every method at every n, greedy once at n=1.

    Raises ValueError for an unknown method or an n that is not an int >= 1.
    """
    for n in ns:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"every n must be an integer >= 1; got {n!r}")
    pairs: list[tuple[str, int]] = []
    for method in methods:
        if method not in EVAL_METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(EVAL_METHODS)}")
        for n in [1] if method == GREEDY else ns:
            if (method, n) not in pairs:
                pairs.append((method, n))
    return pairs


_IDENTIFIER = re.compile(r"`([a-z_.]+)`|\b[a-z]+(?:[._][a-z]+)+\b")
_FIRST_WORD = re.compile(r"^[a-z_.]+\b")


def rename_fields(message: str, names: Mapping[str, str] | None = None) -> str:
    """``message`` with its field names in the caller's words: a field in backquotes, the first
    word and every identifier with ``_`` or ``.`` become ``names[field]`` where ``names`` has
    it; backquotes go. ``names`` None: the Python names, without backquotes."""
    names = names or {}
    text = _IDENTIFIER.sub(lambda m: names.get(m.group(1) or m.group(0), m.group(1) or m.group(0)), str(message))
    return _FIRST_WORD.sub(lambda m: names.get(m.group(0), m.group(0)), text)


def _is_count(value, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass
class EvalConfig:
    """What an evaluation runs: every method of ``methods`` at every budget of ``ns`` (``greedy``
    once, at n=1; see :func:`plan`), each searched with ``method_config(base_config, method, n)``,
    the problems ``batch_size`` at a time.

    methods: names from ``EVAL_METHODS`` (duplicates run once). ns: budgets, integers >= 1. A tree
    method (beam_search, dvts) at an n above ``base_config.beam_width`` needs n to be a multiple of
    it; below it the tree is n wide. batch_size: problems per search call, >= 1.
    """

    methods: Sequence[str]
    ns: Sequence[int]
    base_config: SearchConfig = field(default_factory=SearchConfig)
    batch_size: int = 16

    @property
    def needs_prm(self) -> bool:
        """Whether any method calls the PRM (every method but greedy and majority; majority too
        when ``base_config.early_stop`` has a PRM gate, ``futility_score``)."""
        return any(m not in PRM_FREE_METHODS for m in self.methods) or ("majority" in self.methods and self._gated)

    @property
    def _gated(self) -> bool:
        from ..methods.adaptive import prm_gated

        try:
            return prm_gated(self.base_config)
        except ValueError:
            return False  # validate() reports it

    def pairs(self) -> list[tuple[str, int]]:
        """The (method, n) searches, in plan order (:func:`plan`)."""
        return plan(self.methods, self.ns)

    def configs(self) -> dict[tuple[str, int], SearchConfig]:
        """The validated ``SearchConfig`` of every (method, n) of :meth:`pairs`."""
        return {pair: method_config(self.base_config, *pair) for pair in self.pairs()}

    def validate(self, *, has_prm: bool | None = None, names: Mapping[str, str] | None = None) -> EvalConfig:
        """Raise ValueError (one line naming the field and the fix) for the first bad setting;
        return self. Checked: methods (known, not empty), ns (integers >= 1), batch_size, the
        beam width against every n of a tree method, the base config's sampling parameters and
        every (method, n)'s ``SearchConfig.validate``; with ``has_prm=False``, that no method
        needs a PRM. ``names`` maps field names to the caller's (see :func:`rename_fields`)."""
        try:
            self._check(has_prm)
        except ValueError as exc:
            raise ValueError(rename_fields(str(exc), names)) from None
        return self

    def _check(self, has_prm: bool | None) -> None:
        methods = list(dict.fromkeys(self.methods))
        if not methods:
            raise ValueError(f"`methods` is empty; choose from {', '.join(EVAL_METHODS)}")
        unknown = [m for m in methods if m not in EVAL_METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r} in `methods`; choose from {', '.join(EVAL_METHODS)}")
        if not self.ns or not all(_is_count(n) for n in self.ns):
            raise ValueError(f"`ns` must list integers >= 1; got {list(self.ns)}")
        if not _is_count(self.batch_size):
            raise ValueError(f"`batch_size` must be an integer >= 1; got {self.batch_size!r}")
        if not isinstance(self.base_config, SearchConfig):
            raise ValueError(f"`base_config` must be a SearchConfig; got {type(self.base_config).__name__}")  # noqa: TRY004
        width = self.base_config.beam_width
        if not _is_count(width):
            raise ValueError(f"`beam_width` must be an integer >= 1; got {width!r}")
        tree = [m for m in methods if m in TREE_METHODS]
        bad = [n for n in sorted(set(self.ns)) if n > width and n % width]
        if tree and bad:
            raise ValueError(f"{tree[0]} needs every n above `beam_width` {width} to be a multiple of it (below it "
                             f"the tree is n wide); n={bad[0]} is not: change `ns` or `beam_width`")
        check_sampling_params(self.base_config.sampling)
        self.configs()
        if has_prm is False and self.needs_prm:
            needs = [m for m in methods if m not in PRM_FREE_METHODS]
            if not needs:
                raise ValueError("majority's early stop with `early_stop.futility_score` reads PRM scores: pass `prm`, "
                                 "or drop the futility gate")
            raise ValueError(f"method {needs[0]} needs a PRM: pass `prm`; only greedy and majority run without one")


@dataclass
class DatasetSpec:
    """Where an evaluation's problems come from and which of them it keeps; ``record()`` is the
    ``dataset`` section of the run record (``run.json``).

    source, split, config, problem_field, answer_field, level_field, id_field,
    answer_from_solution, limit: as ``ponder.data.load_problems`` takes them. per_level: keep the
    first K problems of each level. full: the whole dataset, without the default slice of a
    built-in task (``ponder.toy.task_defaults``); then limit and per_level must be None.
    """

    source: str
    split: str = "test"
    config: str | None = None
    problem_field: str = "problem"
    answer_field: str = "answer"
    level_field: str = "level"
    id_field: str | None = None
    answer_from_solution: bool = False
    limit: int | None = None
    per_level: int | None = None
    full: bool = False

    def validate(self, *, names: Mapping[str, str] | None = None) -> DatasetSpec:
        """Raise ValueError (one line) for an empty source, a limit or per_level below 1, or full
        with a limit / per_level; return self."""
        try:
            if not str(self.source or "").strip():
                raise ValueError("`source` must not be empty (a .jsonl/.json/.parquet file, a saved dataset "
                                 "directory, a hub id or builtin:<name>)")
            for name in ("limit", "per_level"):
                value = getattr(self, name)
                if value is not None and not _is_count(value):
                    raise ValueError(f"`{name}` must be >= 1; got {value!r}")
            if self.full and (self.limit is not None or self.per_level is not None):
                raise ValueError("`full` evaluates the whole dataset; drop `limit` / `per_level` (or `full`)")
        except ValueError as exc:
            raise ValueError(rename_fields(str(exc), names)) from None
        return self

    def load(self) -> list:
        """The problems: ``load_problems`` with these settings, then the first ``per_level`` of each
        level (None and not ``full`` and no ``limit``: the default slice of the built-in task the
        problems come from, if any). Raises what ``load_problems`` raises."""
        from ..data import load_problems
        from ..toy import task_defaults

        problems = load_problems(
            self.source, split=self.split, problem_field=self.problem_field, answer_field=self.answer_field,
            level_field=self.level_field, id_field=self.id_field, limit=self.limit,
            answer_from_solution=self.answer_from_solution, config=self.config,
        )
        per_level = self.per_level
        if per_level is None and not self.full and self.limit is None:
            defaults = task_defaults(problems)
            per_level = defaults.per_level if defaults is not None else None
        if per_level is None:
            return problems
        kept, seen = [], {}
        for p in problems:
            if seen.get(p.level, 0) < per_level:
                seen[p.level] = seen.get(p.level, 0) + 1
                kept.append(p)
        return kept

    def record(self) -> dict:
        """The ``dataset`` section of ``run.json`` (every field, as given)."""
        return dataclasses.asdict(self)


__all__ = ["EVAL_METHODS", "GREEDY", "PRM_FREE_METHODS", "TREE_METHODS", "DatasetSpec", "EvalConfig", "method_config",
           "plan", "rename_fields"]
