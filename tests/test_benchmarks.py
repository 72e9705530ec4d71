"""Every benchmark script runs, in its --quick form, with --json: the JSON object it prints has
the keys its docstring promises (so a benchmark that crashes, e.g. on an API change, fails CI).

Each script runs in a subprocess exactly as a user runs it (``python benchmarks/X.py --quick
--json``), offline; every ``bench_*.py`` is run (one added later too: its JSON object must be
non-empty; EXPECTED lists the keys of the ones this file knows). The quick forms take seconds each on 2 CPU cores; their
numbers are not checked (they are measurements), only their shape and the checks the scripts
make themselves (e.g. that ponder and the baseline agree).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}

# script -> (extra arguments on top of --quick --json, keys its JSON object must have)
EXPECTED = {
    "bench_core.py": ([], {"workloads", "all_equivalent", "config", "environment"}),
    "bench_kernels.py": ([], {"device", "dtype", "results", "all_agree"}),
    "bench_kv.py": ([], {"prefix_index_speedup", "tokens_computed_over_unique", "decode", "quick"}),
    "bench_scaling.py": ([], {"out", "summary", "report"}),
    "bench_search.py": ([], {"policy_tokens_over_unique", "prm_tokens_over_unique", "sides_agree", "methods", "quick",
                             "wall_time_ratio_vs_baseline", "prm_tokens_per_s_over_plain_forward",
                             "best_of_n_wall_over_baseline", "beam_search_wall_over_baseline"}),
    "bench_verifier.py": ([], {"levels", "n", "temperature", "seconds"}),
    "bench_engine.py": ([], {"throughput_over_sequential", "throughput_over_static", "p99_latency_s",
                             "p99_latency_sequential_s", "preemptions", "kv_full_errors", "reprefill_tokens"}),
    "bench_adaptive.py": ([], {"auto_tokens_to_match_best16_ratio", "auto_gain_at_n16_tokens", "early_stop_token_ratio",
                               "early_stop_accuracy_delta"}),
    "bench_serve.py": ([], {"throughput_32_over_1", "errors", "kv_blocks_leaked", "p99_latency_s"}),
    "bench_ray.py": ([], {"speedup_2_vs_1_workers", "same_rows"}),
    "bench_remote.py": ([], {"hf", "remote", "problems", "n"}),
}


#: every benchmark script (the gpu_*.py helpers of the GPU check are not benchmarks)
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("bench_*.py"))


def test_the_known_benchmarks_are_there():
    assert set(EXPECTED) <= set(SCRIPTS)


def _run(name: str, tmp_path) -> dict:
    extra, _keys = EXPECTED.get(name, ([], set()))
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), "--quick", "--json", *extra], capture_output=True,
                          text=True, env=ENV, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_quick_json(name, tmp_path):
    """Every bench_*.py: --quick --json exits 0 with one JSON object (keys checked where listed)."""
    report = _run(name, tmp_path)
    _extra, keys = EXPECTED.get(name, ([], set()))
    assert isinstance(report, dict) and report and keys <= set(report), sorted(keys - set(report))
    if name == "bench_search.py":
        assert report["quick"] is True and report["sides_agree"] is True  # same trees and answers both ways
        assert set(report["methods"]) == {"beam_search", "dvts"}
    elif name == "bench_core.py":
        assert report["config"]["quick"] is True and report["all_equivalent"] is True  # C++ core == reference
    elif name == "bench_kernels.py":
        assert report["results"] and report["all_agree"] is True  # every kernel matches torch
    elif name == "bench_kv.py":
        assert report["quick"] is True and report["tokens_computed_over_unique"] >= 1.0
    elif name == "bench_scaling.py":
        methods = {(e["method"], e["n"]) for e in report["summary"]}
        assert {("greedy", 1), ("majority", 2), ("best_of_n", 2)} <= methods
        assert all(0.0 <= e["accuracy"] <= 1.0 and e["count"] == 2 for e in report["summary"])
    elif name == "bench_engine.py":
        assert report["kv_full_errors"] == 0  # the engine preempts instead of failing
    elif name == "bench_serve.py":
        assert report["errors"] == 0 and report["kv_blocks_leaked"] == 0
    elif name == "bench_ray.py":
        assert report["same_rows"] is True  # workers give the single-process rows
    elif name == "bench_remote.py":
        sides = [report["hf"]] + ([report["remote"]] if report["remote"] else [])
        assert all(0.0 <= row["accuracy"] <= 1.0 for side in sides for row in side.values())
        assert set(report["hf"]) == {"beam_search", "best_of_n", "weighted_best_of_n"}
    elif name == "bench_verifier.py":
        assert report["n"] == 2 and [row["level"] for row in report["levels"]] == [2]
        assert {"oracle", "majority", "prm_last", "prm_first_error_auc"} <= set(report["levels"][0])


@pytest.mark.slow
def test_fit_early_stop_quick_json(tmp_path):
    """fit_early_stop.py (the early-stop rules' choice on calibration records) runs and its
    choice is the grid's fewest-token rule within the allowed loss."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "fit_early_stop.py"), "--quick", "--json"],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["problems"] == 60 and report["cap"] == 16
    for name in ("majority", "weighted_best_of_n"):
        rows, chosen = report[name]["grid"], report[name]["chosen"]
        assert len(rows) == 2 * (1 + 2 * 3)  # rounds x (off + futility levels x gates)
        ok = [r for r in rows if r["accuracy_delta"] >= -report["max_loss"] - 1e-12]
        assert ok and chosen == min(ok, key=lambda r: r["token_ratio"])
        assert all(0.0 < r["token_ratio"] <= 1.0 + 1e-12 for r in rows)


def test_fit_early_stop_refuses_short_records(tmp_path):
    rec = {"id": "p", "prompt_tokens": 3, "samples": [{"answer": "1", "correct": True, "score": 0.5, "tokens": 4}] * 4,
           "trees": {}, "level": 1}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "fit_early_stop.py"), "--records", str(path)],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "fewer than --cap 16 samples" in proc.stderr and "Traceback" not in proc.stderr
