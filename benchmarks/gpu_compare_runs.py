"""Print the answers of two `ponder run`s side by side (gpu_check.sh: a CPU run beside a CUDA run).

Rows of each run's results.jsonl are paired by (policy, method, n, problem_id). The same seed
on two devices may still sample differently (float rounding differs), so a differing answer
is reported, not treated as an error; a row present in one run only is an error.

Usage: python benchmarks/gpu_compare_runs.py RUN_A RUN_B [--names cpu,cuda] [--out compare.json]
Exit status 1 when a run has no results.jsonl or the two runs hold different rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(run_dir: Path) -> dict[tuple, dict]:
    """(policy, method, n, problem_id) -> the results.jsonl row of one run."""
    rows = {}
    with open(run_dir / "results.jsonl") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows[(r["policy"], r["method"], r["n"], r["problem_id"])] = r
    return rows


def compare(a: dict[tuple, dict], b: dict[tuple, dict]) -> dict:
    """Paired rows, agreement counts and the keys found in one run only."""
    pairs = []
    for key in sorted(set(a) & set(b), key=str):
        ra, rb = a[key], b[key]
        pairs.append(dict(policy=key[0], method=key[1], n=key[2], problem_id=key[3], gold=ra.get("gold"),
                          answer_a=ra.get("answer"), answer_b=rb.get("answer"), correct_a=ra.get("correct"),
                          correct_b=rb.get("correct"), same=ra.get("answer") == rb.get("answer")))
    return dict(pairs=pairs, same=sum(p["same"] for p in pairs), total=len(pairs),
                only_a=[list(k) for k in sorted(set(a) - set(b), key=str)],
                only_b=[list(k) for k in sorted(set(b) - set(a), key=str)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--names", default="a,b", help="column names of the two runs (default a,b)")
    p.add_argument("--out", type=Path, default=None, help="write the comparison as JSON here")
    args = p.parse_args(argv)
    name_a, name_b = (args.names.split(",") + ["b"])[:2]
    try:
        a, b = load(args.run_a), load(args.run_b)
    except (OSError, json.JSONDecodeError, KeyError) as e:
        print(f"cannot read the runs' results.jsonl: {e}", file=sys.stderr)
        return 1
    c = compare(a, b)
    c["names"] = [name_a, name_b]
    print(f"{'method':12} {'n':>3} {'problem':18} {'gold':>8} {name_a:>8} {name_b:>8}  same")
    for r in c["pairs"]:
        print(f"{r['method']:12} {r['n']:>3} {r['problem_id']:18} {r['gold']!s:>8} {r['answer_a']!s:>8} "
              f"{r['answer_b']!s:>8}  {'yes' if r['same'] else 'NO'}")
    acc = {n: sum(bool(r[f"correct_{k}"]) for r in c["pairs"]) for n, k in ((name_a, "a"), (name_b, "b"))}
    print(f"same answer {c['same']}/{c['total']}; correct: {name_a} {acc[name_a]}, {name_b} {acc[name_b]}")
    if c["only_a"] or c["only_b"]:
        print(f"rows in one run only: {name_a} {c['only_a']}, {name_b} {c['only_b']}")
    if args.out:
        args.out.write_text(json.dumps(c, indent=2))
    return 1 if c["only_a"] or c["only_b"] or not c["total"] else 0


if __name__ == "__main__":
    sys.exit(main())
