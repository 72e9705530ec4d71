#!/usr/bin/env python3
"""Benchmark the search-forest control plane: ``ponder._core.Forest`` (C++) vs ``ponder.twins.Forest``.

Runs beam search and DVTS with synthetic steps and PRM scores (no model), times every
forest operation with both implementations, checks that they return identical results,
and prints a table (or JSON). The workload and the timing live in ``control_plane.py``
beside this script; its docstring says exactly what is measured.

    python benchmarks/bench_core.py --quick
    python benchmarks/bench_core.py                    # P=500, N in {16, 64, 256}, I=40, M=4
    python benchmarks/bench_core.py --json --out bench-results/core.json

Options: --quick, --json, --out FILE, --problems P, --beams N [N ...], --iterations I,
--beam-width M, --reference-problems K (0 skips the reference), --agg {last,min,prod,mean},
--methods {beam,dvts} [...], --seed S. JSON keys: benchmark, environment, config, workloads,
all_equivalent, total_benchmark_s. Exit status 1 when the implementations disagree.
"""

from __future__ import annotations

import os
import sys

try:
    import ponder  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from control_plane import main  # benchmarks/ is sys.path[0] when this script runs

if __name__ == "__main__":
    sys.exit(main())
