"""Running an evaluation: every (method, n) of an ``EvalConfig`` over the problems, batch by
batch, each batch's rows appended to ``results.jsonl`` as it finishes.

    config = EvalConfig(methods=["greedy", "majority", "dvts"], ns=[1, 4, 16],
                        base_config=SearchConfig(beam_width=4))
    rows = run_evaluation(problems, policy, prm, config, out_dir=Path("runs/x"), resume=False)

A batch runs as one ``ponder.search`` call on the engine, which admits its searches as the
models' KV cache frees blocks and preempts when it runs short, so a batch larger than the cache
still completes; only a single problem's search that does not fit raises ``KVCacheFull``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..batch import SAMPLING_METHODS, search, search_sampled
from ..data import Problem
from ..methods import SearchConfig
from .config import EvalConfig
from .results import (
    RESULTS_FILE,
    append_rows,
    check_manifest,
    check_out_dir,
    config_record,
    read_results,
    result_row,
    row_key,
    run_manifest,
)


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a light optional dependency

        class _Null:
            def update(self, _k):
                pass

            def close(self):
                pass

        if enabled:
            print(f"{desc}: {initial}/{total} done", file=sys.stderr)
        return _Null()
    return tqdm(total=total, initial=initial, desc=desc, unit="problem", disable=not enabled, file=sys.stderr)


class _ProgressPolicy:
    """The policy, seen by the engine, with a progress bar that advances by one when the last
    node of a problem's tree is released (problems are told apart by their question text; a
    repeated question counts once). Every other attribute is the policy's."""

    def __init__(self, policy, bar) -> None:
        self._policy, self._bar = policy, bar
        self._question: dict[int, str] = {}  # node id -> question
        self._live: dict[str, int] = {}  # question -> live nodes
        self._done: set[str] = set()
        self.finished = 0

    def __getattr__(self, name: str):
        return getattr(self._policy, name)

    def start(self, root_ids, problems):
        out = self._policy.start(root_ids, problems)
        for node, question in zip(root_ids, problems):
            self._question[int(node)] = question
            self._live[question] = self._live.get(question, 0) + 1
        return out

    def sample_steps(self, parent_ids, child_ids, params):
        out = self._policy.sample_steps(parent_ids, child_ids, params)
        for parent, child in zip(parent_ids, child_ids):
            question = self._question.get(int(parent))
            if question is not None:
                self._question[int(child)] = question
                self._live[question] += 1
        return out

    def release(self, node_ids):
        self._policy.release(node_ids)
        for node in node_ids:
            question = self._question.pop(int(node), None)
            if question is None:
                continue
            self._live[question] -= 1
            if self._live[question] == 0 and question not in self._done:
                self._done.add(question)
                self.finished += 1
                self._bar.update(1)


def prepare(problems: list[Problem], config: EvalConfig, *, out_dir: Path, resume: bool, has_prm: bool,
            manifest: dict | None) -> dict[tuple, dict]:
    """What ``run_evaluation`` and ``run_evaluation_ray`` do before any search: validate
    ``config`` (``has_prm``: whether a PRM is given), check that problem ids are unique,
    ``check_out_dir``, check ``manifest`` (None: built from the problems and the base config)
    against ``out_dir/run.json`` and write it; returns the rows already there (with
    ``resume``) by key. ValueError / FileExistsError on a mistake, before anything is written
    to ``results.jsonl``."""
    config.validate(has_prm=has_prm)
    ids = [str(p.id) for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problem ids must be unique")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, resume)
    if manifest is None:
        manifest = run_manifest(problems, config.base_config)
    elif manifest.get("search") != config_record(config.base_config):
        raise ValueError("manifest['search'] does not record the base config; build it with "
                         "run_manifest(problems, config.base_config)")
    check_manifest(out_dir, manifest, resume)
    existing = read_results(out_dir / RESULTS_FILE) if resume else []
    return {row_key(r): r for r in existing}


def run_evaluation(
    problems: list[Problem],
    policy,
    prm,
    config: EvalConfig,
    *,
    out_dir: Path,
    resume: bool,
    progress: bool = True,
    policy_label: str = "",
    manifest: dict | None = None,
) -> list[dict]:
    """Run every method of ``config`` at every n over ``problems``; return the rows of this evaluation.

    For each (method, n) of ``config.pairs()`` the pending problems are searched in batches of
    ``config.batch_size`` (one ``ponder.search`` call each, config from
    ``method_config(config.base_config, method, n)``); after each batch one row per problem is
    appended to ``out_dir/results.jsonl`` and fsynced. A row holds problem_id, policy, method,
    n, answer, gold, correct (``is_equivalent``), level, policy_tokens (generated + prefilled),
    policy_tokens_generated, policy_tokens_prefilled, prm_tokens, flops, wall_s (the batch's
    wall time divided by its problems), num_completions, beam_width (beam search / DVTS), seed,
    shared_samples, difficulty and chosen (``auto``).

    Majority, best-of-N and weighted best-of-N at the same n (with a PRM, without early
    stopping) are answered from one set of samples (``ponder.batch.search_sampled``): the same answers and policy tokens
    as three separate searches, a third of the sampling; their rows say ``shared_samples``
    and carry the shared search's wall time.

    Before any search (:func:`prepare`): ``config.validate(has_prm=prm is not None)``, unique
    problem ids, then ``out_dir``: without ``resume`` an existing non-empty results file raises
    FileExistsError; what defines the rows is recorded in ``out_dir/run.json``: ``manifest``
    (see ``run_manifest``; None: one built from ``problems`` and ``config.base_config`` alone)
    is checked against it with ``check_manifest``, so a resume with another dataset, other
    problems, other models (where the manifest names them), another search config (method and
    n aside) or another ponder version raises ValueError naming the setting. ``resume`` reads
    the existing results first (a truncated last line is dropped and the file rewritten) and
    skips finished (problem_id, policy, method, n) keys. ``prm`` may be None when only greedy /
    majority run.

    ``progress``: a progress bar per (method, n) on stderr, in problems; it advances as each
    problem's search tree is released by the engine (so within a batch), the rest at the end
    of each batch.

    ``policy_label`` names the policy in every row (field ``policy``, part of the row key), so
    several policies can be evaluated into one directory (e.g. a larger model's greedy
    accuracy next to the searches of a small one); ``summarize`` keeps them apart.

    Returns the rows (read back and new) for these problems, methods and ns, in plan order.
    """
    out_dir = Path(out_dir)
    done = prepare(problems, config, out_dir=out_dir, resume=resume, has_prm=prm is not None, manifest=manifest)
    pairs = config.pairs()
    configs = config.configs()
    results_path = out_dir / RESULTS_FILE

    for group in search_groups(pairs, shares_samples(config, prm is not None)):
        method, n = group[0]
        pending = [p for p in problems if any((str(p.id), policy_label, m, k) not in done for m, k in group)]
        names = "+".join(m for m, _ in group)
        desc = f"{names} n={n}" + (f" [{policy_label}]" if policy_label else "")
        bar = progress_bar(len(problems), len(problems) - len(pending), desc, progress)
        try:
            for start in range(0, len(pending), config.batch_size):
                batch = pending[start : start + config.batch_size]
                t0 = time.perf_counter()
                tracked = _ProgressPolicy(policy, bar) if progress else policy
                by_method = search_batch(batch, tracked, prm, configs[(method, n)], [m for m, _ in group])
                share = (time.perf_counter() - t0) / len(batch)
                rows = []
                for m, k in group:
                    rows += [
                        result_row(p, r, m, k, configs[(m, k)], share, policy_label, shared=len(group) > 1)
                        for p, r in zip(batch, by_method[m])
                        if (str(p.id), policy_label, m, k) not in done
                    ]
                append_rows(results_path, rows)
                for row in rows:
                    done[row_key(row)] = row
                bar.update(max(0, len(batch) - (tracked.finished if progress else 0)))
        finally:
            bar.close()

    return [done[(str(p.id), policy_label, m, n)] for m, n in pairs for p in problems]


def search_batch(batch: list[Problem], policy, prm, config: SearchConfig, methods: list[str]) -> dict[str, list]:
    """Search one batch (``search_sampled`` for several sampling methods, else ``search``).
    The engine under ``search`` admits the batch's searches as the models' KV cache frees
    blocks and preempts when it runs out, so a batch larger than the cache still completes;
    ``KVCacheFull`` reaches here only when one problem's search alone does not fit, and is
    re-raised naming the fix."""
    from ..hf.kv import KVCacheFull

    try:
        if len(methods) > 1:
            return search_sampled([p.problem for p in batch], policy, prm, config, methods)
        return {methods[0]: search([p.problem for p in batch], policy, prm, config)}
    except KVCacheFull as exc:
        raise KVCacheFull(
            f"one problem's search does not fit in the KV cache ({exc}); give the models a larger "
            f"kv_budget (`ponder run --kv-budget TOKENS`) or lower n / max_steps / max_step_tokens"
        ) from exc


def shares_samples(config: EvalConfig, has_prm: bool) -> bool:
    """Whether the sampling votes at the same n share one set of samples (``search_groups``):
    with a PRM, and without early stopping (where each vote stops at its own round)."""
    return bool(has_prm) and config.base_config.early_stop is None


def search_groups(pairs: list[tuple[str, int]], have_prm: bool) -> list[list[tuple[str, int]]]:
    """The searches an evaluation runs: majority, best-of-N and weighted best-of-N at the same
    n vote over the same samples (they depend on the seed, not on the PRM), so with a PRM they
    share one ``search_sampled`` call; every other (method, n) is a search of its own.
    ``have_prm`` False: no sharing (evaluations pass ``shares_samples(config, has_prm)``)."""
    groups: list[list[tuple[str, int]]] = []
    shared: dict[int, list[tuple[str, int]]] = {}
    for method, n in pairs:
        if have_prm and method in SAMPLING_METHODS:
            if n not in shared:
                shared[n] = []
                groups.append(shared[n])
            shared[n].append((method, n))
        else:
            groups.append([(method, n)])
    return groups


__all__ = ["prepare", "progress_bar", "run_evaluation", "search_batch", "search_groups", "shares_samples"]
