"""Reporting an evaluation: the summary per (policy, method, n) (``summarize``), as
``summary.csv`` / ``summary.md`` (``write_summary``, ``markdown_table``) and as
``scaling.png`` (``plot_scaling``: accuracy vs n and vs policy tokens).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .config import EVAL_METHODS, GREEDY


def _method_order(method: str) -> tuple:
    return (EVAL_METHODS.index(method) if method in EVAL_METHODS else len(EVAL_METHODS), method)


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


__all__ = ["markdown_table", "plot_scaling", "summarize", "write_summary"]
