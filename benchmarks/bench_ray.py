#!/usr/bin/env python
"""`ponder run --ray` with 1 vs 2 workers on the same problems: wall time and speedup.

One local Ray cluster (``ray.init(num_cpus=CPUS)``, default all of this machine's cores) runs
the same `ponder run` (built-in models on the first N ``builtin:arith`` problems, beam search
and best-of-N at n=16, beam width 4, batches of B problems) as

* ``single``: no Ray, this process, torch on CPUS threads (the baseline);
* ``ray-1``: 1 worker actor with CPUS CPUs (torch threads pinned to CPUS);
* ``ray-1-half``: 1 worker actor with CPUS/2 CPUs (threads pinned to CPUS/2);
* ``ray-2``: 2 worker actors with CPUS/2 CPUs each (threads pinned to CPUS/2).

``speedup_2_vs_1_workers`` = wall(ray-1-half) / wall(ray-2): workers added at the same threads
per worker (how Ray scales out over GPUs / nodes); ``speedup_2_vs_1_workers_same_cores`` =
wall(ray-1) / wall(ray-2): the same cores as two searches at once instead of one search on all
of them. Wall time is the whole command (Ray runs include starting the actors and loading the
models on each); ``search_s`` is the sum of the rows' search time. The rows of every setting
are checked to be the same (wall_s aside). On a machine shared with other work the figures
move with its load (reported as ``load_avg_1m``): oversubscribed cores punish multi-threaded
torch far more than single-threaded workers.

``--quick``: 4 problems, n=4, batches of 2; default 32 problems, n=16, batches of 4.
``--json``: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import ponder  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rows_of(out: str) -> dict:
    from ponder import evaluation as evaluate

    rows = evaluate.read_results(os.path.join(out, evaluate.RESULTS_FILE), repair=False)
    return {evaluate.row_key(r): r for r in rows}


def run(argv: list[str], out: str) -> dict:
    """One `ponder run` in this process; its wall time and rows."""
    from ponder.cli import main

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["run", *argv, "--out", out, "--no-progress"])
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"ponder run {' '.join(argv)} exited {code}")
    rows = rows_of(out)
    return {"wall_s": wall, "search_s": sum(r["wall_s"] for r in rows.values()), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 problems, n=4, batches of 2")
    ap.add_argument("--problems", type=int, default=None, help="builtin:arith problems (default 32; 4 with --quick)")
    ap.add_argument("--n", type=int, default=None, help="n of beam search and best-of-N (default 16; 4 with --quick)")
    ap.add_argument("--batch-size", type=int, default=None, help="problems per search (default 4; 2 with --quick)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the Ray cluster and of every setting")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    problems = args.problems or (4 if args.quick else 32)
    n = args.n or (4 if args.quick else 16)
    batch = args.batch_size or (2 if args.quick else 4)
    cpus = max(2, args.cpus)

    import ray
    import torch

    common = ["--limit", str(problems), "--methods", "beam_search,best_of_n", "--n", str(n), "--beam-width", "4",
              "--reference-policy", "none", "--batch-size", str(batch)]
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    results: dict[str, dict] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            torch.set_num_threads(cpus)
            settings = [
                ("single", []),
                ("ray-1", ["--ray", "--workers", "1", "--cpus-per-worker", str(cpus)]),
                ("ray-1-half", ["--ray", "--workers", "1", "--cpus-per-worker", str(cpus // 2)]),
                ("ray-2", ["--ray", "--workers", "2", "--cpus-per-worker", str(cpus // 2)]),
            ]
            for name, extra in settings:
                log(f"bench_ray: {name} ...")
                results[name] = run(common + extra, os.path.join(tmp, name))
                log(f"bench_ray: {name}: {results[name]['wall_s']:.1f} s")
    finally:
        ray.shutdown()

    def strip(rows):
        return {k: {f: v for f, v in r.items() if f != "wall_s"} for k, r in rows.items()}

    same = all(strip(r["rows"]) == strip(results["single"]["rows"]) for r in results.values())
    report = {
        "benchmark": "ray",
        "workload": {"dataset": "builtin:arith", "problems": problems, "methods": ["beam_search", "best_of_n"], "n": n,
                     "beam_width": 4, "batch_size": batch, "rows": len(results["single"]["rows"])},
        "machine": {"cpus": cpus, "os_cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "ray": ray.__version__, "load_avg_1m": os.getloadavg()[0]},
        "settings": {name: {"wall_s": round(r["wall_s"], 2), "search_s": round(r["search_s"], 2)} for name, r in results.items()},
        "speedup_2_vs_1_workers": round(results["ray-1-half"]["wall_s"] / results["ray-2"]["wall_s"], 3),
        "speedup_2_vs_1_workers_same_cores": round(results["ray-1"]["wall_s"] / results["ray-2"]["wall_s"], 3),
        "speedup_2_workers_vs_single": round(results["single"]["wall_s"] / results["ray-2"]["wall_s"], 3),
        "same_rows": same,
    }
    if args.json:
        print(json.dumps(report))
    else:
        for name, r in report["settings"].items():
            print(f"{name:10s} wall {r['wall_s']:8.1f} s   search (sum of rows) {r['search_s']:8.1f} s")
        print(f"speedup 2 vs 1 workers: {report['speedup_2_vs_1_workers']:.2f}x (same cores: "
              f"{report['speedup_2_vs_1_workers_same_cores']:.2f}x); vs single process: "
              f"{report['speedup_2_workers_vs_single']:.2f}x; same rows: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
