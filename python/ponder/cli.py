"""The ``ponder`` command line.

    ponder run            evaluate search methods on a dataset (accuracy vs test-time compute);
                          with no arguments: the built-in models on builtin:arith, on CPU
    ponder toy train      retrain the built-in models from a seed
    ponder bench core     C++ core vs the pure-Python reference on beam-search/DVTS workloads
    ponder info           what the extension was built with and whether CUDA kernels can run
"""

from __future__ import annotations

import argparse
import json
import sys


def _info(_args: argparse.Namespace) -> int:
    from . import _core, build_info, cuda_available

    info = dict(build_info())
    info["cuda_status"] = dict(_core.cuda_status())
    info["cuda_available"] = cuda_available()
    print(json.dumps(info, indent=2))
    return 0


def _bench_core(args: argparse.Namespace) -> int:
    from .bench import control_plane

    return control_plane.main(args.rest)


DEFAULT_POLICY = "builtin:policy-small"
DEFAULT_REFERENCE = "builtin:policy-large"
DEFAULT_PRM = "builtin:prm"
DEFAULT_DATASET = "builtin:arith"
DEFAULT_METHODS = "greedy,majority,best_of_n,weighted_best_of_n,beam_search,dvts"
DEFAULT_NS = "1,4,16"
DEFAULT_PER_LEVEL = 6  # the default slice of builtin:arith: the first 6 problems of each level
# builtin:arith solutions have at most ~10 steps of at most ~70 tokens: tighter limits stop a
# runaway sample early (the generic limits, 64 steps x 256 tokens, let one path run to 16k tokens)
ARITH_LIMITS = {"num_iterations": 16, "max_steps": 16, "max_step_tokens": 96}
GENERIC_LIMITS = {"num_iterations": 40, "max_steps": 64, "max_step_tokens": 256}
BUILTIN_KV_BUDGET = 1 << 17  # tokens of KV pool for each built-in model


def _toy_train(args: argparse.Namespace) -> int:
    from .toy import train

    return train.main(args.rest)


RUN_DESCRIPTION = f"""\
Evaluate search methods on a math dataset and write how accuracy scales with test-time compute.

With no arguments it runs the built-in default on CPU with no download: the shipped small
policy ({DEFAULT_POLICY}) searched with the shipped PRM ({DEFAULT_PRM}) on a slice of the
built-in arithmetic benchmark ({DEFAULT_DATASET}, the first {DEFAULT_PER_LEVEL} problems of each
level; --full for all 500), every method at n = {DEFAULT_NS}, next to the greedy accuracy of the
larger shipped policy ({DEFAULT_REFERENCE}). Every option can be given alone; on your models:

    ponder run --policy Qwen/Qwen2.5-1.5B-Instruct --prm RLHFlow/Llama3.1-8B-PRM-Deepseek-Data \\
        --dataset math500.jsonl --methods greedy,majority,best_of_n,dvts --n 1,4,16 --out runs/m500

Every (problem, method, n) becomes one row of OUT/results.jsonl, appended as each batch
finishes; --resume completes a killed run without repeating finished rows. At the end
OUT/summary.csv, OUT/summary.md and OUT/scaling.png (accuracy vs n, accuracy vs tokens) are
written and the summary table printed.

Methods: greedy (one completion at temperature 0, run once as n=1), majority,
best_of_n, weighted_best_of_n, beam_search, dvts. greedy and majority need no PRM.
--reference-policy adds a second policy's greedy accuracy to the table (rows labelled with
that policy). The control-plane benchmark is `ponder bench core`.
"""


class _RunParser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line on stderr (exit code 2)."""

    def error(self, message: str):
        print(f"ponder run: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _csv_ints(value: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def build_run_parser() -> argparse.ArgumentParser:
    """The parser of `ponder run` (the evaluation; see ``RUN_DESCRIPTION``)."""
    from .search.config import AGGREGATIONS, VOTES

    p = _RunParser(prog="ponder run", description=RUN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = p.add_argument_group("models")
    models.add_argument("--policy", metavar="PATH", default=DEFAULT_POLICY,
                        help=f"policy: local directory, Hugging Face hub id (owner/name) or builtin:<name> (default {DEFAULT_POLICY})")
    models.add_argument("--prm", metavar="PATH", default=DEFAULT_PRM,
                        help=f"process reward model: local directory, hub id or builtin:prm (default {DEFAULT_PRM}; unused by greedy/majority)")
    models.add_argument("--reference-policy", metavar="PATH", default=None,
                        help=f"also run greedy with this policy (a bigger model to compare with); 'none' for none "
                             f"(default {DEFAULT_REFERENCE} when --policy is the default, else none)")
    models.add_argument("--prm-format", default="auto",
                        help="PRM input format: auto, math-shepherd, rlhflow, qwen-prm, implicit-prm (default auto)")
    models.add_argument("--prm-reference", metavar="PATH", default=None,
                        help="implicit-prm only: the reference model of the log-likelihood ratio, e.g. "
                             "Qwen/Qwen2.5-Math-7B-Instruct for PRIME-RL/EurusPRM-Stage2 (default: the one the PRM's config names)")
    models.add_argument("--prm-beta", type=float, default=None,
                        help="implicit-prm only: the log-ratio coefficient (default: the PRM's config, else 0.001)")
    models.add_argument("--device", default="cpu", help="torch device of both models (default cpu)")
    models.add_argument("--dtype", default=None, help="model dtype, e.g. float32, bfloat16 (default: float32 on CPU, bf16 else)")
    models.add_argument("--kv-budget", type=int, default=None, metavar="TOKENS",
                        help="KV-cache pool of each model in tokens (default: ponder.kv.DEFAULT_TOKEN_BUDGET, "
                             f"{BUILTIN_KV_BUDGET} for builtin models); a batch that does not fit is searched in halves")

    data = p.add_argument_group("dataset")
    data.add_argument("--dataset", metavar="SRC", default=DEFAULT_DATASET,
                      help=f"a .jsonl/.json/.parquet file, a save_to_disk directory, a hub dataset id or builtin:<name> (default {DEFAULT_DATASET})")
    data.add_argument("--split", default="test", help="split of a hub dataset / DatasetDict (default test)")
    data.add_argument("--dataset-config", default=None, help="configuration name of a hub dataset")
    data.add_argument("--problem-field", default="problem", help="field with the question (default problem)")
    data.add_argument("--answer-field", default="answer", help="field with the reference answer (default answer)")
    data.add_argument("--answer-from-solution", action="store_true", help="the answer field is a full solution: grade against its last \\boxed{}")
    data.add_argument("--level-field", default="level", help="field with the difficulty level, optional (default level)")
    data.add_argument("--id-field", default="unique_id", help="field with a unique id, optional (default unique_id; else the row number)")
    data.add_argument("--limit", type=int, metavar="K", help="evaluate only the first K problems")
    data.add_argument("--per-level", type=int, metavar="K",
                      help=f"evaluate only the first K problems of each level (default for {DEFAULT_DATASET}: {DEFAULT_PER_LEVEL})")
    data.add_argument("--full", action="store_true", help=f"the whole dataset (no default slice of {DEFAULT_DATASET})")

    search = p.add_argument_group("search")
    search.add_argument("--methods", type=_csv, default=_csv(DEFAULT_METHODS), metavar="M1,M2",
                        help="comma-separated methods: greedy, majority, best_of_n, weighted_best_of_n, beam_search, dvts (default all)")
    search.add_argument("--n", type=_csv_ints, default=_csv_ints(DEFAULT_NS), metavar="N1,N2",
                        help=f"comma-separated budgets N, e.g. 1,4,16,64 (default {DEFAULT_NS})")
    search.add_argument("--beam-width", type=int, default=4, metavar="M", help="beam width M of beam_search/dvts (default 4); every n above M must be a multiple of it, an n below M runs one tree n wide")
    search.add_argument("--num-iterations", type=int, default=None, help="search iterations of beam_search/dvts (default 40; 16 on builtin:arith)")
    search.add_argument("--max-steps", type=int, default=None, help="most steps per solution, >= --num-iterations (default 64; 16 on builtin:arith)")
    search.add_argument("--lookahead", type=int, default=0, help="greedy lookahead steps before scoring (beam_search/dvts; default 0)")
    search.add_argument("--agg", choices=AGGREGATIONS, default="last", help="step-score aggregation (default last)")
    search.add_argument("--vote", choices=VOTES, default=None, help="final vote of beam_search/dvts (default weighted)")
    search.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8; greedy uses 0)")
    search.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling top-p (default 1.0)")
    search.add_argument("--max-step-tokens", type=int, default=None, help="most tokens per step (default 256; 96 on builtin:arith)")
    search.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    search.add_argument("--compat-search-and-learn", action="store_true", help="reproduce search-and-learn where ponder deliberately differs")

    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", default=None, help="output directory (default runs/<timestamp>)")
    out.add_argument("--resume", action="store_true", help="complete the run in --out, skipping finished rows")
    out.add_argument("--batch-size", type=int, default=16, help="problems per search call (default 16)")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _plausible_model_ref(ref: str) -> bool:
    import os
    import re

    if os.path.exists(os.path.expanduser(ref)):
        return True
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", ref) is not None


def _build_policy(path: str, device: str, dtype: str | None, kv_budget: int | None = None):
    from .policy import HFPolicy

    return HFPolicy(path, device=device, dtype=dtype, kv_budget=kv_budget)


def _build_prm(path: str, fmt: str, device: str, dtype: str | None, kv_budget: int | None = None,
               reference: str | None = None, beta: float | None = None):
    from .prm import HFPRM

    return HFPRM(path, format=fmt, device=device, dtype=dtype, kv_budget=kv_budget, reference=reference, beta=beta)


def _kv_budget(args: argparse.Namespace, attr: str) -> int | None:
    """--kv-budget, else the library default, except for the built-in models: their KV is a few
    KB per token, so they get BUILTIN_KV_BUDGET and whole batches of 16 x n=16 paths fit."""
    if args.kv_budget is not None:
        return args.kv_budget
    return BUILTIN_KV_BUDGET if str(args.labels.get(attr, "")).startswith("builtin:") else None


def _fail(message: str) -> int:
    print(f"ponder run: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _run(rest: list[str]) -> int:
    """`ponder run`: parse, then evaluate (every option has a default: the built-in run)."""
    try:
        args = build_run_parser().parse_args(rest)
    except SystemExit as exc:
        return int(exc.code or 0)
    return _evaluate(args)


def _resolve_models(args: argparse.Namespace, needs_prm: bool) -> str | None:
    """Turn builtin:<name> model references into the shipped folders and check the others
    look like paths or hub ids; returns an error message or None."""
    from .toy.models import resolve_model

    if args.reference_policy is None:
        args.reference_policy = DEFAULT_REFERENCE if args.policy == DEFAULT_POLICY else "none"
    if args.reference_policy.strip().lower() == "none":
        args.reference_policy = None
    args.labels = {}
    for flag, attr, used in (("--policy", "policy", True), ("--prm", "prm", needs_prm),
                             ("--prm-reference", "prm_reference", needs_prm),
                             ("--reference-policy", "reference_policy", True)):
        ref = getattr(args, attr)
        if ref is None or not used:
            continue
        try:
            path = resolve_model(ref)
        except (ValueError, FileNotFoundError) as exc:
            return f"{flag} {ref}: {exc}"
        if not _plausible_model_ref(path):
            return f"{flag} {ref!r}: no such local path, and not a Hugging Face hub id (owner/name)"
        args.labels[attr] = ref
        setattr(args, attr, path)
    return None


def _slice(problems: list, args: argparse.Namespace) -> list:
    """The default slice of the built-in benchmark (first DEFAULT_PER_LEVEL of each level) or
    --per-level K; --full and --limit keep the dataset as loaded."""
    per_level = args.per_level
    if per_level is None and not args.full and args.limit is None and args.dataset == DEFAULT_DATASET:
        per_level = DEFAULT_PER_LEVEL
    if per_level is None:
        return problems
    kept: list = []
    seen: dict = {}
    for p in problems:
        if seen.get(p.level, 0) < per_level:
            seen[p.level] = seen.get(p.level, 0) + 1
            kept.append(p)
    return kept


def _evaluate(args: argparse.Namespace) -> int:
    import os
    import time
    from pathlib import Path

    from . import evaluate
    from .kv import KVCacheFull
    from .protocols import SamplingParams
    from .search import SearchConfig

    # --- validate everything before any work
    methods = list(dict.fromkeys(args.methods))
    if not methods:
        return _fail("--methods is empty")
    unknown = [m for m in methods if m not in evaluate.METHODS]
    if unknown:
        return _fail(f"unknown method {unknown[0]!r} in --methods; choose from {', '.join(evaluate.METHODS)}")
    ns = sorted(set(args.n))
    if not ns or any(n < 1 for n in ns):
        return _fail(f"--n must list integers >= 1; got {args.n}")
    if args.beam_width < 1:
        return _fail(f"--beam-width must be >= 1; got {args.beam_width}")
    tree = [m for m in methods if m in evaluate.TREE_METHODS]
    if tree:
        bad = [n for n in ns if n > args.beam_width and n % args.beam_width]
        if bad:
            return _fail(
                f"{tree[0]} needs every n above --beam-width {args.beam_width} to be a multiple of it "
                f"(below it the tree is n wide); n={bad[0]} is not: change --n or --beam-width"
            )
    limits = ARITH_LIMITS if args.dataset == DEFAULT_DATASET else GENERIC_LIMITS
    for name, value in limits.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.kv_budget is not None and args.kv_budget < 1:
        return _fail(f"--kv-budget must be >= 1; got {args.kv_budget}")
    for name, value in (("--batch-size", args.batch_size), ("--max-step-tokens", args.max_step_tokens)):
        if value < 1:
            return _fail(f"{name} must be >= 1; got {value}")
    for name, value in (("--limit", args.limit), ("--per-level", args.per_level)):
        if value is not None and value < 1:
            return _fail(f"{name} must be >= 1; got {value}")
    if args.full and (args.limit is not None or args.per_level is not None):
        return _fail("--full evaluates the whole dataset; drop --limit / --per-level (or --full)")
    needs_prm = [m for m in methods if m not in evaluate.PRM_FREE_METHODS]
    if needs_prm and not args.prm:
        return _fail(f"method {needs_prm[0]} needs --prm PATH (only greedy and majority run without a PRM)")
    error = _resolve_models(args, bool(needs_prm))
    if error:
        return _fail(error)
    if not args.dataset:
        return _fail("--dataset SRC must not be empty (a .jsonl/.json/.parquet file, a saved dataset directory, a hub id or builtin:<name>)")
    base = SearchConfig(
        method="majority", n=1, beam_width=args.beam_width, num_iterations=args.num_iterations,
        lookahead=args.lookahead, agg=args.agg, vote=args.vote, seed=args.seed, max_steps=args.max_steps,
        compat_search_and_learn=args.compat_search_and_learn,
        sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p, max_step_tokens=args.max_step_tokens),
    )
    try:
        for method, n in evaluate.plan(methods, ns):
            evaluate.method_config(base, method, n)
    except ValueError as exc:
        return _fail(exc)
    if args.resume and not args.out:
        return _fail("--resume needs --out DIR (the directory of the run to complete)")
    out_dir = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    try:
        evaluate.check_out_dir(out_dir, args.resume)
    except FileExistsError as exc:
        return _fail(exc)
    try:
        from .data import load_problems

        problems = load_problems(
            args.dataset, split=args.split, problem_field=args.problem_field, answer_field=args.answer_field,
            level_field=args.level_field, id_field=args.id_field, limit=args.limit,
            answer_from_solution=args.answer_from_solution, config=args.dataset_config,
        )
    except (ValueError, OSError, ConnectionError) as exc:
        return _fail(f"--dataset {args.dataset}: {exc}")
    problems = _slice(problems, args)
    if not problems:
        return _fail(f"--dataset {args.dataset}: no problems")

    # --- the work
    try:
        policy = _build_policy(args.policy, args.device, args.dtype, kv_budget=_kv_budget(args, "policy"))
        prm = (_build_prm(args.prm, args.prm_format, args.device, args.dtype, kv_budget=_kv_budget(args, "prm"),
                          reference=args.prm_reference, beta=args.prm_beta)
               if needs_prm else None)
    except (OSError, ValueError) as exc:
        print(f"ponder run: error: could not load the models: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(f"ponder run: {len(problems)} problems, methods {','.join(methods)}, n {','.join(map(str, ns))} -> {out_dir}",
          file=sys.stderr)
    common = dict(base_config=base, out_dir=out_dir, batch_size=args.batch_size, progress=not args.no_progress)
    try:
        rows = evaluate.run_evaluation(
            problems, policy, prm, methods=methods, ns=ns, resume=args.resume,
            policy_label=args.labels["policy"], **common,
        )
        if args.reference_policy is not None:
            del policy, prm
            try:
                reference = _build_policy(args.reference_policy, args.device, args.dtype,
                                          kv_budget=_kv_budget(args, "reference_policy"))
            except (OSError, ValueError) as exc:
                print(f"ponder run: error: could not load --reference-policy: {' '.join(str(exc).split())}", file=sys.stderr)
                return 1
            # the same directory: its rows are told apart by their policy label
            rows += evaluate.run_evaluation(
                problems, reference, None, methods=[evaluate.GREEDY], ns=[1], resume=True,
                policy_label=args.labels["reference_policy"], **common,
            )
    except (ValueError, FileExistsError) as exc:
        return _fail(exc)
    except KVCacheFull as exc:  # even a single problem did not fit: the message names --kv-budget
        return _fail(f"KVCacheFull: {exc}")
    summary = evaluate.write_summary(rows, out_dir)
    print(evaluate.markdown_table(summary), end="")
    files = [out_dir / evaluate.RESULTS_FILE, out_dir / "summary.csv", out_dir / "summary.md"]
    try:
        files.append(evaluate.plot_scaling(summary, out_dir))
    except ImportError:
        print("ponder run: matplotlib is not installed; no scaling.png (pip install matplotlib)", file=sys.stderr)
    print("\nwrote " + ", ".join(os.fspath(f) for f in files))
    print(
        "\nOn your own models: ponder run --policy <hub id or dir> --prm <PRM hub id or dir> "
        "--dataset <file.jsonl or hub id> (see `ponder run --help`)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ponder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="evaluate search methods on a dataset (see `ponder run --help`); "
                         "with no arguments: the built-in models on builtin:arith", add_help=False)
    run.add_argument("rest", nargs=argparse.REMAINDER, help="see `ponder run --help`")
    run.set_defaults(func=lambda a: _run(a.rest))

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="which", required=True)
    core = bench_sub.add_parser("core", help="control plane: C++ core vs pure-Python reference", add_help=False)
    core.add_argument("rest", nargs=argparse.REMAINDER, help="see `ponder bench core --help`")
    core.set_defaults(func=_bench_core)

    toy = sub.add_parser("toy", help="the built-in task and models")
    toy_sub = toy.add_subparsers(dest="which", required=True)
    train = toy_sub.add_parser("train", help="retrain the built-in models from a seed (see `ponder toy train --help`)", add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(func=_toy_train)

    info = sub.add_parser("info", help="build and CUDA information as JSON")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `run` and `bench core` hand every later option to the benchmark's own parser.
    if argv[:1] == ["run"]:
        return _run(argv[1:])
    if argv[:2] == ["bench", "core"]:
        return _bench_core(argparse.Namespace(rest=argv[2:]))
    if argv[:2] == ["toy", "train"]:
        return _toy_train(argparse.Namespace(rest=argv[2:]))
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
