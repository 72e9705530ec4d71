"""Control-plane benchmark: ``ponder._core.Forest`` (C++) against ``ponder.twins.Forest``.

Run as ``python benchmarks/bench_core.py`` (or ``ponder bench core`` from a source checkout).

What is measured
----------------
The bookkeeping a step-level tree search does between LLM and PRM calls, with no model in
the loop: synthetic steps and scores stand in for the generator and the PRM. Two searches
are run, each over ``P`` problems held in one forest and batched across problems (one
forest call per operation per iteration):

* **beam** (search-and-learn semantics): ``N`` beams, beam width ``M``, ``I`` iterations.
  ``add_roots`` (one root per problem, a ~200-token prompt), ``expand`` every root into
  ``N`` children, then each iteration: ``set_steps`` on every leaf (10-40 step tokens, a
  PRM score, ~3% finished), ``aggregate`` the leaves, ``select_beam`` the best ``N // M``
  unfinished leaves per problem (``dedupe=True``), ``prune`` the other unfinished leaves,
  ``expand`` each kept beam into ``M`` children (not after the last iteration). Finished
  leaves are completions; the beams kept by the last iteration are too.
* **dvts**: ``N // M`` independent subtrees per problem (one root per subtree,
  ``add_roots`` with subtree ids). Each iteration the current node of every live subtree
  is ``expand``-ed into ``M`` candidates, ``set_steps``, ``select_dvts`` keeps the best per
  (problem, subtree), ``prune`` drops the rest; a subtree whose best candidate is finished
  stops there. Completions: each subtree's final node.

Both end with ``set_answers`` on the completions (answer ids drawn from a small, skewed
set), ``vote`` ``weighted`` and ``majority`` (with the same aggregation as the search,
``--agg``), and ``release_problem`` for every problem.

Per forest call shapes (``L`` = leaves this iteration, at most ``P * N``):
``add_roots`` ``P`` (beam) or ``P * N // M`` (dvts) roots, prompt CSR of ~200 tokens each;
``expand`` -> ``L`` ids; ``set_steps`` ids ``[L]``, tokens ``[~25 L]`` + offsets ``[L + 1]``,
float64 scores ``[L]``, bool finished ``[L]``; ``aggregate`` / ``select_*`` / ``prune`` on
``<= L`` ids; ``set_answers`` / ``vote`` on the ``~(1 + 0.03 I) N`` completions per problem.

Inputs are generated up front with a seeded NumPy RNG, indexed by (iteration, problem,
slot of the leaf within its problem), so both implementations see identical inputs, a run
on the first ``K`` problems sees exactly the inputs of those problems in the full run, and
generating them is never timed. About 5% of the steps repeat their left sibling's step
(same tokens, score, flag and answer), so ``dedupe`` has work to do.

Timing: each forest call is timed on its own with ``time.perf_counter`` (the timed region
is that call and nothing else) and accumulated per operation; ``forest_s`` (the sum) is
the end-to-end time that the speedup compares. ``wall_s`` is the whole loop including the
benchmark's own NumPy bookkeeping (gathering the inputs of each call), which is the same
for both implementations and is reported as ``glue_s``. Python's garbage collector stays
on (it is part of what a Python forest costs); ``gc.collect()`` runs before every run.

The reference is slow, so it can run on the first ``K`` problems only
(``--reference-problems``). Problems are independent and every operation's cost is linear in
the number of nodes, so its times are then scaled by ``P / K``; the table marks such numbers
and the JSON record says ``"extrapolated": true``. Linear scaling flatters the reference (a Python
forest of millions of nodes is slower per node than a small one: the garbage collector walks
the whole heap, caches miss), so extrapolated speedups are lower bounds.

Equivalence: the core is also run on exactly the reference's ``K`` problems (when ``K < P``)
and the two runs must agree bit for bit: a digest of every id and score array the forest
returned (roots, children, aggregates, selections, votes), the number of node ids given
out, and both final votes. The full core run's votes for those ``K`` problems must also
match the reference's answers and weights. Any difference fails the benchmark loudly
(exit status 1).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

from ponder.methods.config import AGGREGATIONS

# --------------------------------------------------------------------------- constants

OPS = (
    "add_roots",
    "expand",
    "set_steps",
    "aggregate",
    "select",
    "prune",
    "set_answers",
    "vote",
    "release",
)
OP_HEADERS = {"add_roots": "roots", "set_steps": "steps", "aggregate": "agg", "set_answers": "answers"}
SEARCHES = ("beam", "dvts")  # the two synthetic searches (Workload.method)
VOTE_KINDS = ("weighted", "majority")

DEFAULT = {"problems": 500, "beams": (16, 64, 256), "iterations": 40, "beam_width": 4}
QUICK = {"problems": 50, "beams": (16, 64), "iterations": 10, "beam_width": 4}
# Default --reference-problems: enough problems that the reference runs over about this many
# step nodes per workload, at least MIN_REFERENCE_PROBLEMS.
REFERENCE_NODE_BUDGET = 400_000
MIN_REFERENCE_PROBLEMS = 8

VOCAB = 151_936  # token ids in [0, VOCAB)
TOKEN_POOL = 1 << 20  # prompts and steps are windows into one random token pool
PROMPT_TOKENS = (150, 250)  # inclusive range of prompt lengths
STEP_TOKENS = (10, 40)  # inclusive range of step lengths
SCORE_BETA = (5.0, 2.0)  # PRM step scores ~ Beta(5, 2): in (0, 1), mean ~0.71
FINISH_RATE = 0.03  # probability that a step ends its completion
DUPLICATE_RATE = 0.05  # probability that a step repeats its left sibling's step
ANSWER_WEIGHTS = 1.0 / np.arange(1, 9)  # 8 distinct answers, Zipf-like


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration. ``beams`` (N) must be a multiple of ``beam_width`` (M);
    beam search keeps ``N // M`` beams per problem, DVTS grows ``N // M`` subtrees."""

    method: str
    problems: int
    beams: int
    beam_width: int
    iterations: int
    agg: str = "prod"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in SEARCHES:
            raise ValueError(f"method must be one of {SEARCHES}, got {self.method!r}")
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"agg must be one of {AGGREGATIONS}, got {self.agg!r}")
        if self.problems < 1 or self.iterations < 1 or self.beam_width < 1:
            raise ValueError("problems, iterations and beam_width must be >= 1")
        if self.beams < self.beam_width or self.beams % self.beam_width:
            raise ValueError(
                f"beams ({self.beams}) must be a positive multiple of beam_width ({self.beam_width})"
            )

    @property
    def groups(self) -> int:
        """Beams kept per problem (beam) or subtrees per problem (dvts): N // M."""
        return self.beams // self.beam_width

    @property
    def label(self) -> str:
        return f"{self.method} N={self.beams}"


def _gather_ragged(pool: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
    """Windows ``pool[starts[i] : starts[i] + lengths[i]]`` as CSR: (int32 flat, int64 offsets)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, dtype=np.int64, out=offsets[1:])
    index = np.repeat(starts.astype(np.int64) - offsets[:-1], lengths)
    index += np.arange(offsets[-1], dtype=np.int64)
    return pool[index], offsets


@dataclass
class SyntheticInputs:
    """Everything the generator and PRM would produce, pre-drawn for one workload.

    Per-step arrays have shape ``[I, P, N]`` and are indexed by (iteration, problem, slot):
    the slot of a leaf is its position among its problem's leaves of that iteration (beam:
    ``kept_rank * M + child``; dvts: ``subtree * M + child``), so siblings occupy ``M``
    consecutive slots. Token ids are windows into ``pool`` (int32 ``[2**20]``).
    """

    pool: np.ndarray  # int32 [TOKEN_POOL]
    prompt_start: np.ndarray  # int64 [P]
    prompt_len: np.ndarray  # int64 [P]
    step_start: np.ndarray  # int32 [I, P, N]
    step_len: np.ndarray  # int32 [I, P, N]
    score: np.ndarray  # float64 [I, P, N]
    finished: np.ndarray  # bool [I, P, N]
    answer: np.ndarray  # int64 [I, P, N]: answer id of the completion ending at that step

    @classmethod
    def generate(cls, w: Workload) -> SyntheticInputs:
        rng = np.random.default_rng(w.seed)
        shape = (w.iterations, w.problems, w.beams)
        lo, hi = PROMPT_TOKENS
        slo, shi = STEP_TOKENS
        inputs = cls(
            pool=rng.integers(0, VOCAB, size=TOKEN_POOL, dtype=np.int32),
            prompt_start=rng.integers(0, TOKEN_POOL - hi, size=w.problems),
            prompt_len=rng.integers(lo, hi + 1, size=w.problems),
            step_start=rng.integers(0, TOKEN_POOL - shi, size=shape, dtype=np.int32),
            step_len=rng.integers(slo, shi + 1, size=shape, dtype=np.int32),
            score=rng.beta(*SCORE_BETA, size=shape),
            finished=rng.random(shape) < FINISH_RATE,
            answer=rng.choice(
                len(ANSWER_WEIGHTS), size=shape, p=ANSWER_WEIGHTS / ANSWER_WEIGHTS.sum()
            ).astype(np.int64),
        )
        # Duplicates: child m of a parent repeats child m - 1 (same step, same PRM score).
        duplicate = rng.random(shape) < DUPLICATE_RATE
        per_step = (inputs.step_start, inputs.step_len, inputs.score, inputs.finished, inputs.answer)
        M = w.beam_width
        for m in range(1, M):
            dup = duplicate[..., m::M]
            for a in per_step:
                a[..., m::M] = np.where(dup, a[..., m - 1 :: M], a[..., m::M])
        return inputs

    @property
    def problems(self) -> int:
        return len(self.prompt_len)

    def first(self, k: int) -> SyntheticInputs:
        """The inputs of problems ``0 .. k-1`` only (views, no copies)."""
        return SyntheticInputs(
            self.pool,
            self.prompt_start[:k],
            self.prompt_len[:k],
            *(a[:, :k] for a in (self.step_start, self.step_len, self.score, self.finished, self.answer)),
        )

    def roots(self, per_problem: int):
        """``add_roots`` arguments for ``per_problem`` roots per problem (subtrees 0..n-1).

        Returns (problem_ids int64 [R], subtree_ids int32 [R], tokens int32, offsets int64
        [R + 1]) with ``R = P * per_problem``; subtree roots share their problem's prompt."""
        problem = np.repeat(np.arange(self.problems, dtype=np.int64), per_problem)
        subtree = np.tile(np.arange(per_problem, dtype=np.int32), self.problems)
        flat, offsets = _gather_ragged(self.pool, self.prompt_start[problem], self.prompt_len[problem])
        return problem, subtree, flat, offsets

    def steps(self, t: int, problem: np.ndarray, slot: np.ndarray):
        """``set_steps`` arguments (minus the ids) for leaves at (problem, slot) in iteration t:
        (tokens int32, offsets int64 [L + 1], scores float64 [L], finished bool [L])."""
        flat, offsets = _gather_ragged(
            self.pool, self.step_start[t, problem, slot], self.step_len[t, problem, slot]
        )
        return flat, offsets, self.score[t, problem, slot], self.finished[t, problem, slot]


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """Timings and results of one run of a workload with one Forest class."""

    problems: int
    seconds: dict[str, float]  # accumulated per operation (OPS)
    calls: dict[str, int]
    wall_s: float  # whole loop, including the benchmark's NumPy bookkeeping
    ids_given: int  # node ids handed out (= nodes created)
    votes: dict[str, dict[str, np.ndarray]]  # VOTE_KINDS -> Forest.vote(...) result
    digest: str  # hash of every id / score array the forest returned, in order

    @property
    def forest_s(self) -> float:
        """Time spent inside Forest calls: the end-to-end time the speedup compares."""
        return sum(self.seconds.values())


class _Run:
    """One run in progress: the forest, per-operation timers, the trace digest and the
    completions (candidate ids and their answer ids) collected so far."""

    def __init__(self, forest_cls, inputs: SyntheticInputs, w: Workload) -> None:
        self.forest = forest_cls()
        self.inputs = inputs
        self.w = w
        self.seconds = dict.fromkeys(OPS, 0.0)
        self.calls = dict.fromkeys(OPS, 0)
        self._hash = hashlib.blake2b(digest_size=16)
        self._done_ids: list[np.ndarray] = []
        self._done_answers: list[np.ndarray] = []
        self._t0 = time.perf_counter()

    def call(self, op: str, fn, *args, **kwargs):
        """Run one bound Forest method, timing only the call."""
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[op] += time.perf_counter() - t0
        self.calls[op] += 1
        return out

    def trace(self, *arrays) -> None:
        for a in arrays:
            a = np.ascontiguousarray(a)
            self._hash.update(f"{a.dtype.str}{a.shape}".encode())
            self._hash.update(a.tobytes())

    def set_steps(self, t: int, leaves, problem, slot) -> np.ndarray:
        """Step every leaf with the iteration-t inputs of its (problem, slot); returns the
        finished flags (bool [L])."""
        flat, offsets, scores, finished = self.inputs.steps(t, problem, slot)
        self.call("set_steps", self.forest.set_steps, leaves, flat, offsets, scores, finished)
        return finished

    def complete(self, t: int, ids, problem, slot) -> None:
        """Record completions that ended with the iteration-t step of (problem, slot)."""
        self._done_ids.append(ids)
        self._done_answers.append(self.inputs.answer[t, problem, slot])

    def finish(self) -> RunResult:
        """``set_answers`` on the completions, both votes, release every problem."""
        f = self.forest
        ids = np.concatenate([np.zeros(0, np.int32), *self._done_ids]).astype(np.int32, copy=False)
        answers = np.concatenate([np.zeros(0, np.int64), *self._done_answers])
        self.call("set_answers", f.set_answers, ids, answers)
        votes = {how: self.call("vote", f.vote, ids, how, self.w.agg) for how in VOTE_KINDS}
        for how in VOTE_KINDS:
            self.trace(*(votes[how][k] for k in ("problem_ids", "answer_ids", "node_ids", "weights")))
        ids_given = int(f.stats()["ids_given"])
        problems = list(range(self.inputs.problems))
        release = f.release_problem
        t0 = time.perf_counter()
        for p in problems:
            release(p)
        self.seconds["release"] += time.perf_counter() - t0
        self.calls["release"] += len(problems)
        wall = time.perf_counter() - self._t0
        return RunResult(
            self.inputs.problems, self.seconds, self.calls, wall, ids_given, votes, self._hash.hexdigest()
        )


def _slots(problem: np.ndarray) -> np.ndarray:
    """Position of each entry within its run of equal values (problems come in runs)."""
    n = len(problem)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, problem[1:] != problem[:-1]])
    sizes = np.diff(np.r_[starts, n])
    return np.arange(n) - np.repeat(starts, sizes)


def _lookup(leaves: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions of ``ids`` in ``leaves`` (ascending: ``expand`` hands out increasing ids)."""
    return np.searchsorted(leaves, ids)


def run_beam(forest_cls, inputs: SyntheticInputs, w: Workload) -> RunResult:
    """Beam search over ``inputs.problems`` problems (see the module docstring)."""
    run = _Run(forest_cls, inputs, w)
    f, M, keep, P = run.forest, w.beam_width, w.groups, inputs.problems
    roots = run.call("add_roots", f.add_roots, *inputs.roots(1))
    leaves = run.call("expand", f.expand, roots, np.full(P, w.beams, dtype=np.int64))
    leaf_p = np.repeat(np.arange(P), w.beams)
    run.trace(roots, leaves)
    for t in range(w.iterations):
        leaf_j = _slots(leaf_p)
        finished = run.set_steps(t, leaves, leaf_p, leaf_j)
        run.trace(run.call("aggregate", f.aggregate, leaves, w.agg))
        run.complete(t, leaves[finished], leaf_p[finished], leaf_j[finished])
        open_ = leaves[~finished]
        kept = run.call("select", f.select_beam, open_, keep, w.agg, dedupe=True)
        run.call("prune", f.prune, np.setdiff1d(open_, kept, assume_unique=True))
        at = _lookup(leaves, kept)
        run.trace(kept)
        if t == w.iterations - 1:  # the surviving beams are completions too
            run.complete(t, kept, leaf_p[at], leaf_j[at])
            break
        leaves = run.call("expand", f.expand, kept, np.full(len(kept), M, dtype=np.int64))
        leaf_p = np.repeat(leaf_p[at], M)
        run.trace(leaves)
    return run.finish()


def run_dvts(forest_cls, inputs: SyntheticInputs, w: Workload) -> RunResult:
    """Diverse verifier tree search over ``inputs.problems`` problems (see the module docstring)."""
    run = _Run(forest_cls, inputs, w)
    f, M, S = run.forest, w.beam_width, w.groups
    problem, subtree, flat, offsets = inputs.roots(S)
    current = run.call("add_roots", f.add_roots, problem, subtree, flat, offsets)
    run.trace(current)
    child = np.arange(M)
    for t in range(w.iterations):
        if len(current) == 0:
            break
        leaves = run.call("expand", f.expand, current, np.full(len(current), M, dtype=np.int64))
        leaf_p = np.repeat(problem, M)
        leaf_j = (np.repeat(subtree, M) * M + np.tile(child, len(current))).astype(np.int64)
        finished = run.set_steps(t, leaves, leaf_p, leaf_j)
        best = run.call("select", f.select_dvts, leaves, w.agg)
        run.call("prune", f.prune, np.setdiff1d(leaves, best, assume_unique=True))
        run.trace(leaves, best)
        at = _lookup(leaves, best)
        stop = finished[at] | (t == w.iterations - 1)
        run.complete(t, best[stop], leaf_p[at][stop], leaf_j[at][stop])
        live = ~stop
        current, problem, subtree = best[live], leaf_p[at][live], leaf_j[at][live] // M
    return run.finish()


RUNNERS = {"beam": run_beam, "dvts": run_dvts}


def run_workload(forest_cls, w: Workload, inputs: SyntheticInputs) -> RunResult:
    """Run ``w.method`` with ``forest_cls`` on ``inputs`` (all of its problems)."""
    gc.collect()
    return RUNNERS[w.method](forest_cls, inputs, w)


# --------------------------------------------------------------------------- equivalence


def compare_runs(core: RunResult, ref: RunResult) -> list[str]:
    """Differences between two runs of the same inputs (empty list: bit-identical)."""
    problems = []
    if core.ids_given != ref.ids_given:
        problems.append(f"node ids given out: core {core.ids_given} != reference {ref.ids_given}")
    if core.digest != ref.digest:
        problems.append("the ids / aggregates / selections returned during the search differ")
    for how in VOTE_KINDS:
        for key in ("problem_ids", "answer_ids", "node_ids", "weights"):
            a, b = core.votes[how][key], ref.votes[how][key]
            if a.dtype != b.dtype or not np.array_equal(a, b):
                problems.append(
                    f"vote({how!r}) {key}: core {a[:6].tolist()}... != reference {b[:6].tolist()}..."
                )
    return problems


def compare_answers(full: RunResult, ref: RunResult) -> list[str]:
    """The full core run's winning answers and weights for the reference's problems."""
    problems = []
    for how in VOTE_KINDS:
        a, b = full.votes[how], ref.votes[how]
        order_a = np.argsort(a["problem_ids"], kind="stable")
        order_a = order_a[a["problem_ids"][order_a] < ref.problems]
        order_b = np.argsort(b["problem_ids"], kind="stable")
        for key in ("problem_ids", "answer_ids", "weights"):
            if not np.array_equal(a[key][order_a], b[key][order_b]):
                problems.append(f"full-run vote({how!r}) {key} differs on the reference's problems")
    return problems


# --------------------------------------------------------------------------- one workload


def default_reference_problems(w: Workload) -> int:
    """Problems to run the reference on by default: ~REFERENCE_NODE_BUDGET step nodes."""
    k = REFERENCE_NODE_BUDGET // max(1, w.beams * w.iterations)
    return int(min(w.problems, max(MIN_REFERENCE_PROBLEMS, k)))


def _ratio(a: float, b: float):
    return a / b if b > 0 else None


def _timing(r: RunResult, scale: float = 1.0) -> dict:
    return {
        "problems": r.problems,
        "seconds": {op: s * scale for op, s in r.seconds.items()},
        "forest_s": r.forest_s * scale,
        "wall_s": r.wall_s * scale,
        "glue_s": (r.wall_s - r.forest_s) * scale,
        "calls": dict(r.calls),
        "ids_given": r.ids_given,
    }


def benchmark_workload(w: Workload, core_cls, ref_cls, reference_problems: int | None, log=None) -> dict:
    """Time ``w`` with both classes and check them against each other; returns the JSON record.

    reference_problems: ``None`` for the default (``default_reference_problems``), ``0`` to
    skip the reference (and the check), else the number of leading problems it runs on."""
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    inputs = SyntheticInputs.generate(w)
    log(f"{w.label}: inputs for {w.problems} problems generated in {time.perf_counter() - t0:.1f} s")
    core = run_workload(core_cls, w, inputs)
    log(f"{w.label}: core {core.forest_s:.3f} s ({core.ids_given:,} nodes)")
    record = {
        "method": w.method,
        "problems": w.problems,
        "beams": w.beams,
        "beam_width": w.beam_width,
        "iterations": w.iterations,
        "agg": w.agg,
        "seed": w.seed,
        "nodes": core.ids_given,
        "core": _timing(core),
        "reference": None,
        "speedup": None,
        "speedup_per_op": None,
        "wall_speedup": None,
        "equivalent": None,
        "mismatches": [],
    }
    k = default_reference_problems(w) if reference_problems is None else min(reference_problems, w.problems)
    if k <= 0:
        return record
    subset = inputs if k == w.problems else inputs.first(k)
    ref = run_workload(ref_cls, w, subset)
    scale = w.problems / k
    reference = _timing(ref, scale)
    reference["problems"] = w.problems  # what the scaled numbers stand for
    del reference["ids_given"]  # a count of the measured run only (see "measured")
    reference["measured_problems"] = k
    reference["measured"] = _timing(ref)
    reference["extrapolated"] = k < w.problems
    reference["scale"] = scale
    reference["note"] = (
        f"reference measured on {k} problems, extrapolated linearly to {w.problems} "
        "(an underestimate: the reference is slower per problem at full size, so the speedup "
        "is a lower bound)"
        if k < w.problems
        else f"reference measured on all {k} problems"
    )
    record["reference"] = reference
    record["speedup"] = _ratio(reference["forest_s"], core.forest_s)
    record["wall_speedup"] = _ratio(reference["wall_s"], core.wall_s)
    record["speedup_per_op"] = {op: _ratio(reference["seconds"][op], core.seconds[op]) for op in OPS}
    mismatches = []
    if k < w.problems:  # the core on exactly the reference's problems, for a bit-exact check
        mismatches += compare_runs(run_workload(core_cls, w, subset), ref)
        mismatches += compare_answers(core, ref)
    else:
        mismatches += compare_runs(core, ref)
    record["equivalent"] = not mismatches
    record["mismatches"] = mismatches
    verdict = "identical results" if not mismatches else "RESULTS DIFFER"
    log(f"{w.label}: reference {ref.forest_s:.3f} s on {k} problems; {verdict}")
    return record


# --------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Machine, Python, NumPy and ponder build information for the JSON report."""
    import ponder
    from ponder import _core

    info = dict(_core.build_info())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "machine": {
            "platform": platform.platform(),
            "arch": platform.machine(),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "usable_cpus": usable,
            "hostname": platform.node(),
        },
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "numpy": np.__version__,
        "ponder": ponder.__version__,
        "build_info": info,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- report

_REF_MARK = "†"


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def _fmt_x(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def _fmt_ms(s: float) -> str:
    ms = s * 1e3
    if ms < 10:
        return f"{ms:.2f}"
    return f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def _dominant(record: dict) -> str:
    seconds = record["core"]["seconds"]
    op = max(seconds, key=seconds.get)
    total = sum(seconds.values())
    return f"{op} {100 * seconds[op] / total:.0f}%" if total > 0 else "-"


def _check(record: dict) -> str:
    return {None: "-", True: "✓", False: "✗ FAIL"}[record["equivalent"]]


def summary_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Main table: per (method, N) core / reference seconds, speedup, dominant core op."""
    headers = ["method", "N", "P core/ref", "nodes", "core s", "reference s", "speedup",
               "w/ glue", "top core op", "check"]
    rows = []
    for r in report["workloads"]:
        ref = r["reference"]
        mark = _REF_MARK if ref and ref["extrapolated"] else ""
        ref_problems = "-" if ref is None else f"{ref['measured']['problems']}{mark}"
        ref_cell = "-" if ref is None else _fmt_s(ref["forest_s"]) + mark
        rows.append([
            r["method"], str(r["beams"]), f"{r['problems']}/{ref_problems}", f"{r['nodes']:,}",
            _fmt_s(r["core"]["forest_s"]), ref_cell, _fmt_x(r["speedup"]), _fmt_x(r["wall_speedup"]),
            _dominant(r), _check(r),
        ])
    return headers, rows


def breakdown_rows(report: dict, sep: str) -> tuple[list[str], list[list[str]]]:
    """Per-operation table: core milliseconds and the speedup of each operation."""
    headers = ["method", "N"] + [OP_HEADERS.get(op, op) for op in OPS] + ["(glue)"]
    rows = []
    for r in report["workloads"]:
        cells = []
        for op in OPS:
            s = r["core"]["seconds"][op]
            if r["core"]["calls"][op] == 0:
                cells.append("-")
                continue
            x = r["speedup_per_op"][op] if r["speedup_per_op"] else None
            cells.append(_fmt_ms(s) + ("" if x is None else sep + _fmt_x(x)))
        rows.append([r["method"], str(r["beams"])] + cells + [_fmt_ms(r["core"]["glue_s"])])
    return headers, rows


def _notes(report: dict) -> list[str]:
    notes = [
        (
            "core s / reference s: time inside Forest calls over the whole search (add_roots .. release); "
            "speedup = reference s / core s; w/ glue = the same ratio including the benchmark's own NumPy "
            "glue (identical for both; its core-run time is the (glue) column)."
        ),
    ]
    extrapolated = [r for r in report["workloads"] if r["reference"] and r["reference"]["extrapolated"]]
    if extrapolated:
        which = ", ".join(
            f"{r['method']} N={r['beams']}: K={r['reference']['measured']['problems']}" for r in extrapolated
        )
        notes.append(
            f"{_REF_MARK} reference measured on K problems, extrapolated linearly (x P/K) to the P problems "
            f"the core ran ({which}); the full-size reference is slower per problem, so these speedups "
            "are lower bounds."
        )
    bad = [r for r in report["workloads"] if r["equivalent"] is False]
    for r in bad:
        notes.append(f"✗ {r['method']} N={r['beams']}: " + "; ".join(r["mismatches"]))
    return notes


def _environment_line(report: dict) -> str:
    env = report["environment"]
    m = env["machine"]
    return (
        f"{m['cpu']} ({m['usable_cpus']} usable CPUs), {env['python']}, numpy {env['numpy']}, "
        f"ponder {env['ponder']}, build {json.dumps(env['build_info'], sort_keys=True)}"
    )


def render_rich(report: dict, file=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file)
    if not console.is_terminal:  # a log file or a pipe: do not squeeze into 80 columns
        console.width = max(console.width, 132)

    def table(title: str, headers: list[str], rows: list[list[str]], left=("method", "top core op")):
        t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
        for h in headers:
            t.add_column(h, justify="left" if h in left else "right", no_wrap=True)
        for row in rows:
            t.add_row(*row, style="bold red" if row[-1].startswith("✗") else None)
        console.print(t)

    table("ponder control plane: compiled core vs pure-Python reference", *summary_rows(report))
    table("core time per operation, ms (speedup vs reference below)", *breakdown_rows(report, sep="\n"))
    console.print(_environment_line(report), style="dim")
    for note in _notes(report):
        console.print(note, style="bold red" if note.startswith("✗") else "dim")


def _plain_table(title: str, headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(headers))
    return "\n".join([title, rule, line(headers), rule, *map(line, rows), rule])


def render_plain(report: dict, file=None) -> None:
    file = file or sys.stdout
    print(_plain_table("ponder control plane: compiled core vs pure-Python reference",
                       *summary_rows(report)), file=file)
    print(file=file)
    print(_plain_table("core time per operation, ms (speedup vs reference)",
                       *breakdown_rows(report, sep=" ")), file=file)
    print(_environment_line(report), file=file)
    for note in _notes(report):
        print(note, file=file)


def render(report: dict, file=None) -> None:
    """Print the report as tables (with ``rich`` when it is installed)."""
    try:
        import rich  # noqa: F401
    except ImportError:
        render_plain(report, file)
    else:
        render_rich(report, file)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to ``parser``."""
    d, q = DEFAULT, QUICK
    parser.add_argument("--quick", action="store_true",
                        help=f"small run: {q['problems']} problems, N in {list(q['beams'])}, "
                             f"{q['iterations']} iterations, reference on every problem")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE")
    parser.add_argument("--problems", type=int, metavar="P",
                        help=f"problems in the forest (default {d['problems']})")
    beams = " ".join(map(str, d["beams"]))
    parser.add_argument("--beams", type=int, nargs="+", metavar="N",
                        help=f"beams per problem, one workload each (default {beams})")
    parser.add_argument("--iterations", type=int, metavar="I",
                        help=f"search iterations (default {d['iterations']})")
    parser.add_argument("--beam-width", type=int, metavar="M",
                        help=f"children per kept beam / candidates per subtree (default {d['beam_width']})")
    parser.add_argument("--reference-problems", type=int, metavar="K",
                        help="run the reference on the first K problems and extrapolate linearly "
                             "(0: skip the reference and the check; default: all problems with --quick, "
                             f"else enough for ~{REFERENCE_NODE_BUDGET:,} step nodes, at least "
                             f"{MIN_REFERENCE_PROBLEMS})")
    parser.add_argument("--agg", choices=AGGREGATIONS, default="prod",
                        help="path score aggregation for selection and weighted voting (default prod)")
    parser.add_argument("--methods", nargs="+", choices=SEARCHES, default=list(SEARCHES),
                        help="searches to run (default: beam dvts)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs (default 0)")
    return parser


def build_parser(prog: str = "bench_core") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Time the search-forest control plane (beam search and DVTS with synthetic "
                    "steps) with ponder._core.Forest and ponder.twins.Forest, and check that "
                    "both give identical results.",
    )
    return add_arguments(parser)


def workloads_from_args(args: argparse.Namespace) -> list[Workload]:
    base = QUICK if args.quick else DEFAULT

    def pick(name: str):
        value = getattr(args, name)
        return base[name] if value is None else value

    return [
        Workload(method, pick("problems"), n, pick("beam_width"), pick("iterations"), args.agg, args.seed)
        for method in args.methods
        for n in pick("beams")
    ]


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed ``args``; print tables or JSON. Returns the exit status
    (1 when the implementations disagree)."""
    import ponder
    from ponder.twins import Forest as ReferenceForest

    try:
        workloads = workloads_from_args(args)
    except ValueError as exc:
        print(f"bench_core: {exc}", file=sys.stderr)
        return 2
    reference_problems = args.reference_problems
    if reference_problems is None and args.quick:
        reference_problems = workloads[0].problems
    if reference_problems is not None and reference_problems < 0:
        print("bench_core: --reference-problems must be >= 0", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(f"[bench_core {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    env = environment()
    # Warm up both classes and searches (imports, first-call costs) on tiny untimed runs.
    for method in args.methods:
        w = Workload(method, 4, 8, 4, 3)
        for cls in (ponder.Forest, ReferenceForest):
            run_workload(cls, w, SyntheticInputs.generate(w))
    records = [
        benchmark_workload(w, ponder.Forest, ReferenceForest, reference_problems, log) for w in workloads
    ]
    checked = [r["equivalent"] for r in records if r["equivalent"] is not None]
    report = {
        "benchmark": "ponder control plane (search forest)",
        "environment": env,
        "config": {
            "quick": args.quick,
            "reference_problems": args.reference_problems,
            "agg": args.agg,
            "seed": args.seed,
            "methods": list(args.methods),
            "inputs": {
                "prompt_tokens": list(PROMPT_TOKENS),
                "step_tokens": list(STEP_TOKENS),
                "score_beta": list(SCORE_BETA),
                "finish_rate": FINISH_RATE,
                "duplicate_rate": DUPLICATE_RATE,
                "answers": len(ANSWER_WEIGHTS),
            },
        },
        "workloads": records,
        "all_equivalent": all(checked) if checked else None,
        "total_benchmark_s": time.perf_counter() - start,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
        log(f"wrote {args.out}")
    if args.json:
        print(text)
    else:
        render(report)
    if report["all_equivalent"] is False:
        print("bench_core: FAIL: ponder._core.Forest and ponder.twins.Forest gave different "
              "results (see 'mismatches')", file=sys.stderr)
        return 1
    if checked and not args.json:
        print(f"✓ core and reference results identical on {len(checked)} workload(s)")
    return 0


def main(argv: list[str] | None = None, prog: str = "bench_core") -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run, print; returns the exit status (0 ok,
    1 the implementations disagree, 2 a bad option)."""
    return run(build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
