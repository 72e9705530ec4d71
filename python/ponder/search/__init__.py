"""Search methods that turn test-time compute into accuracy.

    results = ponder.search.search(problems, policy, prm, SearchConfig(method="dvts", n=16))

``search`` submits every problem to a fresh ``ponder.Engine`` and runs it to the end: every
engine step is one batched ``Policy.sample_steps`` and one batched ``PRM.score_steps`` across
all problems and paths. One module per method, each a per-search state machine
(``method.Method``): ``majority``, ``best_of_n`` (vanilla and weighted), ``beam_search``,
``dvts``; ``tree.SearchTree`` holds the forest and the stages they share. The methods follow
huggingface/search-and-learn (``ponder.reference.search`` is a readable per-problem
re-implementation written its way, the tests' oracle), except where ponder deliberately
differs:

* A step cut off by ``max_step_tokens`` is truncated, not finished: the path continues from
  it, and it never counts as an answer unless it holds a boxed answer (search-and-learn:
  vLLM reports a length stop like EOS, so the step is a finished solution). Compat: finished.
* A boxed answer ends a path in every method (search-and-learn: DVTS only; beam search goes on
  until EOS).
* The final vote aggregates with the search's ``agg`` (search-and-learn: always ``last``).
  Compat: ``last``.
* DVTS returns each subtree's final path, N/M per problem (search-and-learn: the M candidates
  of each subtree's last expansion, unfinished ones included, all voting). Compat: the M.
* Completions without a boxed answer abstain from every vote, best-of-N included
  (search-and-learn: their empty answer can win).
* Beam search runs all problems of a batch together (search-and-learn: one at a time, since
  its top-k is taken across the batch). Lookahead scores count in beam search too
  (search-and-learn generates them but scores beam search paths without them). Generated
  and scored tokens are counted for every method (``Budget``).
* "Generate to EOS" in the last iteration is done step by step (the Protocol samples steps),
  every step scored, up to ``max_steps`` steps (search-and-learn: one call of up to 2048
  tokens without the step delimiter).
* Ties: search-and-learn's ``np.argsort`` leaves equal scores in an undefined order; here ties
  go to the earlier beam (lower node id), and M copies of a kept beam are adjacent instead of
  interleaved (``(beams * M)[:N]``): the same beams, numbered in the order the forest numbers
  children. Padding copies of completions are voted once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .config import METHODS, Budget, Completion, SearchConfig, SearchResult


def problem_text(problem: Any) -> str:
    """The question of a problem: a str, an object with ``.problem``, or a mapping with "problem"."""
    if isinstance(problem, str):
        return problem
    text = getattr(problem, "problem", None)
    if text is None and isinstance(problem, Mapping):
        text = problem.get("problem")
    if not isinstance(text, str):
        raise TypeError(f"a problem must be a str or have a str .problem; got {type(problem).__name__}")
    return text


def search(problems: Sequence[Any], policy, prm, config: SearchConfig | None = None) -> list[SearchResult]:
    """Run ``config.method`` on every problem of the batch at once.

    problems: questions (str) or problem-like objects with ``.problem``; their index is the
    result's ``problem_id``. policy: a ``ponder.Policy``. prm: a ``ponder.PRM`` (None allowed
    for majority voting, which never scores). Returns one ``SearchResult`` per problem, in order.
    """
    config = SearchConfig() if config is None else config
    config.validate()
    if isinstance(problems, str):
        raise TypeError("problems must be a sequence of problems, not one str")
    texts = [problem_text(x) for x in problems]
    if not texts:
        return []
    if config.method != "majority" and prm is None:
        raise ValueError(f"method {config.method!r} needs a PRM; only 'majority' runs without one")
    return _run_batch(policy, prm if config.method != "majority" else None, [(t, config, None, ()) for t in texts], "main")


def _run_batch(policy, prm, requests, name):
    """Submit every (problem, config, votes, prm_free) to a fresh engine whose searches share
    the policy's random stream (as one batch always did), run it, return each result
    ``name`` (or the dict of all when name is None); the first error is raised."""
    from ..engine import Engine

    engine = Engine(policy, prm, per_request_streams=False)
    handles = [engine._submit(t, c, v, f) for t, c, v, f in requests]
    engine.run_until_done()
    out = []
    for h in handles:
        if h._error is not None:
            raise h._error
        out.append(h._results if name is None else h._results[name])
    return out


#: the methods that only differ in how they vote over the same N sampled solutions
SAMPLING_METHODS = ("majority", "best_of_n", "weighted_best_of_n")


def search_sampled(
    problems: Sequence[Any], policy, prm, config: SearchConfig, methods: Sequence[str]
) -> dict[str, list[SearchResult]]:
    """Sample ``config.n`` solutions per problem once and answer with every method of
    ``methods`` (a subset of ``SAMPLING_METHODS``): one result list per method.

    The samples depend only on the policy, the problems and the seed, never on the PRM, so
    each method's answers and policy budget are those ``search`` gives with ``config`` and
    ``method=`` that method; majority's budget leaves out the PRM (it needs none), and every
    method's completions carry the PRM scores. ``config.method`` is ignored; ``prm`` may be
    None only when ``methods`` is just majority. The votes are the methods' own: majority
    (``agg``), best and weighted (``vote_agg``).
    """
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in SAMPLING_METHODS]
    if bad or not methods:
        raise ValueError(f"search_sampled takes methods among {SAMPLING_METHODS}; got {methods!r}")
    configs = {m: dataclasses.replace(config, method=m, vote=None).validate() for m in methods}
    if isinstance(problems, str):
        raise TypeError("problems must be a sequence of problems, not one str")
    texts = [problem_text(x) for x in problems]
    if not texts:
        return {m: [] for m in methods}
    needs_prm = [m for m in methods if m != "majority"]
    if needs_prm and prm is None:
        raise ValueError(f"method {needs_prm[0]!r} needs a PRM; only 'majority' runs without one")
    votes = {
        "majority": ("majority", configs.get("majority", config).agg),
        "best_of_n": ("best", configs.get("best_of_n", config).vote_agg),
        "weighted_best_of_n": ("weighted", configs.get("weighted_best_of_n", config).vote_agg),
    }
    first = configs[needs_prm[0] if needs_prm else "majority"]
    wanted = {m: votes[m] for m in methods}
    per_problem = _run_batch(
        policy, prm if needs_prm else None, [(t, first, wanted, ("majority",)) for t in texts], None
    )
    return {m: [res[m] for res in per_problem] for m in methods}


__all__ = [
    "METHODS",
    "SAMPLING_METHODS",
    "Budget",
    "Completion",
    "SearchConfig",
    "SearchResult",
    "search",
    "search_sampled",
]
