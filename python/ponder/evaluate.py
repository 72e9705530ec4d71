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
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .data import Problem
from .grading import is_equivalent
from .search import SAMPLING_METHODS, SearchConfig, search, search_sampled
from .search.config import IMPLIED_VOTE
from .search.config import METHODS as SEARCH_METHODS

GREEDY = "greedy"
#: every method ``run_evaluation`` accepts, in the order tables and plots list them
METHODS = (GREEDY, *SEARCH_METHODS)
#: methods whose n is split into beams / subtrees of ``beam_width``
TREE_METHODS = ("beam_search", "dvts")
#: methods that never call the PRM
PRM_FREE_METHODS = (GREEDY, "majority")

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "config.json"
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


def _check_config(out_dir: Path, base_config: SearchConfig, resume: bool) -> None:
    path = Path(out_dir) / CONFIG_FILE
    record = _config_record(base_config)
    if resume and path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8")).get("search", {})
        except (ValueError, AttributeError):
            old = None
        if isinstance(old, dict) and old != record:
            diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
            raise ValueError(
                f"{path}: the run being resumed used a different search config (fields {', '.join(diff)}); "
                f"resume with the same settings or choose another --out directory"
            )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"search": record}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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
    file rewritten), skip finished (problem_id, method, n) keys; the search config must match
    the one recorded in ``out_dir/config.json`` (method and n aside). Without ``resume`` an
    existing non-empty results file raises FileExistsError. All configs are validated before
    any search (ValueError). ``prm`` may be None when only greedy / majority run.

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
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_config(out_dir, base_config, resume)
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
                by_method = _search_fitting(batch, policy, prm, config, [m for m, _ in group])
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
                bar.update(len(batch))
        finally:
            bar.close()

    return [done[(pid, policy_label, m, n)] for m, n in pairs for pid in ids]


def _search_fitting(batch: list[Problem], policy, prm, config: SearchConfig, methods: list[str]) -> dict[str, list]:
    """Search one batch (``search_sampled`` for several sampling methods, else ``search``).
    When the models' KV cache cannot hold the whole batch (``KVCacheFull``) the batch is
    searched in halves, down to single problems; a single problem that does not fit is an
    error naming the fix. A split changes the random draws of the problems involved (each
    search call runs one seeded random stream over its whole batch), as another ``batch_size``
    would; greedy results do not change."""
    from .kv import KVCacheFull

    try:
        if len(methods) > 1:
            return search_sampled([p.problem for p in batch], policy, prm, config, methods)
        return {methods[0]: search([p.problem for p in batch], policy, prm, config)}
    except KVCacheFull as exc:
        if len(batch) == 1:
            raise KVCacheFull(
                f"one problem's search does not fit in the KV cache ({exc}); give the models a larger "
                f"kv_budget (`ponder run --kv-budget TOKENS`) or lower n / max_steps / max_step_tokens"
            ) from exc
        half = len(batch) // 2
        first = _search_fitting(batch[:half], policy, prm, config, methods)
        second = _search_fitting(batch[half:], policy, prm, config, methods)
        return {m: first[m] + second[m] for m in methods}


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
