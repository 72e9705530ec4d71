"""Evaluate search methods over a dataset: accuracy as a function of test-time compute.

    rows = run_evaluation(problems, policy, prm, methods=["greedy", "majority", "dvts"],
                          ns=[1, 4, 16], base_config=SearchConfig(beam_width=4), out_dir=Path("runs/x"),
                          resume=False)
    summary = write_summary(rows, Path("runs/x"))
    plot_scaling(summary, Path("runs/x"))

Every (problem, method, n) is one JSON row of ``out_dir/results.jsonl``, appended (flushed
and fsynced) as each batch of problems finishes, so a killed run loses at most the batch in
flight: ``resume=True`` reads the file back (dropping a truncated last line), skips the
finished keys and completes the rest. ``greedy`` is a pseudo-method: majority voting over one
completion sampled at temperature 0 (run once, as n=1, whatever ``ns`` says).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .batch import SAMPLING_METHODS, search, search_sampled
from .data import Problem
from .grading import is_equivalent
from .methods import SearchConfig
from .methods.config import IMPLIED_VOTE
from .methods.config import METHODS as SEARCH_METHODS

GREEDY = "greedy"
#: every method ``run_evaluation`` accepts, in the order tables and plots list them
METHODS = (GREEDY, *SEARCH_METHODS)
#: methods whose n is split into beams / subtrees of ``beam_width``
TREE_METHODS = ("beam_search", "dvts")
#: methods that never call the PRM
PRM_FREE_METHODS = (GREEDY, "majority")

RESULTS_FILE = "results.jsonl"
MANIFEST_FILE = "run.json"
# keys of the search config that may change between a run and its resume
_RESUMABLE_CHANGES = ("method", "n")


# ----------------------------------------------------------------------------- configs


def method_config(base_config: SearchConfig, method: str, n: int) -> SearchConfig:
    """The ``SearchConfig`` that runs ``method`` with budget ``n`` on top of ``base_config``.

    ``greedy`` becomes majority voting over n=1 completion at temperature 0. Methods with an
    implied vote (majority, best-of-N variants) get ``vote=None``; beam search and DVTS keep
    ``base_config.vote``. The result is validated (ValueError names the bad field).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
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
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        for n in [1] if method == GREEDY else ns:
            if (method, n) not in pairs:
                pairs.append((method, n))
    return pairs


def _config_record(config: SearchConfig) -> dict:
    record = dataclasses.asdict(config)
    for key in _RESUMABLE_CHANGES:
        record.pop(key, None)
    return json.loads(json.dumps(record))  # tuples -> lists, as read back from disk


# ----------------------------------------------------------------------------- results file


def read_results(path: Path, *, repair: bool = True) -> list[dict]:
    """Read ``results.jsonl`` back: one dict per row, first occurrence of each key kept.

    A last line that is not valid JSON (a run killed mid-write) is dropped; with ``repair``
    the file is then rewritten cleanly (atomically), also when it lacks a final newline or
    held duplicate keys, so that later appends start on a fresh line. A bad line before the
    last one raises ValueError (the file is not one this module wrote).
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.decode("utf-8", errors="replace").split("\n")
    rows: list[dict] = []
    seen: set[tuple] = set()
    dirty = bool(raw) and not raw.endswith(b"\n")
    content = [(i, line) for i, line in enumerate(lines) if line.strip()]
    for pos, (i, line) in enumerate(content):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")  # noqa: TRY004 - caught below
            key = row_key(row)
        except (ValueError, KeyError) as exc:
            if pos == len(content) - 1:
                dirty = True  # truncated by a kill: that row is recomputed
                break
            raise ValueError(f"{path}: line {i + 1} is not a result row ({exc}); fix or remove it") from exc
        if key in seen:
            dirty = True
            continue
        seen.add(key)
        rows.append(row)
    if dirty and repair:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return rows


def row_key(row: dict) -> tuple[str, str, str, int]:
    """The identity of a result row: (problem_id, policy label, method, n); rows written
    without a policy label have label ``""``."""
    return (str(row["problem_id"]), str(row.get("policy", "")), str(row["method"]), int(row["n"]))


def _append(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """Raise FileExistsError when ``out_dir`` already holds results and ``resume`` is off."""
    results = Path(out_dir) / RESULTS_FILE
    if not resume and results.exists() and results.stat().st_size > 0:
        raise FileExistsError(
            f"{results} already holds results; pass --resume (resume=True) to complete that run, "
            f"or choose another --out directory"
        )


# ----------------------------------------------------------------------------- run manifest


def dataset_hash(problems: Sequence[Problem]) -> str:
    """``sha256:<hex>`` of what defines the rows of ``problems``: each one's id, question,
    reference answer and level, in order."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([str(p.id), p.problem, p.answer, p.level], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


_FULL_HASH_LIMIT = 256 << 20  # files up to this size are hashed whole
_SAMPLE = 1 << 20


def _file_digest(h, path: str, size: int) -> None:
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
            return
        # a large weight file: its first and last 8 MiB (safetensors' header names every tensor,
        # dtype, shape and offset) and 32 evenly spaced 1 MiB samples
        offsets = [0, size - (8 << 20)] + [i * (size - _SAMPLE) // 31 for i in range(32)]
        for off in offsets:
            f.seek(off)
            h.update(f.read(8 << 20 if off in (0, size - (8 << 20)) else _SAMPLE))


def model_revision(ref: str | os.PathLike | None) -> str | None:
    """What identifies the weights behind a model reference (directory or hub id), or None.

    A local directory: ``sha256:<hex>`` over its files (names, sizes and contents; hidden files
    skipped; files over 256 MiB contribute their size, first and last 8 MiB and 32 evenly spaced
    1 MiB samples). A hub id: ``commit:<sha>`` of its snapshot in the local Hugging Face cache;
    None when it is not cached (not downloaded yet) or huggingface_hub is missing.
    """
    if ref is None:
        return None
    text = os.path.expanduser(os.fspath(ref))
    if os.path.isdir(text):
        h = hashlib.sha256()
        files = []
        for root, dirs, names in os.walk(text):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(root, n) for n in names if not n.startswith(".")]
        for path in sorted(files, key=lambda f: os.path.relpath(f, text)):
            size = os.path.getsize(path)
            h.update(f"{os.path.relpath(path, text)}\0{size}\0".encode())
            _file_digest(h, path, size)
        return "sha256:" + h.hexdigest()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - installed with transformers
        return None
    try:
        found = try_to_load_from_cache(text, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id: nothing cached under it
        return None
    if isinstance(found, str):
        return "commit:" + Path(found).parent.name  # .../snapshots/<commit>/config.json
    return None


# Names of manifest settings in messages (the `ponder run` options that set them).
_SETTING_NAMES = {
    "ponder_version": "the ponder version",
    "dataset.source": "--dataset",
    "dataset.split": "--split",
    "dataset.config": "--dataset-config",
    "dataset.problem_field": "--problem-field",
    "dataset.answer_field": "--answer-field",
    "dataset.level_field": "--level-field",
    "dataset.id_field": "--id-field",
    "dataset.answer_from_solution": "--answer-from-solution",
    "dataset.limit": "--limit",
    "dataset.per_level": "--per-level",
    "dataset.full": "--full",
    "dataset.num_problems": "the number of problems",
    "dataset.content_hash": "the dataset's content (hash of ids, questions, answers, levels)",
    "models.dtype": "--dtype",
    "models.policy.ref": "--policy",
    "models.policy.url": "--policy-url",
    "models.policy.revision": "--policy's weights (content hash / hub commit)",
    "models.prm.ref": "--prm",
    "models.prm.revision": "--prm's weights (content hash / hub commit)",
    "models.prm.format": "--prm-format",
    "models.prm.beta": "--prm-beta",
    "models.prm_reference.ref": "--prm-reference",
    "models.prm_reference.revision": "--prm-reference's weights (content hash / hub commit)",
    "models.reference_policy.ref": "--reference-policy",
    "models.reference_policy.revision": "--reference-policy's weights (content hash / hub commit)",
    "search.sampling.temperature": "--temperature",
    "search.sampling.top_p": "--top-p",
    "search.sampling.max_step_tokens": "--max-step-tokens",
    "search.compat_search_and_learn": "--compat-search-and-learn",
}
#: manifest sections recorded for the reader but not compared on resume (they do not change
#: what a row measures: where it ran, how problems were batched)
UNCHECKED_SECTIONS = ("execution",)


def _flatten(record: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _merge(old: dict, new: dict) -> dict:
    """``new`` with the keys only ``old`` has kept (a key missing from ``new`` is unknown there)."""
    out = dict(old)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            out[key] = _merge(old[key], value)
        else:
            out[key] = value
    return out


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    if text.startswith(("sha256:", "commit:")):
        return text[:19]
    return repr(value) if isinstance(value, str) else text


def manifest_difference(old: dict, new: dict) -> str | None:
    """The first setting both manifests have with different values (None is a value), as
    ``"<setting> differs: <old> in run.json, <new> now"`` (settings named by their ``ponder
    run`` option where they have one); None when they agree. Keys one side lacks (not known
    there, e.g. a hub model's commit before its download) and the sections in
    ``UNCHECKED_SECTIONS`` are not compared."""
    a, b = _flatten(old), _flatten(new)
    for key in b:
        if key.split(".", 1)[0] in UNCHECKED_SECTIONS or key not in a:
            continue
        if a[key] == b[key]:
            continue
        name = _SETTING_NAMES.get(key)
        if name is None:
            leaf = key.rsplit(".", 1)[-1]
            name = f"--{leaf.replace('_', '-')}" if key.startswith("search.") else key
        return f"{name} differs: {_short(a[key])} in run.json, {_short(b[key])} now"
    return None


def run_manifest(problems: Sequence[Problem], base_config: SearchConfig, **sections: Any) -> dict:
    """The record of what defines a run's rows, as ``run_evaluation`` writes to ``OUT/run.json``:
    ``ponder_version``, ``dataset`` (``num_problems``, ``content_hash`` of ``problems``, plus
    whatever ``sections["dataset"]`` adds: source, split, field names, slice), ``search`` (the
    base ``SearchConfig`` minus method and n, which may change on resume) and any further
    ``sections`` (``models``: each model's ``ref`` and ``revision`` (:func:`model_revision`),
    ``dtype``; ``execution``: recorded, never compared). Leave out what is not known (yet): a
    missing key is not compared and the value run.json has for it is kept."""
    from . import __version__

    dataset = {**sections.pop("dataset", {}), "num_problems": len(problems), "content_hash": dataset_hash(problems)}
    return json.loads(json.dumps({
        "ponder_version": __version__,
        "dataset": dataset,
        **{k: v for k, v in sections.items() if k != "execution"},
        "search": _config_record(base_config),
        "execution": sections.get("execution", {}),
    }))


def check_manifest(out_dir: Path, manifest: dict, resume: bool) -> dict:
    """Compare ``manifest`` with ``out_dir/run.json`` and write the merged record; returns it.

    With ``resume`` and an existing ``run.json``, the first setting both know with different
    values raises ValueError (one line: which setting, both values, what to do). Without
    ``resume`` an existing ``run.json`` is replaced (``check_out_dir`` has already refused a
    directory holding results). With ``resume``, results but no ``run.json`` (written by an older
    ponder or by hand) raise ValueError: their rows cannot be checked.
    """
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_FILE
    record = manifest
    if resume and path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); choose another --out directory") from None
        if not isinstance(old, dict):
            raise ValueError(f"{path} is not a run record; choose another --out directory")
        diff = manifest_difference(old, manifest)
        if diff is not None:
            raise ValueError(
                f"--resume {out_dir}: its rows come from another run: {diff}; rerun with that run's "
                f"settings or choose another --out directory"
            )
        record = _merge(old, manifest)
    elif resume and (out_dir / RESULTS_FILE).exists() and (out_dir / RESULTS_FILE).stat().st_size > 0:
        raise ValueError(
            f"--resume {out_dir}: it holds results but no {MANIFEST_FILE} (written by an older ponder or by hand), "
            f"so its rows cannot be checked against this run's settings; choose another --out directory"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return record


# ----------------------------------------------------------------------------- evaluation


def _progress(total: int, initial: int, desc: str, enabled: bool):
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


def run_evaluation(
    problems: list[Problem],
    policy,
    prm,
    *,
    methods: list[str],
    ns: list[int],
    base_config: SearchConfig,
    out_dir: Path,
    resume: bool,
    batch_size: int = 16,
    progress: bool = True,
    policy_label: str = "",
    manifest: dict | None = None,
) -> list[dict]:
    """Run every method at every n over ``problems``; return the rows of this evaluation.

    For each (method, n) of ``plan(methods, ns)`` the pending problems are searched in
    batches of ``batch_size`` (one ``ponder.search.search`` call each, config from
    ``method_config(base_config, method, n)``); after each batch one row per problem is
    appended to ``out_dir/results.jsonl`` and fsynced. A row holds problem_id, method, n,
    answer, gold, correct (``is_equivalent``), level, policy_tokens (generated + prefilled),
    policy_tokens_generated, policy_tokens_prefilled, prm_tokens, flops, wall_s (the batch's
    wall time divided by its problems), num_completions, beam_width (beam search / DVTS), seed
    and shared_samples.

    Majority, best-of-N and weighted best-of-N at the same n (with a PRM) are answered from
    one set of samples (``ponder.search.search_sampled``): the same answers and policy tokens
    as three separate searches, a third of the sampling; their rows say ``shared_samples``
    and carry the shared search's wall time.

    ``resume``: read the existing results first (a truncated last line is dropped and the
    file rewritten), skip finished (problem_id, method, n) keys. What defines the rows is
    recorded in ``out_dir/run.json``: ``manifest`` (see :func:`run_manifest`; None: one built
    from ``problems`` and ``base_config`` alone) is checked against it with
    :func:`check_manifest`, so a resume with another dataset, other problems, other models
    (where the manifest names them), another search config (method and n aside) or another
    ponder version raises ValueError naming the setting, before any search. Without
    ``resume`` an existing non-empty results file raises FileExistsError. All configs are
    validated before any search (ValueError). ``prm`` may be None when only greedy / majority run.

    ``progress``: a progress bar per (method, n) on stderr, in problems; it advances as each
    problem's search tree is released by the engine (so within a batch), the rest at the end
    of each batch.

    ``policy_label`` names the policy in every row (field ``policy``, part of the row key), so
    several policies can be evaluated into one directory (e.g. a larger model's greedy
    accuracy next to the searches of a small one); ``summarize`` keeps them apart.

    Returns the rows (read back and new) for these problems, methods and ns, in plan order.
    """
    out_dir = Path(out_dir)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    pairs = plan(methods, ns)
    configs = {pair: method_config(base_config, *pair) for pair in pairs}
    if prm is None:
        needs = [m for m, _ in pairs if m not in PRM_FREE_METHODS]
        if needs:
            raise ValueError(f"methods {', '.join(dict.fromkeys(needs))} need a PRM; only greedy and majority run without one")
    ids = [str(p.id) for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problem ids must be unique")
    check_out_dir(out_dir, resume)
    if manifest is None:
        manifest = run_manifest(problems, base_config)
    elif manifest.get("search") != _config_record(base_config):
        raise ValueError("manifest['search'] does not record base_config; build it with run_manifest(problems, base_config)")
    check_manifest(out_dir, manifest, resume)
    results_path = out_dir / RESULTS_FILE
    existing = read_results(results_path) if resume else []
    done = {row_key(r): r for r in existing}

    for group in _groups(pairs, prm is not None):
        method, n = group[0]
        config = configs[(method, n)]
        pending = [p for p in problems if any((str(p.id), policy_label, m, k) not in done for m, k in group)]
        names = "+".join(m for m, _ in group)
        desc = f"{names} n={n}" + (f" [{policy_label}]" if policy_label else "")
        bar = _progress(len(problems), len(problems) - len(pending), desc, progress)
        try:
            for start in range(0, len(pending), batch_size):
                batch = pending[start : start + batch_size]
                t0 = time.perf_counter()
                tracked = _ProgressPolicy(policy, bar) if progress else policy
                by_method = _search_fitting(batch, tracked, prm, config, [m for m, _ in group])
                share = (time.perf_counter() - t0) / len(batch)
                rows = []
                for m, k in group:
                    rows += [
                        _row(p, r, m, k, configs[(m, k)], share, policy_label, shared=len(group) > 1)
                        for p, r in zip(batch, by_method[m])
                        if (str(p.id), policy_label, m, k) not in done
                    ]
                _append(results_path, rows)
                for row in rows:
                    done[row_key(row)] = row
                bar.update(max(0, len(batch) - (tracked.finished if progress else 0)))
        finally:
            bar.close()

    return [done[(pid, policy_label, m, n)] for m, n in pairs for pid in ids]


def _search_fitting(batch: list[Problem], policy, prm, config: SearchConfig, methods: list[str]) -> dict[str, list]:
    """Search one batch (``search_sampled`` for several sampling methods, else ``search``).
    The engine under ``search`` admits the batch's searches as the models' KV cache frees
    blocks and preempts when it runs out, so a batch larger than the cache still completes;
    ``KVCacheFull`` reaches here only when one problem's search alone does not fit, and is
    re-raised naming the fix."""
    from .hf.kv import KVCacheFull

    try:
        if len(methods) > 1:
            return search_sampled([p.problem for p in batch], policy, prm, config, methods)
        return {methods[0]: search([p.problem for p in batch], policy, prm, config)}
    except KVCacheFull as exc:
        raise KVCacheFull(
            f"one problem's search does not fit in the KV cache ({exc}); give the models a larger "
            f"kv_budget (`ponder run --kv-budget TOKENS`) or lower n / max_steps / max_step_tokens"
        ) from exc


def _groups(pairs: list[tuple[str, int]], have_prm: bool) -> list[list[tuple[str, int]]]:
    """The searches an evaluation runs: majority, best-of-N and weighted best-of-N at the same
    n vote over the same samples (they depend on the seed, not on the PRM), so with a PRM they
    share one ``search_sampled`` call; every other (method, n) is a search of its own."""
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


def _row(
    problem: Problem, result, method: str, n: int, config: SearchConfig, wall_s: float, policy: str, shared: bool = False
) -> dict:
    b = result.budget
    return {
        "problem_id": str(problem.id),
        "policy": policy,
        "method": method,
        "n": n,
        "answer": result.answer,
        "gold": problem.answer,
        "correct": bool(is_equivalent(result.answer, problem.answer)),
        "level": problem.level,
        "policy_tokens": int(b.policy_tokens_generated + b.policy_tokens_prefilled),
        "policy_tokens_generated": int(b.policy_tokens_generated),
        "policy_tokens_prefilled": int(b.policy_tokens_prefilled),
        "prm_tokens": int(b.prm_tokens_scored),
        "flops": float(b.flops_estimate),
        "wall_s": float(wall_s),
        "num_completions": len(result.completions),
        "beam_width": config.beam_width if method in TREE_METHODS else None,
        "seed": config.seed,
        "shared_samples": shared,
        "difficulty": result.difficulty,  # dynamic compute (auto): estimated online, and what it chose
        "chosen": result.chosen,
    }


# ----------------------------------------------------------------------------- summary


def _method_order(method: str) -> tuple:
    return (METHODS.index(method) if method in METHODS else len(METHODS), method)


def summarize(rows: Iterable[dict]) -> list[dict]:
    """One summary row per (policy, method, n), ordered by policy (in order of first
    appearance), method (greedy first), then n.

    Each holds policy (the rows' label, "" when unlabelled), method, n, count, correct, accuracy, mean_policy_tokens, mean_prm_tokens,
    mean_tokens (policy + PRM), mean_wall_s and, when any row has a level, ``levels``:
    ``{level: (accuracy, count)}`` plus one flat ``acc_level_<L>`` entry per level seen in the
    whole evaluation (None where this (method, n) has no problem of that level).
    """
    rows = list(rows)
    groups: dict[tuple[str, str, int], list[dict]] = {}
    policies: dict[str, int] = {}
    for row in rows:
        policy = str(row.get("policy", ""))
        policies.setdefault(policy, len(policies))
        groups.setdefault((policy, row["method"], int(row["n"])), []).append(row)
    all_levels = sorted({r.get("level") for r in rows if r.get("level") is not None}, key=lambda v: (str(type(v)), v))
    summary = []
    for (policy, method, n) in sorted(groups, key=lambda k: (policies[k[0]], _method_order(k[1]), k[2])):
        group = groups[(policy, method, n)]
        count = len(group)
        correct = sum(bool(r["correct"]) for r in group)
        entry: dict[str, Any] = {
            "policy": policy,
            "method": method,
            "n": n,
            "count": count,
            "correct": correct,
            "accuracy": correct / count,
            "mean_policy_tokens": sum(r["policy_tokens"] for r in group) / count,
            "mean_prm_tokens": sum(r["prm_tokens"] for r in group) / count,
            "mean_tokens": sum(r["policy_tokens"] + r["prm_tokens"] for r in group) / count,
            "mean_wall_s": sum(r.get("wall_s", 0.0) for r in group) / count,
        }
        if all_levels:
            levels: dict[Any, tuple[float, int]] = {}
            for level in all_levels:
                sel = [bool(r["correct"]) for r in group if r.get("level") == level]
                if sel:
                    levels[level] = (sum(sel) / len(sel), len(sel))
                entry[f"acc_level_{level}"] = levels[level][0] if level in levels else None
            entry["levels"] = levels
        summary.append(entry)
    return summary


_COLUMNS = [
    ("method", "method", str),
    ("n", "n", str),
    ("count", "problems", str),
    ("accuracy", "accuracy", lambda v: f"{v:.3f}"),
    ("mean_policy_tokens", "policy tokens/problem", lambda v: f"{v:.0f}"),
    ("mean_prm_tokens", "PRM tokens/problem", lambda v: f"{v:.0f}"),
    ("mean_wall_s", "wall s/problem", lambda v: f"{v:.3g}"),
]


def _policies(summary: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(str(e.get("policy", "")) for e in summary))


def markdown_table(summary: Sequence[dict]) -> str:
    """The summary as a Markdown table (per-level accuracy columns when levels exist, a policy
    column when the rows come from more than one policy)."""
    level_keys = [k for k in (summary[0] if summary else {}) if k.startswith("acc_level_")]
    columns = list(_COLUMNS)
    if len(_policies(summary)) > 1:
        columns.insert(0, ("policy", "policy", str))
    header = [title for _, title, _ in columns] + [f"L{k[len('acc_level_'):]} acc" for k in level_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for entry in summary:
        cells = [fmt(entry.get(key, "")) for key, _, fmt in columns]
        for k in level_keys:
            value = entry.get(k)
            cells.append("-" if value is None else f"{value:.3f} ({entry['levels'][_level_of(entry, k)][1]})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _level_of(entry: dict, key: str) -> Any:
    suffix = key[len("acc_level_"):]
    return next(level for level in entry["levels"] if str(level) == suffix)


def write_summary(rows: Iterable[dict], out_dir: Path) -> list[dict]:
    """Summarize ``rows`` into ``out_dir/summary.csv`` and ``out_dir/summary.md``; return the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    fields: list[str] = []
    for entry in summary:
        fields.extend(k for k in entry if k != "levels" and k not in fields)
    with open(out_dir / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for entry in summary:
            writer.writerow({k: ("" if entry.get(k) is None else entry.get(k)) for k in fields})
    (out_dir / "summary.md").write_text(markdown_table(summary), encoding="utf-8")
    return summary


def plot_scaling(summary: Sequence[dict], out_dir: Path) -> Path:
    """Write ``out_dir/scaling.png``: accuracy vs n (log2 x axis) and accuracy vs mean policy
    tokens per problem (log x axis), one line per method of the first policy; the greedy
    accuracy of every other policy (a larger model, say) is a dashed horizontal line.
    Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    policies = _policies(summary)
    main = policies[0] if policies else ""
    by_method: dict[str, list[dict]] = {}
    for entry in summary:
        if str(entry.get("policy", "")) == main:
            by_method.setdefault(entry["method"], []).append(entry)
    fig, (ax_n, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    for other in policies[1:]:
        for entry in summary:
            if str(entry.get("policy", "")) == other and entry["method"] == GREEDY:
                for ax in (ax_n, ax_t):
                    ax.axhline(entry["accuracy"], linestyle="--", color="gray", label=f"{other} greedy")
    for method in sorted(by_method, key=_method_order):
        pts = sorted(by_method[method], key=lambda e: e["n"])
        ns = [e["n"] for e in pts]
        acc = [e["accuracy"] for e in pts]
        tokens = [max(e["mean_policy_tokens"], 1e-9) for e in pts]
        style = {"marker": "o", "label": f"{method} ({main})" if main and method == GREEDY else method}
        if method == GREEDY:
            style.update(linestyle="none", marker="*", markersize=11, color="black")
        line = ax_n.plot(ns, acc, **style)[0]
        ax_t.plot(tokens, acc, **{**style, "color": line.get_color()})
    ax_n.set_xscale("log", base=2)
    ax_n.set_xlabel("n (completions per problem)")
    ax_n.set_ylabel("accuracy")
    ax_n.set_title("accuracy vs n")
    ax_t.set_xscale("log")
    ax_t.set_xlabel("mean policy tokens per problem (generated + prefilled)")
    ax_t.set_title("accuracy vs compute")
    for ax in (ax_n, ax_t):
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(-0.02, 1.02)
    if by_method or len(policies) > 1:
        ax_n.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "scaling.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "METHODS",
    "check_out_dir",
    "markdown_table",
    "method_config",
    "plan",
    "plot_scaling",
    "read_results",
    "row_key",
    "run_evaluation",
    "summarize",
    "write_summary",
]
