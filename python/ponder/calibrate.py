"""``ponder calibrate``: measure a policy + PRM on a calibration set and fit a strategy table.

    ponder calibrate --policy builtin:policy-small --prm builtin:prm --dataset builtin:arith-fresh \\
                     --budgets 2,4,8,16 --out strategy.json

Per calibration problem (``collect``): S solutions sampled once (weighted best-of-N's search:
every step scored; each solution's answer, aggregated score and generated tokens kept, in
order, so every sampling option at n <= S and every probe k are prefixes of one set), and
beam search and DVTS at each ``--tree-n`` (their answers and tokens). All searches of all
problems run together in one ``ponder.Engine`` (per-request random streams). The records go
to ``OUT.records.jsonl`` (refit with ``--from-records`` without sampling again); the table
(``ponder.methods.strategy.fit``) to ``OUT``.

``--dataset builtin:arith-fresh`` draws freshly generated ``builtin:arith`` problems
(``fresh_arith``: ``--per-level`` per level from ``--seed``, every held-out expression
skipped), never the held-out set. Any other ``--dataset`` is loaded with
``ponder.data.load_problems``; do not calibrate on the set you evaluate on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .methods.config import SearchConfig
from .methods.strategy import TREES, ProblemRecord, StrategyTable, fit

#: the seed of the shipped built-in table's calibration problems (disjoint from the held-out
#: set by construction, and from the models' training stream's seed)
CALIBRATION_SEED = 5_150_151


def fresh_arith(per_level: int, seed: int = CALIBRATION_SEED) -> list:
    """``per_level`` freshly generated ``builtin:arith`` problems per level (1-5) as
    ``ponder.data.Problem``; expressions of the held-out set and repeats are skipped."""
    from .data import Problem
    from .toy import arith

    held_out = arith._eval_expressions()
    out, seen = [], set()
    for level in arith.LEVELS:
        rng = random.Random(seed * 10 + level)
        count = 0
        while count < per_level:
            p = arith.generate_problem(rng, level, id=f"arith-cal-{seed}-{len(out):04d}")
            if p.expression in held_out or p.expression in seen:
                continue
            seen.add(p.expression)
            out.append(Problem(id=p.id, problem=p.question, answer=str(p.answer), level=level, task=arith.TASK))
            count += 1
    return out


def _generated_per_completion(result) -> list[int]:
    """Generated tokens of each completion's path (steps only, root excluded), from the tree."""
    tree = result.tree
    parent = dict(zip(tree["node_id"].tolist(), tree["parent"].tolist()))
    tokens = dict(zip(tree["node_id"].tolist(), tree["num_tokens"].tolist()))
    out = []
    for c in result.completions:
        x, total = c.node_id, 0
        while parent.get(x, -1) != -1:
            total += tokens[x]
            x = parent[x]
        out.append(total)
    return out


def collect(
    problems: Sequence,
    policy,
    prm,
    base: SearchConfig,
    *,
    samples: int = 16,
    tree_ns: Sequence[int] = (4, 8),
    beam_width: int = 4,
    seed: int = 0,
    progress: bool = True,
    seeds: Sequence[int] | None = None,
    trees: Sequence[str] = TREES,
) -> list[ProblemRecord]:
    """Measure every problem (see the module docstring); ``base`` gives the sampling,
    aggregation and limits. Problem i's searches draw from ``seed + 1000 * i`` (plus a
    per-search offset), or from ``seeds[i]`` when given (one per problem: a problem's results
    then do not depend on which others are measured with it). Returns one ``ProblemRecord``
    per problem, in order. ``trees``: the tree methods measured (of ``TREES``)."""
    if seeds is not None and len(seeds) != len(problems):
        raise ValueError(f"seeds: one per problem expected, got {len(seeds)} for {len(problems)} problems")
    from .engine import Engine
    from .grading import is_equivalent

    engine = Engine(policy, prm)
    handles = []
    for i, p in enumerate(problems):
        ps = seed + 1000 * i if seeds is None else int(seeds[i])
        s = dataclasses.replace(base, method="weighted_best_of_n", n=samples, vote=None, seed=ps,
                                early_stop=None, budget=None, budget_tokens=None)
        hs = {"samples": engine.submit(p.problem, s)}
        for m in trees:
            for j, n in enumerate(tree_ns):
                c = dataclasses.replace(base, method=m, n=n, beam_width=min(beam_width, n),
                                        seed=ps + 100 * (1 + TREES.index(m)) + j,
                                        early_stop=None, budget=None, budget_tokens=None)
                hs[(m, n)] = engine.submit(p.problem, c)
        handles.append(hs)
    t0, total = time.perf_counter(), len(handles)
    while engine.has_work():
        engine.step()
        if progress:
            done = sum(all(h.done() for h in hs.values()) for hs in handles)
            st = engine.stats()
            print(f"\r[calibrate] {done}/{total} problems, {time.perf_counter() - t0:.0f} s, "
                  f"{st['live']:.0f} live, {st['preemptions']:.0f} preemptions", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    records = []
    for p, hs in zip(problems, handles):
        r = hs["samples"].result()
        toks = _generated_per_completion(r)
        smp = [
            {"answer": c.answer, "correct": bool(is_equivalent(c.answer, p.answer)) if c.answer is not None else False,
             "score": float(c.score), "tokens": int(t)}
            for c, t in zip(r.completions, toks)
        ]
        measured: dict[str, dict[int, dict]] = {}
        for m in trees:
            for n in tree_ns:
                tr = hs[(m, n)].result()
                win = next((c for c in tr.completions if c.node_id == tr.answer_node), None)
                measured.setdefault(m, {})[int(n)] = {
                    "correct": bool(is_equivalent(tr.answer, p.answer)) if tr.answer is not None else False,
                    "tokens": int(tr.budget.policy_tokens_generated), "beam_width": min(beam_width, n),
                    "answer": tr.answer, "score": None if win is None or win.score != win.score else float(win.score),
                }
        records.append(ProblemRecord(str(p.id), int(r.budget.policy_tokens_prefilled), smp, measured, p.level))
    return records


def save_records(records: Sequence[ProblemRecord], path: str | Path, append: bool = False) -> Path:
    """One JSON line per record; ``append`` adds them to the end of ``path``."""
    path = Path(path)
    with path.open("a" if append else "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    return path


def load_records(path: str | Path) -> list[ProblemRecord]:
    return [ProblemRecord.from_dict(json.loads(line)) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return out


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="ponder calibrate",
        description="Measure a policy + PRM on calibration problems and fit the strategy table of --methods auto "
                    "(difficulty bins x budget -> method and settings; docs/adaptive.md).")
    p.add_argument("--policy", default="builtin:policy-small", help="policy (default builtin:policy-small)")
    p.add_argument("--prm", default="builtin:prm", help="PRM (default builtin:prm)")
    p.add_argument("--prm-format", default="auto", help="PRM format (default auto: read from the checkpoint)")
    p.add_argument("--dataset", default="builtin:arith-fresh",
                   help="calibration problems (default builtin:arith-fresh: freshly generated, never the held-out set)")
    p.add_argument("--split", default="test", help="split of --dataset (default test)")
    p.add_argument("--limit", type=int, default=None, help="first K problems of --dataset")
    p.add_argument("--per-level", type=int, default=8, help="builtin:arith-fresh problems per level (default 8)")
    p.add_argument("--seed", type=int, default=CALIBRATION_SEED, help="seed of the fresh problems and of the sampling")
    p.add_argument("--budgets", type=_ints, default=[2, 4, 8, 16], help="n-equivalent budgets to precompute plans for")
    p.add_argument("--samples", type=int, default=16, help="solutions sampled per problem (the largest sampling n)")
    p.add_argument("--tree-n", type=_ints, default=[4, 8], help="n of beam search and DVTS to measure (default 4,8)")
    p.add_argument("--trees", default=",".join(TREES),
                   help=f"tree methods to measure at each --tree-n (default {','.join(TREES)}; a method some records "
                        "lack is left out of the fit)")
    p.add_argument("--beam-width", type=int, default=4, help="beam width of beam search and DVTS (default 4)")
    p.add_argument("--probes", type=_ints, default=[1, 2, 4], help="probe sizes to fit (default 1,2,4)")
    p.add_argument("--bins", type=int, default=5, help="difficulty bins (default 5)")
    p.add_argument("--prior", type=float, default=0.0,
                   help="plan with cell accuracies shrunk toward each option's accuracy over all bins, this many pseudo-problems (default 0: none)")
    p.add_argument("--length-bins", type=int, default=1,
                   help="groups of the probe's solution length (mean generated tokens) crossed with the difficulty "
                        "bins (default 1: difficulty only)")
    p.add_argument("--min-gain-se", type=float, default=0.0,
                   help="plan an option only if it beats every cheaper one of its bin by more than this many standard "
                        "errors of the paired difference (default 0: any gain)")
    p.add_argument("--agg", default="last", choices=("last", "min", "prod", "mean"), help="step-score aggregation (default last)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--max-step-tokens", type=int, default=None, help="most tokens per step (default 256; 96 on builtin:arith problems)")
    p.add_argument("--max-steps", type=int, default=None, help="most steps per solution (default 64; 16 on builtin:arith problems)")
    p.add_argument("--kv-budget", type=int, default=65536, help="KV pool of each model in tokens (default 65536)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--from-records", default=None, help="refit from a records file instead of sampling")
    p.add_argument("--chunk", type=int, default=50,
                   help="problems measured together; each chunk's records are appended to the records file when it "
                        "finishes (default 50)")
    p.add_argument("--resume", action="store_true",
                   help="continue a run cut short: keep the problems its records file holds, measure the rest "
                        "(every setting must match the run's)")
    p.add_argument("--out", default="strategy.json", help="where to write the table (default strategy.json; records beside it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def calibration_config(args: argparse.Namespace, problems: Sequence | None) -> SearchConfig:
    """The base config of the calibration searches: ``--max-step-tokens`` / ``--max-steps`` when
    given, else the limits of the built-in task the problems come from (``ponder.toy.task_defaults``:
    found from what the problems are), else ``SearchConfig``'s; num_iterations is that default,
    at most max_steps. ``problems`` None (``--from-records``): no task."""
    from .protocols import SamplingParams
    from .toy import task_defaults

    generic = SearchConfig()
    task = task_defaults(problems) if problems else None
    limits = task or generic
    mst = args.max_step_tokens or (task.max_step_tokens if task else generic.sampling.max_step_tokens)
    steps = args.max_steps or limits.max_steps
    return SearchConfig(beam_width=args.beam_width, num_iterations=min(limits.num_iterations, steps), max_steps=steps,
                        agg=args.agg, sampling=SamplingParams(temperature=args.temperature, max_step_tokens=mst))


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    # before any work: the output's folder exists and takes files (hours of sampling are not
    # lost to a missing folder at the end)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f".{out.name}.writable")
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        print(f"ponder calibrate: cannot write --out {str(out)!r} ({exc.strerror or exc}); pass a writable path",
              file=sys.stderr)
        return 2
    trees = [m for m in args.trees.split(",") if m]
    if not set(trees) <= set(TREES):
        print(f"ponder calibrate: --trees takes methods of {', '.join(TREES)}; got {args.trees!r}", file=sys.stderr)
        return 2
    if args.chunk < 1:
        print(f"ponder calibrate: --chunk must be >= 1; got {args.chunk}", file=sys.stderr)
        return 2
    meta = {"policy": args.policy, "prm": args.prm, "dataset": args.dataset, "seed": args.seed,
            "samples": args.samples, "tree_n": args.tree_n, "beam_width": args.beam_width,
            "temperature": args.temperature}
    if args.from_records:
        records = load_records(args.from_records)
        # the limits the records were sampled with are theirs; recorded when given
        meta.update({k: v for k, v in (("max_step_tokens", args.max_step_tokens), ("max_steps", args.max_steps))
                     if v is not None})
    else:
        if args.dataset == "builtin:arith-fresh":
            problems = fresh_arith(args.per_level, args.seed)
        else:
            from .data import load_problems

            problems = load_problems(args.dataset, split=args.split, limit=args.limit)
        base = calibration_config(args, problems)
        meta.update(max_step_tokens=base.sampling.max_step_tokens, max_steps=base.max_steps)
        if args.dataset == "builtin:arith-fresh":
            meta["per_level"] = args.per_level
        from .hf.policy import HFPolicy
        from .hf.prm import HFPRM
        from .toy.builtin import resolve_model

        meta["trees"] = trees
        rec_path = out.with_name(out.stem + ".records.jsonl")
        settings = {"policy": args.policy, "prm": args.prm, "prm_format": args.prm_format, "dataset": args.dataset,
                    "split": args.split, "limit": args.limit, "per_level": args.per_level, "seed": args.seed,
                    "samples": args.samples, "tree_n": list(args.tree_n), "trees": trees,
                    "beam_width": args.beam_width, "agg": args.agg, "temperature": args.temperature,
                    "max_step_tokens": base.sampling.max_step_tokens, "max_steps": base.max_steps}
        done = _resume_records(rec_path, settings, args.resume)
        if done is None:
            return 2
        # problem i draws from seed + 1000 * i whatever the chunks: a resumed run measures the same
        todo = [(i, p) for i, p in enumerate(problems) if str(p.id) not in done]
        if done:
            print(f"[calibrate] resuming: {len(done)} of {len(problems)} problems already measured", file=sys.stderr)
        t0 = time.perf_counter()
        if todo:
            policy = HFPolicy(resolve_model(args.policy), device=args.device, kv_budget=args.kv_budget)
            prm = HFPRM(resolve_model(args.prm), format=args.prm_format, device=args.device, kv_budget=args.kv_budget)
        for c in range(0, len(todo), args.chunk):
            part = todo[c:c + args.chunk]
            got = collect([p for _, p in part], policy, prm, base, samples=args.samples, tree_ns=args.tree_n,
                          beam_width=args.beam_width, seeds=[args.seed + 1000 * i for i, _ in part], trees=trees)
            save_records(got, rec_path, append=True)
            done.update((r.id, r) for r in got)
            print(f"[calibrate] {len(done)}/{len(problems)} problems saved to {rec_path}", file=sys.stderr)
        meta["collect_s"] = round(time.perf_counter() - t0, 1)
        records = [done[str(p.id)] for p in problems]
        print(f"records: {rec_path}", file=sys.stderr)
    meta["problems"] = len(records)
    table = fit(records, probes=args.probes, bins=args.bins, budgets=args.budgets, beam_width=args.beam_width,
                agg=args.agg, meta=meta, prior=args.prior, length_bins=args.length_bins, min_gain_se=args.min_gain_se)
    table.save(out)
    print(summary(table))
    print(f"wrote {out}")
    return 0


def _resume_records(rec_path: Path, settings: dict, resume: bool) -> dict | None:
    """The records a run already saved (id -> record) and the run's settings file beside
    them. A new run starts an empty records file; an existing one is continued only with
    ``resume`` and the same settings. None (after one line on stderr) when refused."""
    meta_path = rec_path.with_name(rec_path.name + ".settings.json")
    if not rec_path.exists():
        if resume:
            print(f"ponder calibrate: --resume: {rec_path} does not exist; run without --resume", file=sys.stderr)
            return None
        meta_path.write_text(json.dumps(settings, indent=1), encoding="utf-8")
        rec_path.write_text("", encoding="utf-8")
        return {}
    if not resume:
        print(f"ponder calibrate: {rec_path} exists; pass --resume to continue that run, or another --out",
              file=sys.stderr)
        return None
    if not meta_path.exists():
        print(f"ponder calibrate: --resume: {meta_path} is missing, so the records' settings are unknown; "
              "use another --out", file=sys.stderr)
        return None
    old = json.loads(meta_path.read_text(encoding="utf-8"))
    for k, v in settings.items():
        if old.get(k) != v:
            print(f"ponder calibrate: --resume: the run in {rec_path} has {k}={old.get(k)!r}, this one {v!r}; "
                  "resume with the same settings or use another --out", file=sys.stderr)
            return None
    lines = rec_path.read_text(encoding="utf-8").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):  # cut mid-write: that record is measured again
        rec_path.write_text("".join(lines[:-1]), encoding="utf-8")
    return {r.id: r for r in load_records(rec_path)}


def summary(table: StrategyTable) -> str:
    """A few lines: per precomputed budget, the probe, the option of each bin, and the
    calibration accuracy and tokens."""
    lines = ["budget  tokens  probe  accuracy  options per difficulty bin (easy -> hard)"]
    for b, p in sorted(table.plans.items()):
        lines.append(f"{b:>6}  {p['tokens']:>6.0f}  {p['probe']:>5}  {p['accuracy']:>8.3f}  " + ", ".join(p["labels"]))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
