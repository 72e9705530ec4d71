#!/usr/bin/env python
"""Test-time scaling on the built-in task, from scratch: the README's table and plot.

Runs ``ponder run`` on the shipped models (``builtin:policy-small`` searched with
``builtin:prm``, next to ``builtin:policy-large`` greedy) over ``builtin:arith``, then prints
the summary table and what it shows, measured on this run only:

* each PRM-guided method at the largest n against greedy and against majority voting at the
  same n (accuracy difference, in problems);
* the small policy with the best search at the largest n against the large policy's greedy;
* accuracy per level for greedy, majority and the best search, and where search helps most.

    python benchmarks/bench_scaling.py                 # the default slice (as `ponder run`)
    python benchmarks/bench_scaling.py --full --json   # all 500 problems, JSON on stdout
    python benchmarks/bench_scaling.py --from runs/x   # report an existing run directory
    python benchmarks/bench_scaling.py --quick --json  # a smoke run in seconds (CI)

Nothing here is asserted: the numbers are what the run measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

try:
    import ponder  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from ponder import cli
from ponder import evaluation as evaluate

PRM_METHODS = ("best_of_n", "weighted_best_of_n", "beam_search", "dvts")


def _entry(summary, policy, method, n):
    return next((e for e in summary if e["policy"] == policy and e["method"] == method and e["n"] == n), None)


def analyse(summary: list[dict]) -> dict:
    """What the summary shows (see the module docstring); plain numbers, no verdicts."""
    policies = list(dict.fromkeys(e["policy"] for e in summary))
    main = policies[0]
    top = max(e["n"] for e in summary if e["policy"] == main)
    greedy = _entry(summary, main, "greedy", 1)
    majority = _entry(summary, main, "majority", top)
    report: dict = {"policy": main, "n": top, "greedy": greedy["accuracy"] if greedy else None,
                    "majority": majority["accuracy"] if majority else None, "methods": {}}
    for method in PRM_METHODS:
        e = _entry(summary, main, method, top)
        if e is None:
            continue
        report["methods"][method] = {
            "accuracy": e["accuracy"],
            "minus_greedy": None if greedy is None else e["accuracy"] - greedy["accuracy"],
            "minus_majority": None if majority is None else e["accuracy"] - majority["accuracy"],
        }
    best = max(report["methods"], key=lambda m: report["methods"][m]["accuracy"], default=None)
    report["best_search"] = best
    for other in policies[1:]:
        e = _entry(summary, other, "greedy", 1)
        if e is not None and best is not None:
            report.setdefault("reference_greedy", {})[other] = {
                "accuracy": e["accuracy"],
                "best_search_minus_it": report["methods"][best]["accuracy"] - e["accuracy"],
            }
    if best is not None and greedy is not None and greedy.get("levels"):
        best_e = _entry(summary, main, best, top)
        levels = {}
        for level, (acc, count) in greedy["levels"].items():
            row = {"count": count, "greedy": acc, best: best_e["levels"].get(level, (None,))[0]}
            if majority is not None:
                row["majority"] = majority["levels"].get(level, (None,))[0]
            row["gain"] = None if row[best] is None else row[best] - acc
            levels[str(level)] = row
        report["levels"] = levels
        report["largest_gain_level"] = max(levels, key=lambda k: levels[k]["gain"] if levels[k]["gain"] is not None else -1)
    return report


def _print_report(report: dict) -> None:
    n = report["n"]
    print(f"\npolicy {report['policy']}, n = {n}: greedy {report['greedy']:.3f}, majority {report['majority']:.3f}")
    for method, r in report["methods"].items():
        print(f"  {method:>20}: {r['accuracy']:.3f}  (greedy {r['minus_greedy']:+.3f}, majority {r['minus_majority']:+.3f})")
    for other, r in report.get("reference_greedy", {}).items():
        print(f"  {other} greedy: {r['accuracy']:.3f}; best search ({report['best_search']}) minus it: "
              f"{r['best_search_minus_it']:+.3f}")
    if "levels" in report:
        best = report["best_search"]
        print(f"  per level (greedy -> {best} at n={n}):")
        for level, r in report["levels"].items():
            print(f"    L{level}: {r['greedy']:.3f} -> {r[best]:.3f} ({r['gain']:+.3f}; majority {r.get('majority', float('nan')):.3f})")
        print(f"  largest gain at level {report['largest_gain_level']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="run directory (default: a temporary one)")
    parser.add_argument("--from", dest="source", help="report an existing run directory instead of running")
    parser.add_argument("--full", action="store_true", help="all 500 problems of builtin:arith")
    parser.add_argument("--per-level", type=int, help=f"problems per level (default {cli.DEFAULT_PER_LEVEL})")
    parser.add_argument("--json", action="store_true", help="print one JSON object (summary + report) on stdout")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in seconds: 2 problems, greedy, majority and best_of_n at n = 1, 2, "
                             "short steps (numbers meaningless; CI runs it)")
    args, rest = parser.parse_known_args(argv)
    if args.quick:
        rest = ["--limit", "2", "--methods", "greedy,majority,best_of_n", "--n", "1,2", "--max-steps", "4",
                "--num-iterations", "4", "--max-step-tokens", "24", "--no-progress", *rest]
    if args.source:
        out = Path(args.source)
    else:
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ponder-scaling-"))
        run = ["run", "--out", str(out)]
        if args.full:
            run.append("--full")
        if args.per_level:
            run += ["--per-level", str(args.per_level)]
        stdout = sys.stdout
        if args.json:
            sys.stdout = sys.stderr  # keep stdout for the JSON object
        try:
            code = cli.main(run + rest)
        finally:
            sys.stdout = stdout
        if code:
            return code
    rows = evaluate.read_results(out / evaluate.RESULTS_FILE, repair=False)
    if not rows:
        print(f"bench_scaling: no results in {out}", file=sys.stderr)
        return 1
    summary = evaluate.summarize(rows)
    report = analyse(summary)
    if args.json:
        clean = [{k: v for k, v in e.items() if k != "levels"} for e in summary]
        print(json.dumps({"out": str(out), "summary": clean, "report": report}, indent=2))
    else:
        print(evaluate.markdown_table(summary), end="")
        _print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
