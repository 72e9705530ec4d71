#!/usr/bin/env python3
"""Benchmark the search-forest control plane: ``ponder._core.Forest`` (C++) vs ``ponder.twins.Forest``.

Runs beam search and DVTS with synthetic steps and PRM scores (no model), times every
forest operation with both implementations, checks that they return identical results,
and prints a table (or JSON). The workload and the timing live in
``ponder.bench.control_plane`` (also reachable as ``ponder bench core``); see its docstring
for what exactly is measured.

    python benchmarks/bench_core.py --quick            # < 30 s
    python benchmarks/bench_core.py                    # P=500, N in {16, 64, 256}, I=40, M=4
    python benchmarks/bench_core.py --json --out bench-results/core.json

Options: --quick, --json, --out FILE, --problems P, --beams N [N ...], --iterations I,
--beam-width M, --reference-problems K (0 skips the reference), --agg {last,min,prod,mean},
--methods {beam,dvts} [...], --seed S. Exit status 1 when the implementations disagree.
"""

from __future__ import annotations

import os
import sys

try:
    from ponder.bench.control_plane import main
except ModuleNotFoundError as exc:  # not installed: use this checkout's python/ directory
    if exc.name not in ("ponder", "ponder.bench"):
        raise
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))
    from ponder.bench.control_plane import main

if __name__ == "__main__":
    sys.exit(main())
