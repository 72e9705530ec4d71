#!/usr/bin/env python
"""Dynamic compute on the held-out builtin:arith: accuracy against mean policy tokens per problem.

Built-in models (``builtin:policy-small`` + ``builtin:prm``), CPU. On the held-out problems
(``--per-level K`` of each level, or ``--full``: all 500):

* fixed methods: majority, best-of-N and weighted best-of-N at n = 1, 2, 4, ... up to
  ``--samples`` (the first n of one set of ``--samples`` solutions per problem: i.i.d. samples,
  so a prefix is an n-sample run), beam search and DVTS at each ``--tree-n`` (beam width 4, or
  n when smaller) -- measured by ``ponder.calibrate.collect``;
* early-stopped majority and weighted best-of-N (cap n = ``--ref-n``, threshold 0.95; majority
  in rounds of ``--round-size`` with the futility rule at ``--futility`` gated at PRM score
  ``--futility-score``, weighted best-of-N with the ``--weighted-*`` settings: the settings
  ``fit_early_stop.py`` chose on the calibration records), and
  ``method="auto"`` at each ``--budgets`` (n-equivalents) with ``--strategy`` (default: the
  shipped ``ponder/toy/strategy.json``, calibrated on freshly generated problems) -- real engine
  runs of those state machines (``--runs`` caches them; ``--only`` runs a part);
* ``early_stop_simulated``: early-stop rules replayed on the fixed methods' samples (no new
  sampling), for comparing rules on the same draws.

Policy tokens = prompt (once per problem) + generated, as ``ponder run`` rows count them.
Figures (``--json`` keys): ``auto_tokens_to_match_best16_ratio`` (the fewest mean tokens of an
``auto`` budget whose accuracy reaches the best fixed method's at n = ``--ref-n``, over that
method's tokens; null when none reaches it), ``auto_gain_at_n16_tokens`` (the auto frontier's
accuracy at the best fixed method's tokens, linearly interpolated between auto budgets, minus
that method's accuracy), ``early_stop_token_ratio`` and ``early_stop_accuracy_delta``
(early-stopped majority vs majority at n = ``--ref-n``). Accuracies are fractions (0.005 =
half a point). Targets (issue 15): ratio <= 0.5, gain >= 0.02, token ratio <= 0.4 with delta
>= -0.005. ``--plot`` writes the frontier (docs/adaptive.png).

Long runs: ``--records`` and ``--runs`` cache every measurement by problem id (a problem's
seeds come from its place in the whole held-out set, so its results do not depend on the slice);
``--chunk K`` measures K problems at a time in level round robin and saves each chunk, so a run
cut short keeps a level-balanced prefix; ``--available`` samples nothing and reports on the
problems the caches hold in full. Every row carries ``by_level`` (accuracy and tokens per level).

``--quick``: 1 problem per level, 4 samples, tree n 4, budgets 2 and 4, ref n 4 (~1 minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import ponder  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from ponder.calibrate import collect, load_records
from ponder.methods.config import SearchConfig
from ponder.methods.stopping import EarlyStop, decide, tally
from ponder.methods.strategy import OPTION_VOTE, SAMPLING, TREES, load_cached, vote
from ponder.protocols import SamplingParams

BENCH_SEED = 777_001  # the sampling seed (the held-out problems are fixed)
#: the early-stop settings of the benchmark, chosen on the 490 calibration records by
#: ``fit_early_stop.py`` (docs/adaptive.md): the fewest tokens whose accuracy there stays within
#: 0.5 point of the vote at n = 16. Majority: rounds of 2, futility 0.25 gated at PRM score 0.1
#: (2 of 490 lost, token ratio 0.379). Weighted best-of-N: every futility rule lost 3 or more,
#: so the leader rule alone, in rounds of 2.
ES_ROUND, ES_FUTILITY, ES_FUTILITY_SCORE = 2, 0.25, 0.1
WEIGHTED_ES_ROUND, WEIGHTED_ES_FUTILITY, WEIGHTED_ES_FUTILITY_SCORE = 2, 0.0, 0.0
TARGETS = {"auto_tokens_to_match_best16_ratio": 0.5, "auto_gain_at_n16_tokens": 0.02,
           "early_stop_token_ratio": 0.4, "early_stop_accuracy_delta": -0.005}


def log(msg: str) -> None:
    print(f"[bench_adaptive] {msg}", file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def base_config() -> SearchConfig:
    """``ponder run``'s settings for builtin:arith (temperature 0.8, 96-token steps, 16 steps)."""
    return SearchConfig(beam_width=4, num_iterations=16, max_steps=16, agg="last",
                        sampling=SamplingParams(temperature=0.8, max_step_tokens=96))


def fixed_rows(records, samples: int, tree_ns: list[int]) -> list[dict]:
    rows = []
    n = 1
    while n <= samples:
        for m in SAMPLING:
            got = [r.sampled_outcome(OPTION_VOTE[m], n) for r in records]
            rows.append(_row(m, n, got, by_level=_levels(records, got)))
        n *= 2
    for m in TREES:
        for n in tree_ns:
            got = [(r.trees[m][n]["correct"], r.prompt_tokens + r.trees[m][n]["tokens"]) for r in records]
            rows.append(_row(m, n, got, by_level=_levels(records, got)))
    return rows


def _levels(records, got) -> dict:
    return by_level([{"level": r.level, "correct": c, "tokens": t} for r, (c, t) in zip(records, got)])


def _row(method: str, n, got, **extra) -> dict:
    return {"method": method, "n": n, "problems": len(got), "accuracy": sum(c for c, _ in got) / len(got),
            "mean_policy_tokens": sum(t for _, t in got) / len(got), **extra}


def _strategy_digest(strategy: str | None) -> str:
    import hashlib

    from ponder.methods.strategy import BUILTIN_PATH

    return hashlib.sha256(open(strategy or BUILTIN_PATH, "rb").read()).hexdigest()[:16]


def engine_runs(problems, policy, prm, base: SearchConfig, ref_n: int, budgets: list[int], strategy: str | None,
                early_stop: EarlyStop, weighted_early_stop: EarlyStop, cache: str | None = None,
                only: str | None = None, seeds: dict[str, int] | None = None, chunk: int = 0,
                sample: bool = True):
    """Early-stopped majority (``early_stop``) and weighted best-of-N (``weighted_early_stop``) and
    auto at every budget. ``cache``: a JSON file of earlier runs, keyed by kind and settings (the
    rule; the budget and the strategy file's digest), then by problem id; what is found there is
    not run again. The rest runs in chunks of ``chunk`` problems (0: all at once), every kind of
    a chunk in one engine, and the cache is written after each chunk (a cut run keeps its
    finished chunks). ``seeds``: each problem's seed by id (default: its position here).
    ``only``: "early_stop" or "auto": run only those kinds. ``sample=False``: run nothing.
    Returns {kind: [per-problem row, in ``problems`` order, only problems that have it]}."""
    from ponder.engine import Engine
    from ponder.grading import is_equivalent

    saved = json.load(open(cache)) if cache and os.path.exists(cache) else {}
    seeds = seeds or {str(p.id): i for i, p in enumerate(problems)}
    digest = _strategy_digest(strategy)
    kinds = [("majority+early_stop", dataclasses.replace(base, method="majority", n=ref_n, early_stop=early_stop))]
    kinds.append(("weighted_best_of_n+early_stop",
                  dataclasses.replace(base, method="weighted_best_of_n", n=ref_n, early_stop=weighted_early_stop)))
    for b in budgets:
        kinds.append((f"auto@{b}", dataclasses.replace(base, method="auto", n=b, budget=b, strategy=strategy)))
    keys = {}
    for name, cfg in kinds:
        settings = repr(cfg.early_stop) if cfg.method != "auto" else f"budget={cfg.budget} strategy={digest}"
        keys[name] = f"{name} | {settings}"
        saved.setdefault(keys[name], {})
    wanted = [(name, cfg) for name, cfg in kinds if only is None or name.startswith("auto") == (only == "auto")]
    todo = [p for p in problems if any(str(p.id) not in saved[keys[name]] for name, _ in wanted)] if sample else []
    size = chunk or max(1, len(todo))
    t0 = time.perf_counter()
    for c0 in range(0, len(todo), size):
        part = todo[c0:c0 + size]
        engine = Engine(policy, prm)
        handles = {name: [(p, engine.submit(p.problem, dataclasses.replace(cfg, seed=BENCH_SEED + 7 + 1000 * seeds[str(p.id)])))
                          for p in part if str(p.id) not in saved[keys[name]]] for name, cfg in wanted}
        while engine.has_work():
            engine.step()
        for name, hs in handles.items():
            for p, h in hs:
                r = h.result()
                saved[keys[name]][str(p.id)] = {
                    "id": str(p.id), "level": p.level,
                    "correct": bool(is_equivalent(r.answer, p.answer)) if r.answer is not None else False,
                    "tokens": r.budget.policy_tokens_generated + r.budget.policy_tokens_prefilled,
                    "difficulty": r.difficulty, "chosen": r.chosen,
                }
        if cache:
            tmp = cache + ".tmp"
            with open(tmp, "w") as f:
                json.dump(saved, f)
            os.replace(tmp, cache)
        log(f"engine runs of {[n for n, _ in wanted]}: {c0 + len(part)}/{len(todo)} problems, "
            f"{time.perf_counter() - t0:.0f} s")
    return {name: [saved[keys[name]][str(p.id)] for p in problems if str(p.id) in saved[keys[name]]]
            for name, _ in kinds}


def level_order(problems: list) -> list:
    """Round robin over the levels (each level's first problem, then each one's second, ...):
    every prefix of the order is balanced across levels, so a run cut short stays a fair slice."""
    by: dict = {}
    for p in problems:
        by.setdefault(p.level, []).append(p)
    out = []
    for i in range(max((len(v) for v in by.values()), default=0)):
        out += [v[i] for _, v in sorted(by.items(), key=lambda kv: str(kv[0])) if i < len(v)]
    return out


def fixed_records(problems, policy, prm, base: SearchConfig, samples: int, tree_ns: list[int], path: str | None,
                  seeds: dict[str, int], chunk: int, sample: bool = True, progress: bool = True) -> dict:
    """The fixed methods' measurements (``ponder.calibrate.collect``) of ``problems`` by id:
    read from ``path`` (JSONL records; one with fewer samples or tree n than asked is measured
    again), the rest measured in chunks of ``chunk`` (0: all at once), each appended to
    ``path`` when done. ``sample=False``: only what ``path`` holds."""
    have = {}
    if path and os.path.exists(path):
        for r in load_records(path):
            if len(r.samples) >= samples and all(n in r.trees.get(m, {}) for m in TREES for n in tree_ns):
                have[r.id] = r
    todo = [p for p in problems if str(p.id) not in have] if sample else []
    size = chunk or max(1, len(todo))
    t0 = time.perf_counter()
    for c0 in range(0, len(todo), size):
        part = todo[c0:c0 + size]
        got = collect(part, policy, prm, base, samples=samples, tree_ns=tree_ns, beam_width=4, seed=BENCH_SEED,
                      progress=progress, seeds=[BENCH_SEED + 1000 * seeds[str(p.id)] for p in part])
        for r in got:
            have[r.id] = r
        if path:
            with open(path, "a") as f:
                f.write("".join(json.dumps(r.to_dict()) + "\n" for r in got))
        log(f"fixed methods: {c0 + len(part)}/{len(todo)} problems, {time.perf_counter() - t0:.0f} s")
    return have


def replay_early_stop(record, rule: EarlyStop, cap: int, weighted: bool) -> tuple[bool, int]:
    """(correct, policy tokens) of the early-stop state machine replayed on a record's i.i.d.
    samples (its first rounds), as ``EarlyStopSampling`` decides: the leader rule, then futility
    and its PRM gate (the samples' ``score``: the aggregated PRM score the vote reads)."""
    from ponder.grading import normalize_answer

    s, used = record.samples, 0
    while used < cap:
        used = min(cap, used + rule.round_size)
        answers = [None if x["answer"] is None else normalize_answer(x["answer"]) for x in s[:used]]
        weights = [min(1.0, max(0.0, x["score"])) for x in s[:used]] if weighted else None
        settled, futile = decide(rule, tally(answers, weights), used, cap - used, lambda: [x["score"] for x in s[:used]])
        if settled or futile:
            break
    got = s[:used]
    i = vote([x["answer"] for x in got], [x["score"] for x in got], "weighted" if weighted else "majority")
    return (bool(got[i]["correct"]) if i >= 0 else False), record.prompt_tokens + sum(x["tokens"] for x in got)


def simulated_early_stop(records, cap: int, rules: list[EarlyStop]) -> list[dict]:
    """Early-stop rules replayed on the fixed methods' samples (no new sampling): token ratio
    and accuracy delta against the same vote at ``cap``."""
    out = []
    for rule in rules:
        for weighted, name in ((False, "majority"), (True, "weighted_best_of_n")):
            full = [r.sampled_outcome("weighted" if weighted else "majority", cap) for r in records]
            got = [replay_early_stop(r, rule, cap, weighted) for r in records]
            n = len(records)
            out.append({"method": name, "threshold": rule.threshold, "round_size": rule.round_size,
                        "futility": rule.futility, "futility_score": rule.futility_score, "accuracy": sum(c for c, _ in got) / n,
                        "token_ratio": sum(t for _, t in got) / max(1, sum(t for _, t in full)),
                        "accuracy_delta": (sum(c for c, _ in got) - sum(c for c, _ in full)) / n})
    return out


def interpolate(points: list[tuple[float, float]], x: float) -> tuple[float, str]:
    """The accuracy of a frontier (tokens, accuracy) at x tokens: linear between the points;
    beyond the ends, the end point's (and a note saying so)."""
    pts = sorted(points)
    if x <= pts[0][0]:
        return pts[0][1], "below the smallest auto budget: its accuracy"
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1, "interpolated"
    return pts[-1][1], "beyond the largest auto budget: its accuracy (extrapolation not attempted)"


def by_level(per: list[dict]) -> dict:
    """{level: {"problems", "accuracy", "mean_policy_tokens"}} of per-problem rows."""
    out = {}
    for lv in sorted({x["level"] for x in per}, key=str):
        xs = [x for x in per if x["level"] == lv]
        out[str(lv)] = {"problems": len(xs), "accuracy": sum(x["correct"] for x in xs) / len(xs),
                        "mean_policy_tokens": sum(x["tokens"] for x in xs) / len(xs)}
    return out


def level_oracle(fixed: list[dict], max_tokens: float) -> dict | None:
    """The best allocation by level, chosen in hindsight: one fixed row (method and n) per level,
    measured on this very set, with mean policy tokens <= ``max_tokens`` and the most correct
    problems. An upper bound for any allocation that gives every problem of a level the same
    fixed method, even one told each problem's level; so a target above it needs finer
    difficulty than the level. None when no allocation fits."""
    front = [(0.0, 0.0, ())]  # (total tokens, correct problems, choices), Pareto-pruned
    total = 0
    for lv in sorted({k for r in fixed for k in r.get("by_level", {})}, key=str):
        opts = [(r["by_level"][lv], f"{r['method']}@{r['n']}") for r in fixed if lv in r.get("by_level", {})]
        total += opts[0][0]["problems"]
        merged = sorted(((t + v["problems"] * v["mean_policy_tokens"], c + v["problems"] * v["accuracy"], ch + ((lv, name),))
                         for t, c, ch in front for v, name in opts), key=lambda x: (x[0], -x[1]))
        front, best = [], -1.0
        for x in merged:
            if x[1] > best + 1e-9:
                front.append(x)
                best = x[1]
    fits = [x for x in front if x[0] / total <= max_tokens + 1e-9]
    if not fits:
        return None
    t, c, ch = max(fits, key=lambda x: (x[1], -x[0]))
    return {"max_tokens": max_tokens, "accuracy": c / total, "mean_policy_tokens": t / total, "choice": dict(ch)}


def figures(fixed: list[dict], runs: dict, ref_n: int, budgets: list[int], table) -> dict:
    at_ref = [r for r in fixed if r["n"] == ref_n]
    best = max(at_ref, key=lambda r: (r["accuracy"], -r["mean_policy_tokens"]))
    auto = []
    for b in budgets:
        per = runs[f"auto@{b}"]
        row = _row("auto", b, [(x["correct"], x["tokens"]) for x in per])
        row["budget_tokens"] = table.tokens_for_n(b)
        chosen: dict[str, int] = {}
        for x in per:
            c = x["chosen"] or {}
            label = c.get("method", "?") + ("" if c.get("method") == "stop" else f"@{c.get('n')}")
            chosen[label] = chosen.get(label, 0) + 1
        row["chosen"] = chosen
        row["by_level"] = by_level(per)
        auto.append(row)
    reach = [a for a in auto if a["accuracy"] >= best["accuracy"]]
    ratio = min(a["mean_policy_tokens"] for a in reach) / best["mean_policy_tokens"] if reach else None
    acc_at, how = interpolate([(a["mean_policy_tokens"], a["accuracy"]) for a in auto], best["mean_policy_tokens"])
    maj = next(r for r in at_ref if r["method"] == "majority")
    es = _row("majority+early_stop", ref_n, [(x["correct"], x["tokens"]) for x in runs["majority+early_stop"]])
    wes = _row("weighted_best_of_n+early_stop", ref_n,
               [(x["correct"], x["tokens"]) for x in runs["weighted_best_of_n+early_stop"]])
    wbon = next(r for r in at_ref if r["method"] == "weighted_best_of_n")
    out = {
        "ref_n": ref_n,
        "best_fixed_at_ref_n": best,
        "auto_tokens_to_match_best16_ratio": ratio,
        "auto_gain_at_n16_tokens": acc_at - best["accuracy"],
        "auto_accuracy_at_best16_tokens": acc_at,
        "auto_accuracy_at_best16_tokens_how": how,
        "early_stop_token_ratio": es["mean_policy_tokens"] / maj["mean_policy_tokens"],
        "early_stop_accuracy_delta": es["accuracy"] - maj["accuracy"],
        "weighted_early_stop_token_ratio": wes["mean_policy_tokens"] / wbon["mean_policy_tokens"],
        "weighted_early_stop_accuracy_delta": wes["accuracy"] - wbon["accuracy"],
        "auto": auto,
        "early_stop": [es, wes],
        # what allocating by level could reach at the two targets' token levels (hindsight bound)
        "level_oracle_at_half_best16_tokens": level_oracle(fixed, 0.5 * best["mean_policy_tokens"]),
        "level_oracle_at_best16_tokens": level_oracle(fixed, best["mean_policy_tokens"]),
    }
    out["targets_met"] = {
        "auto_tokens_to_match_best16_ratio": ratio is not None and ratio <= TARGETS["auto_tokens_to_match_best16_ratio"],
        "auto_gain_at_n16_tokens": out["auto_gain_at_n16_tokens"] >= TARGETS["auto_gain_at_n16_tokens"],
        "early_stop": out["early_stop_token_ratio"] <= TARGETS["early_stop_token_ratio"]
        and out["early_stop_accuracy_delta"] >= TARGETS["early_stop_accuracy_delta"],
    }
    return out


def plot(fixed: list[dict], figs: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for m in (*SAMPLING, *TREES):
        pts = sorted((r["mean_policy_tokens"], r["accuracy"]) for r in fixed if r["method"] == m)
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1, label=m)
    auto = sorted((a["mean_policy_tokens"], a["accuracy"], a["n"]) for a in figs["auto"])
    ax.plot([a[0] for a in auto], [a[1] for a in auto], marker="*", ms=10, lw=2, color="black", label="auto (budget B)")
    for x, y, b in auto:
        ax.annotate(f"B={b}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for r, mk in zip(figs["early_stop"], ("s", "D")):
        ax.plot([r["mean_policy_tokens"]], [r["accuracy"]], marker=mk, ms=8, ls="", label=r["method"])
    ax.set_xscale("log")
    ax.set_xlabel("mean policy tokens per problem (log)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table_md(fixed: list[dict], figs: dict) -> str:
    lines = ["| method | n / budget | accuracy | policy tokens / problem |", "|---|---|---|---|"]
    for r in fixed + figs["early_stop"] + figs["auto"]:
        lines.append(f"| {r['method']} | {r['n']} | {r['accuracy']:.3f} | {r['mean_policy_tokens']:.0f} |")
    return "\n".join(lines)


def _slice_name(args, problems) -> str:
    asked = "all 500" if args.full else f"first {args.per_level} per level"
    if len(problems) == (500 if args.full else 5 * args.per_level):
        return f"{asked} ({len(problems)} problems)"
    return f"{len(problems)} problems measured in full of the {asked} (level round robin)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--per-level", type=int, default=20, help="held-out problems per level (default 20)")
    ap.add_argument("--full", action="store_true", help="all 500 held-out problems")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tree-n", type=_ints, default=[4, 8, 16])
    ap.add_argument("--budgets", type=_ints, default=[2, 4, 8, 16])
    ap.add_argument("--ref-n", type=int, default=16)
    ap.add_argument("--strategy", default=None, help="strategy.json (default: the shipped one)")
    ap.add_argument("--records", default=None,
                    help="cache of the fixed-method measurements (JSONL by problem id; read if present, appended to per chunk)")
    ap.add_argument("--runs", default=None,
                    help="cache of the early-stop and auto engine runs (JSON by kind and problem id; written per chunk)")
    ap.add_argument("--chunk", type=int, default=0,
                    help="measure the problems in chunks of this many (level round robin), each saved to the caches "
                         "when done (default 0: all at once)")
    ap.add_argument("--available", action="store_true",
                    help="sample nothing: report on the problems of the slice that --records and --runs hold in full")
    ap.add_argument("--only", choices=("early_stop", "auto"), default=None,
                    help="run only these engine runs into --runs and stop (a later run without --only reports)")
    ap.add_argument("--plot", default=None, help="write the frontier plot here (e.g. docs/adaptive.png)")
    ap.add_argument("--kv-budget", type=int, default=16384)
    ap.add_argument("--threshold", type=float, default=0.95, help="early stop: the leader rule's threshold")
    ap.add_argument("--round-size", type=int, default=ES_ROUND,
                    help=f"early stop of majority: samples per round (default {ES_ROUND})")
    ap.add_argument("--futility", type=float, default=ES_FUTILITY,
                    help=f"early stop of majority: the futility level (default {ES_FUTILITY}; 0: off)")
    ap.add_argument("--futility-score", type=float, default=ES_FUTILITY_SCORE,
                    help=f"early stop of majority: the futility rule's PRM gate (default {ES_FUTILITY_SCORE}; 0: off)")
    ap.add_argument("--weighted-round-size", type=int, default=WEIGHTED_ES_ROUND,
                    help=f"early stop of weighted best-of-N: samples per round (default {WEIGHTED_ES_ROUND})")
    ap.add_argument("--weighted-futility", type=float, default=WEIGHTED_ES_FUTILITY,
                    help=f"early stop of weighted best-of-N: the futility level (default {WEIGHTED_ES_FUTILITY}: off)")
    ap.add_argument("--weighted-futility-score", type=float, default=WEIGHTED_ES_FUTILITY_SCORE,
                    help=f"early stop of weighted best-of-N: the PRM gate (default {WEIGHTED_ES_FUTILITY_SCORE}: off)")
    args = ap.parse_args(argv)
    if args.only and not args.runs:
        ap.error("--only needs --runs (where the engine runs are kept for the report)")
    if args.available and not (args.records and args.runs):
        ap.error("--available needs --records and --runs (what it reports on)")
    if args.quick:
        args.per_level, args.samples, args.tree_n, args.budgets, args.ref_n = 1, 4, [4], [2, 4], 4
    import ponder
    from ponder.data import load_problems

    problems = level_order(load_problems("builtin:arith", limit=None if args.full else 5 * args.per_level))
    # a problem's seed is its place in the whole held-out set: its results do not depend on the slice
    seeds = {str(p.id): i for i, p in enumerate(load_problems("builtin:arith"))}
    t0 = time.perf_counter()
    policy = ponder.HFPolicy("builtin:policy-small", device="cpu", kv_budget=args.kv_budget)
    prm = ponder.HFPRM("builtin:prm", device="cpu", kv_budget=args.kv_budget)
    base = base_config()
    sample = not args.available
    have = {}
    if args.only != "auto" or args.available:  # the fixed methods are measured first, unless only auto is asked
        have = fixed_records(problems, policy, prm, base, args.samples, args.tree_n, args.records, seeds, args.chunk,
                             sample, progress=not args.json)
    t_fixed = time.perf_counter() - t0
    table = load_cached(args.strategy)
    t1 = time.perf_counter()
    try:
        rule = EarlyStop(args.threshold, args.round_size, args.futility or None,
                         (args.futility_score or None) if args.futility else None).validate()
        wrule = EarlyStop(args.threshold, args.weighted_round_size, args.weighted_futility or None,
                          (args.weighted_futility_score or None) if args.weighted_futility else None).validate()
    except ValueError as exc:
        ap.error(str(exc))
    runs = engine_runs(problems, policy, prm, base, args.ref_n, args.budgets, args.strategy, rule, wrule, args.runs,
                       args.only, seeds, args.chunk, sample)
    if args.only:
        log(f"--only {args.only}: engine runs saved to {args.runs}; run again without --only to report")
        return 0
    # the report covers the problems measured in full (all of the slice unless --available)
    done = {x["id"] for x in runs["majority+early_stop"]}
    for v in runs.values():
        done &= {x["id"] for x in v}
    problems = [p for p in problems if str(p.id) in have and str(p.id) in done]
    if not problems:
        log("no problem of the slice is measured in full yet")
        return 1
    ids = {str(p.id) for p in problems}
    runs = {k: [x for x in v if x["id"] in ids] for k, v in runs.items()}
    records = [have[str(p.id)] for p in problems]
    fixed = fixed_rows(records, args.samples, args.tree_n)
    figs = figures(fixed, runs, args.ref_n, args.budgets, table)
    plain = EarlyStop(args.threshold, 4, None)
    figs["early_stop_rule"] = dataclasses.asdict(rule)
    figs["weighted_early_stop_rule"] = dataclasses.asdict(wrule)
    figs["early_stop_simulated"] = simulated_early_stop(
        records, args.ref_n, list(dict.fromkeys([plain, rule, wrule, EarlyStop(args.threshold, 4, 0.3),
                                                 *(EarlyStop(args.threshold, 4, f) for f in (0.05, 0.1))])))
    out = {
        "slice": _slice_name(args, problems),
        "levels": {str(lv): sum(p.level == lv for p in problems) for lv in sorted({p.level for p in problems})},
        "problems": len(problems),
        "samples": args.samples, "tree_n": args.tree_n, "budgets": args.budgets,
        "strategy": args.strategy or "ponder/toy/strategy.json",
        "strategy_meta": table.meta,
        "wall_s": {"fixed": round(t_fixed, 1), "early_stop_and_auto": round(time.perf_counter() - t1, 1)},
        "fixed": fixed,
        **figs,
        "per_problem": runs,
    }
    if args.plot:
        plot(fixed, figs, args.plot, f"builtin:arith held-out, {out['slice']}; policy-small + prm, CPU")
    if args.json:
        print(json.dumps(out))
    else:
        print(table_md(fixed, figs))
        for k in ("auto_tokens_to_match_best16_ratio", "auto_gain_at_n16_tokens", "early_stop_token_ratio",
                  "early_stop_accuracy_delta"):
            print(f"{k}: {out[k]}")
        print(f"best fixed at n={args.ref_n}: {figs['best_fixed_at_ref_n']}")
        print("targets met:", figs["targets_met"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
