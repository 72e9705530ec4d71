"""One static batch through a fresh engine: ``ponder.search`` and ``search_sampled``.

    results = ponder.search(problems, policy, prm, SearchConfig(method="dvts", n=16))

Every problem is submitted to a fresh ``ponder.Engine`` which runs to the end: every engine
step is one batched ``Policy.sample_steps`` and one batched ``PRM.score_steps`` across all
problems and paths. Where the methods differ from huggingface/search-and-learn on purpose:
``docs/search_and_learn_differences.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .methods.config import SearchConfig, SearchResult


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
    for majority voting, which never scores unless its early stop has a PRM gate,
    ``EarlyStop.futility_score``: ValueError then). Returns one ``SearchResult`` per problem, in order.
    """
    config = SearchConfig() if config is None else config
    config.validate()
    if isinstance(problems, str):
        raise TypeError("problems must be a sequence of problems, not one str")
    texts = [problem_text(x) for x in problems]
    if not texts:
        return []
    from .methods.adaptive import prm_gated

    if config.method != "majority" and prm is None:
        raise ValueError(f"method {config.method!r} needs a PRM; only 'majority' runs without one")
    scored = config.method != "majority" or prm_gated(config)  # a gated early stop reads PRM scores
    return _run_batch(policy, prm if scored else None, [(t, config, None, ()) for t in texts], "main")


def _run_batch(policy, prm, requests, name):
    """Submit every (problem, config, votes, prm_free) to a fresh engine whose searches share
    the policy's random stream, run it, return each result ``name`` (or the dict of all when
    name is None); the first error is raised."""
    from .engine import Engine

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
    None only when ``methods`` is just majority; ``config.early_stop`` must be off (ValueError). The votes are the methods' own: majority
    (``agg``), best and weighted (``vote_agg``).
    """
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in SAMPLING_METHODS]
    if bad or not methods:
        raise ValueError(f"search_sampled takes methods among {SAMPLING_METHODS}; got {methods!r}")
    if config.early_stop is not None and config.early_stop is not False:
        raise ValueError("search_sampled shares one set of samples between votes, and early stopping stops each vote "
                         "at its own round: call ponder.search once per method with early_stop")
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


__all__ = ["SAMPLING_METHODS", "problem_text", "search", "search_sampled"]
