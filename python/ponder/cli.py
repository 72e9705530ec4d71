"""The ponder command line.

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
import warnings

from .toy import arith as _arith


def _info(_args: argparse.Namespace) -> int:
    from . import _core, build_info, cuda_available

    info = dict(build_info())
    info["cuda_status"] = dict(_core.cuda_status())
    info["cuda_available"] = cuda_available()
    print(json.dumps(info, indent=2))
    return 0


def _bench_core(args: argparse.Namespace) -> int:
    """`ponder bench core`: benchmarks/control_plane.py of the source checkout ponder is
    installed from (editable); an installed wheel has no benchmarks/ and says so (exit 2)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "control_plane.py"
    if not path.is_file():
        if {"-h", "--help"} & set(args.rest):
            print("usage: ponder bench core [options]\n\nThe control-plane benchmark (C++ core vs the "
                  "pure-Python twin) runs from a source checkout\n(benchmarks/control_plane.py); this ponder "
                  "is installed without one: run\npython benchmarks/bench_core.py --help in a checkout.")
            return 0
        print("ponder bench core: the benchmark is not part of an installed ponder; "
              "run python benchmarks/bench_core.py in a source checkout", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("control_plane", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("control_plane", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.main(args.rest, prog="ponder bench core")


DEFAULT_POLICY = "builtin:policy-small"
DEFAULT_REFERENCE = "builtin:policy-large"
DEFAULT_PRM = "builtin:prm"
DEFAULT_DATASET = "builtin:arith"
DEFAULT_METHODS = "greedy,majority,best_of_n,weighted_best_of_n,beam_search,dvts"
DEFAULT_NS = "1,4,16"
#: the default slice of builtin:arith in an evaluation (its task's default: ponder.toy.task_defaults)
DEFAULT_PER_LEVEL = _arith.DEFAULT_PER_LEVEL
# KV pool of each model when --kv-budget is not given: the workload (problems per search call x
# the largest n x the longest path: prompt + max_steps x max_step_tokens), at most this many
# tokens (the engine admits a batch's searches as the pool frees blocks)
KV_POOL_CAP = 32768
#: what the built-in policies were trained on (builtin:arith's problems)


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
finishes; OUT/run.json records what defines the rows (dataset and its content hash, models
and their hashes or hub commits, every search setting, ponder version). --resume completes
a killed (or Ctrl-C'd) run without repeating finished rows, and refuses a run.json that
differs, naming the setting. At the end
OUT/summary.csv, OUT/summary.md and OUT/scaling.png (accuracy vs n, accuracy vs tokens) are
written and the summary table printed.

Methods: greedy (one completion at temperature 0, run once as n=1), majority,
best_of_n, weighted_best_of_n, beam_search, dvts, particle_filtering, rebase, auto.
greedy and majority need no PRM.
--reference-policy adds a second policy's greedy accuracy to the table (rows labelled with
that policy). The control-plane benchmark is: ponder bench core.
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
    from .methods.config import AGGREGATIONS, VOTES, SearchConfig

    p = _RunParser(prog="ponder run", description=RUN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = p.add_argument_group("models")
    models.add_argument("--policy", metavar="PATH", default=DEFAULT_POLICY,
                        help=f"policy: local directory, Hugging Face hub id (owner/name) or builtin:<name> (default {DEFAULT_POLICY})")
    models.add_argument("--policy-url", metavar="URL", default=None,
                        help="sample the policy on this OpenAI-compatible server (vLLM, SGLang, ponder serve), e.g. "
                             "http://127.0.0.1:8000/v1; --policy is then the model name it serves (docs/remote_policy.md)")
    models.add_argument("--policy-tokenizer", metavar="PATH", default=None,
                        help="with --policy-url: the policy's tokenizer (local directory or hub id) for its chat template "
                             "(default: --policy, when that is a local directory or builtin:<name>)")
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
    models.add_argument("--device", default=None,
                        help="torch device of the models: cpu, cuda, cuda:N, mps (default: cuda when torch sees a GPU, else cpu)")
    models.add_argument("--dtype", default=None,
                        help="model dtype, e.g. float32, bfloat16 (default: float32 on CPU, bfloat16 on a GPU)")
    models.add_argument("--kv-budget", type=int, default=None, metavar="TOKENS",
                        help="KV-cache pool of each model in tokens (default: sized from the workload, problems per "
                             f"batch x largest n x longest path, at most {KV_POOL_CAP}); a batch's searches are admitted as the pool frees blocks")

    data = p.add_argument_group("dataset")
    data.add_argument("--dataset", metavar="SRC", default=DEFAULT_DATASET,
                      help=f"a .jsonl/.json/.parquet file, a save_to_disk directory, a hub dataset id or builtin:<name> (default {DEFAULT_DATASET})")
    data.add_argument("--split", default="test", help="split of a hub dataset / DatasetDict (default test)")
    data.add_argument("--dataset-config", default=None, help="configuration name of a hub dataset")
    data.add_argument("--problem-field", default="problem", help="field with the question (default problem)")
    data.add_argument("--answer-field", default="answer", help="field with the reference answer (default answer)")
    data.add_argument("--answer-from-solution", action="store_true",
                      help="the answer field is a full solution: grade against its last boxed answer")
    data.add_argument("--level-field", default="level", help="field with the difficulty level, optional (default level)")
    data.add_argument("--id-field", default=None,
                      help="field with a unique id (default: the dataset's own, the first of "
                           "unique_id, id, problem_id, question_id, task_id, uid, idx that every row has; else the row number)")
    data.add_argument("--limit", type=int, metavar="K",
                      help=f"evaluate only the first K problems ({DEFAULT_DATASET}: K spread over its levels)")
    data.add_argument("--per-level", type=int, metavar="K",
                      help=f"evaluate only the first K problems of each level (default for {DEFAULT_DATASET}: {DEFAULT_PER_LEVEL})")
    data.add_argument("--full", action="store_true", help=f"the whole dataset (no default slice of {DEFAULT_DATASET})")

    search = p.add_argument_group("search")
    search.add_argument("--methods", type=_csv, default=_csv(DEFAULT_METHODS), metavar="M1,M2",
                        help="comma-separated methods: greedy, majority, best_of_n, weighted_best_of_n, beam_search, dvts, "
                             "particle_filtering, rebase, "
                             "auto (per-problem choice within the budget n) (default all but auto)")
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
    search.add_argument("--budget", type=_csv_ints, default=None, metavar="B1,B2",
                        help="n-equivalent budgets of --methods auto (they replace --n: every method runs at each)")
    search.add_argument("--budget-tokens", type=float, default=None, metavar="T",
                        help="auto: mean policy tokens per problem instead of an n-equivalent (docs/adaptive.md)")
    search.add_argument("--strategy", default=None, metavar="PATH",
                        help="auto: a strategy.json fit by ponder calibrate (default: the built-in models' table)")
    search.add_argument("--compat-search-and-learn", action="store_true", help="reproduce search-and-learn where ponder deliberately differs")
    es = p.add_argument_group("early stopping of majority / best_of_n / weighted_best_of_n (docs/adaptive.md)")
    es.add_argument("--early-stop", type=float, default=None, metavar="P",
                    help="sample in rounds and stop once the vote's leader holds with posterior probability P in "
                         "(0.5, 1] (n is the cap; default off)")
    es.add_argument("--round-size", type=int, default=None, metavar="R", help="samples per round (default 4)")
    es.add_argument("--futility", type=float, default=None, metavar="EPS",
                    help="also stop once the remaining samples settle the vote with probability <= EPS (default off)")
    es.add_argument("--futility-score", type=float, default=None, metavar="S",
                    help="futility stops only while the PRM scores every completion below S (majority then needs --prm)")

    pf = p.add_argument_group("particle filtering / REBASE (docs/methods_pf_rebase.md)")
    d = SearchConfig()
    pf.add_argument("--pf-temperature", type=float, default=d.pf_temperature, metavar="T",
                    help=f"particle_filtering: temperature T > 0 of the particle weights (default {d.pf_temperature:g})")
    pf.add_argument("--pf-weights", default=d.pf_weights, metavar="W",
                    help="particle_filtering: logit (softmax(logit(score) / T): the odds r / (1 - r) at T=1, its_hub's), "
                         "softmax (of score / T) or raw (the aggregated scores themselves, >= 0) "
                         f"(default {d.pf_weights})")
    pf.add_argument("--pf-finished", default=d.pf_finished, metavar="F",
                    help="particle_filtering: resample (finished particles are resampled with the others, its_hub's) "
                         f"or keep (kept as completions, never resampled) (default {d.pf_finished})")
    pf.add_argument("--pf-resampling", default=d.pf_resampling, metavar="R",
                    help=f"particle_filtering: multinomial or systematic resampling (default {d.pf_resampling})")
    pf.add_argument("--pf-ess-threshold", type=float, default=d.pf_ess_threshold, metavar="E",
                    help="particle_filtering: resample when the effective sample size is below E x particles, E in "
                         f"[0, 1] (1: at every step, its_hub's; 0: never) (default {d.pf_ess_threshold:g})")
    pf.add_argument("--rebase-temperature", type=float, default=d.rebase_temperature, metavar="T",
                    help=f"rebase: children per node proportional to softmax(score / T), T > 0 (default {d.rebase_temperature:g})")
    pf.add_argument("--rebase-allocation", default=d.rebase_allocation, metavar="A",
                    help="rebase: rounding of the children counts: ceil (best first, each the ceiling of its share of "
                         f"what is left, the released code's) or proportional (largest remainder) (default {d.rebase_allocation})")

    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", default=None, help="output directory (default runs/<timestamp>)")
    out.add_argument("--resume", action="store_true", help="complete the run in --out, skipping finished rows")
    out.add_argument("--batch-size", type=int, default=16, help="problems per search call (default 16)")
    out.add_argument("--no-progress", action="store_true", help="no progress bars (model loading included)")

    dist = p.add_argument_group("Ray (docs/ray.md)")
    dist.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                      help="search the batches on a Ray cluster: ADDRESS (auto, host:port, ray://host:10001), or none given: "
                           "RAY_ADDRESS, else a new local cluster; needs pip install \"ponder[ray]\"")
    dist.add_argument("--workers", type=int, default=2, metavar="K", help="with --ray: worker actors, each loads the models once (default 2)")
    dist.add_argument("--gpus-per-worker", type=float, default=0, metavar="G", help="with --ray: GPUs per worker (default 0; above 0 the models run on cuda)")
    dist.add_argument("--cpus-per-worker", type=int, default=None, metavar="C",
                      help="with --ray: CPUs per worker, also its torch threads (default: the cluster's CPUs / K)")
    return p


def _plausible_model_ref(ref: str) -> bool:
    import os
    import re

    if os.path.exists(os.path.expanduser(ref)):
        return True
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", ref) is not None


def _build_policy(path: str, device: str, dtype: str | None, kv_budget: int | None = None):
    from .hf.policy import HFPolicy

    return HFPolicy(path, device=device, dtype=dtype, kv_budget=kv_budget)


def _build_remote_policy(args: argparse.Namespace):
    """--policy-url: ``OpenAIPolicy`` on that server, serving the model named --policy."""
    from .openai_policy import OpenAIPolicy

    return OpenAIPolicy(args.policy_url, args.policy, tokenizer=args.policy_tokenizer)


def _build_prm(path: str, fmt: str, device: str, dtype: str | None, kv_budget: int | None = None,
               reference: str | None = None, beta: float | None = None):
    from .hf.prm import HFPRM

    return HFPRM(path, format=fmt, device=device, dtype=dtype, kv_budget=kv_budget, reference=reference, beta=beta)


def _kv_budget(args: argparse.Namespace, problems: list, n: int, base) -> int:
    """--kv-budget, else the workload: problems per search call x ``n`` paths x the longest
    path (a prompt bound, its characters plus a chat template's 64 tokens, plus the base
    config's max_steps x max_step_tokens), at most KV_POOL_CAP tokens."""
    if args.kv_budget is not None:
        return args.kv_budget
    longest = max(len(p.problem) for p in problems) + 64 + base.max_steps * base.sampling.max_step_tokens
    return min(KV_POOL_CAP, min(args.batch_size, len(problems)) * n * longest)


class _Refused(Exception):
    """A mistake in the command line found while running: one line for the user, exit 2."""


def _fail(message: str) -> int:
    print(f"ponder run: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _run(rest: list[str]) -> int:
    """`ponder run`: parse, then evaluate (every option has a default: the built-in run)."""
    try:
        args = build_run_parser().parse_args(rest)
    except SystemExit as exc:
        return int(exc.code or 0)
    args.out_dir = None
    try:
        return _evaluate(args)
    except _Refused as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        where = f"; rerun with --resume --out {args.out_dir}" if args.out_dir is not None else ""
        print(f"\nponder run: interrupted{where}", file=sys.stderr)
        return 130


def _resolve_models(args: argparse.Namespace, needs_prm: bool) -> str | None:
    """Turn builtin:<name> model references into the shipped folders and check the others
    look like paths or hub ids; returns an error message or None."""
    from .toy.builtin import resolve_model

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
        if attr == "policy" and args.policy_url:  # the name the server serves: no local model to check
            args.labels[attr] = ref
            setattr(args, attr, path)
            continue
        if not _plausible_model_ref(path):
            return f"{flag} {ref!r}: no such local path, and not a Hugging Face hub id (owner/name)"
        problem = _model_source_problem(flag, ref, path)
        if problem:
            return problem
        args.labels[attr] = ref
        setattr(args, attr, path)
    return None


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json", ".gguf")
_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model"}


def _model_source_problem(flag: str, ref: str, path: str) -> str | None:
    """Why ``path`` cannot be loaded as the model of ``flag``, found without loading it: a
    directory without config.json / weights / tokenizer, or a hub id that is not in the local
    cache while HF_HUB_OFFLINE is set; None when nothing is wrong yet."""
    import os

    from .evaluation import model_revision
    from .hf._loading import _offline

    local = os.path.expanduser(path)
    if os.path.isdir(local):
        names = {n for n in os.listdir(local) if os.path.isfile(os.path.join(local, n))}
        missing = []
        if "config.json" not in names:
            missing.append("config.json")
        if not any(n.endswith(_WEIGHT_SUFFIXES) for n in names):
            missing.append("weights (*.safetensors or pytorch_model.bin)")
        if not names & _TOKENIZER_FILES:
            missing.append("tokenizer files (tokenizer.json / tokenizer_config.json)")
        if missing:
            return (f"{flag} {ref}: {local} is not a Hugging Face model directory: it has no {', no '.join(missing)}; "
                    f"pass a directory written by save_pretrained (model and tokenizer) or a hub id")
        return None
    if os.path.exists(local):
        return f"{flag} {ref}: {local} is a file, not a model directory or a hub id"
    if _offline() and model_revision(path) is None:
        return (f"{flag} {ref}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it first "
                f"(huggingface-cli download {ref}) or pass a local directory")
    return None


def _load(flag: str, ref: str, build):
    """``build()``, with a failure to load the model of ``flag`` as a one-line _Refused."""
    try:
        return build()
    except (OSError, ValueError, ImportError) as exc:
        text = " ".join(str(exc).split())
        offline = ("couldn't connect", "offline", "outgoing traffic has been disabled", "connection error",
                   "max retries exceeded", "name resolution", "network is unreachable")
        if any(k in text.lower() for k in offline) and not _is_local(ref):
            raise _Refused(f"{flag} {ref}: could not download it (no network, or the hub cannot be reached) and it "
                           f"is not in the local Hugging Face cache; download it first (huggingface-cli download "
                           f"{ref}) or pass a local directory") from None
        raise _Refused(f"{flag} {ref}: could not load the model: {text[:400]}") from None


def _is_local(ref: str) -> bool:
    import os

    return ref.startswith("builtin:") or os.path.exists(os.path.expanduser(ref))


def _check_device(args: argparse.Namespace) -> str | None:
    """Resolve --device (default: cuda when torch sees a GPU, else cpu) and --dtype; an error
    message for a device this torch cannot use or an unknown dtype."""
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        return f"--device {args.device!r} is not a device; use cpu, cuda, cuda:N or mps"
    if device.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            return (f"--device {args.device}: this torch ({torch.__version__}) is built without CUDA; install a CUDA "
                    f"build of torch (see pytorch.org/get-started) or use --device cpu")
        if not torch.cuda.is_available():
            return (f"--device {args.device}: torch sees no CUDA GPU (check the driver with nvidia-smi and "
                    f"CUDA_VISIBLE_DEVICES) or use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)"
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            return f"--device {args.device}: MPS is not available in this torch / on this machine; use --device cpu"
    elif device.type != "cpu":
        return f"--device {args.device}: ponder runs models on cpu, cuda or mps, not {device.type}"
    if args.dtype is not None and not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        return f"--dtype {args.dtype!r} is not a torch dtype; use float32, bfloat16 or float16"
    return None


def _check_out(out_dir) -> str | None:
    """Create ``out_dir`` and check that a file can be written there; an error message or None."""
    import tempfile

    if out_dir.exists() and not out_dir.is_dir():
        return f"--out {out_dir} exists and is not a directory; choose a directory"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        return f"--out {out_dir}: cannot write there ({exc.strerror or exc}); choose a writable directory"
    return None


def _quiet_loading() -> None:
    """No download / weight-loading progress bars (transformers, huggingface_hub)."""
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def _warn_builtin_policy(args: argparse.Namespace, problems: list) -> None:
    """Once: a built-in policy on problems not of the form it was trained on."""
    from .toy.builtin import unlike_builtin_problems

    builtin = [args.labels[a] for a in ("policy", "reference_policy") if str(args.labels.get(a, "")).startswith("builtin:")]
    if not builtin:
        return
    odd = unlike_builtin_problems([p.problem for p in problems])
    if odd:  # said here with the CLI's options; HFPolicy's own warning would repeat it
        warnings.filterwarnings("ignore", message="HFPolicy: the built-in policy only understands")
        print(f"ponder run: warning: {builtin[0]} only understands problems of the form \"Compute <expression>.\" "
              f"({DEFAULT_DATASET}); {len(odd)} of {len(problems)} problems of --dataset {args.dataset} are not "
              f"(e.g. {odd[0][:60]!r}), so expect accuracy near 0; pass your own --policy / --prm",
              file=sys.stderr)


def _model_record(ref: str | None, path: str | None, **known) -> dict:
    """A model's manifest entry: its reference as given, its revision (content hash or hub
    commit) when known, and ``known`` settings that are not None (unknown ones are left out,
    so run.json keeps what an earlier run knew)."""
    from .evaluation import model_revision

    revision = model_revision(path)
    record = {"ref": ref} if revision is None else {"ref": ref, "revision": revision}
    return {**record, **{k: v for k, v in known.items() if v is not None}}


def _loaded_path(model) -> str | None:
    return getattr(getattr(model, "model", None), "name_or_path", None) or None


def _validate(args: argparse.Namespace) -> None:
    """The options that belong to the command line alone (the dataset's and the evaluation's
    are checked by ``DatasetSpec.validate`` / ``EvalConfig.validate``); raises _Refused."""
    if args.resume and not args.out:
        raise _Refused("--resume needs --out DIR (the directory of the run to complete)")
    if args.kv_budget is not None and args.kv_budget < 1:
        raise _Refused(f"--kv-budget must be >= 1; got {args.kv_budget}")
    if args.early_stop is None:
        given = [f for f, v in (("--round-size", args.round_size), ("--futility", args.futility),
                                ("--futility-score", args.futility_score)) if v is not None]
        if given:
            raise _Refused(f"{given[0]} sets how early stopping works: add --early-stop P (e.g. --early-stop 0.95)")
    else:
        if not 0.5 < args.early_stop <= 1.0:
            raise _Refused(f"--early-stop must be a probability in (0.5, 1] (e.g. 0.95); got {args.early_stop}")
        if args.futility is not None and not 0.0 < args.futility < 1.0:
            raise _Refused(f"--futility must be a probability in (0, 1) (e.g. 0.25); got {args.futility}")
        if args.futility_score is not None and args.futility is None:
            raise _Refused("--futility-score gates the futility rule: add --futility EPS (e.g. --futility 0.25)")
    if args.ray is not None:  # Ray installed, --workers etc. (python/ponder/distributed.py)
        from .distributed import check_cli_args

        error = check_cli_args(args)
        if error:
            raise _Refused(error)


def option_names() -> dict[str, str]:
    """The `ponder run` option of each field ``DatasetSpec`` / ``EvalConfig`` / ``SearchConfig``
    name in their messages (``ponder.evaluation.rename_fields``)."""
    names = {a.dest: a.option_strings[-1] for a in build_run_parser()._actions if a.option_strings and a.dest != "help"}
    names.pop("n")  # "n=6" in a message is a budget, not the option
    names.update({"early_stop.futility_score": "--futility-score", "early_stop.round_size": "--round-size",
                  "ns": "--n", "source": "--dataset", "config": "--dataset-config", "prm": "--prm PATH",
                  "sampling.max_step_tokens": "--max-step-tokens", "sampling.temperature": "--temperature",
                  "sampling.top_p": "--top-p"})
    return names


def _dataset_spec(args: argparse.Namespace):
    from .evaluation import DatasetSpec

    return DatasetSpec(
        source=args.dataset, split=args.split, config=args.dataset_config, problem_field=args.problem_field,
        answer_field=args.answer_field, level_field=args.level_field, id_field=args.id_field,
        answer_from_solution=args.answer_from_solution, limit=args.limit, per_level=args.per_level, full=args.full)


def _eval_config(args: argparse.Namespace, problems: list):
    """The ``EvalConfig`` of the options; a limit not given is the built-in task's
    (``ponder.toy.task_defaults``: found from what the problems are), else ``SearchConfig``'s."""
    from .evaluation import EvalConfig
    from .methods import SearchConfig
    from .protocols import SamplingParams
    from .toy import task_defaults

    generic = SearchConfig()
    task = task_defaults(problems)
    limits = {"num_iterations": generic.num_iterations, "max_steps": generic.max_steps,
              "max_step_tokens": generic.sampling.max_step_tokens}
    if task is not None:
        limits = {name: getattr(task, name) for name in limits}
    limits.update({name: getattr(args, name) for name in limits if getattr(args, name) is not None})
    base = SearchConfig(
        method="majority", n=1, beam_width=args.beam_width, num_iterations=limits["num_iterations"],
        lookahead=args.lookahead, agg=args.agg, vote=args.vote, seed=args.seed, max_steps=limits["max_steps"],
        compat_search_and_learn=args.compat_search_and_learn,
        sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p, max_step_tokens=limits["max_step_tokens"]),
        budget_tokens=args.budget_tokens, strategy=args.strategy,
        pf_temperature=args.pf_temperature, pf_weights=args.pf_weights, pf_resampling=args.pf_resampling,
        pf_ess_threshold=args.pf_ess_threshold, pf_finished=args.pf_finished, rebase_temperature=args.rebase_temperature,
        rebase_allocation=args.rebase_allocation, early_stop=_early_stop(args),
    )
    ns = sorted(set(args.budget or args.n))  # dynamic compute: budgets are n-equivalents
    return EvalConfig(methods=list(dict.fromkeys(args.methods)), ns=ns, base_config=base, batch_size=args.batch_size)


def _early_stop(args: argparse.Namespace):
    """``SearchConfig.early_stop`` of the options (None without --early-stop; checked by
    ``EvalConfig.validate``, whose messages name the options)."""
    if args.early_stop is None:
        return None
    from .methods.stopping import EarlyStop

    return EarlyStop(threshold=args.early_stop, round_size=4 if args.round_size is None else args.round_size,
                     futility=args.futility, futility_score=args.futility_score)


def _prepare(args: argparse.Namespace):
    """Every check of `ponder run` before any model loads, in order: the command line's own
    options, ``DatasetSpec.validate``, the dataset (loaded), ``EvalConfig.validate`` (the one
    check of methods, budgets, beam width, search settings and the PRM), the models' sources
    (not loaded), the device, --out (created and written to). Returns (dataset, problems,
    config, out_dir); a mistake raises _Refused (one line, exit 2)."""
    import time
    from pathlib import Path

    from .evaluation import check_out_dir

    names = option_names()
    _validate(args)
    try:
        dataset = _dataset_spec(args).validate(names=names)
    except ValueError as exc:
        raise _Refused(exc) from None
    try:
        problems = dataset.load()
    except (ValueError, OSError, ConnectionError) as exc:
        raise _Refused(f"--dataset {args.dataset}: {exc}") from None
    if not problems:
        raise _Refused(f"--dataset {args.dataset}: no problems")
    try:
        config = _eval_config(args, problems).validate(has_prm=bool(args.prm), names=names)
    except ValueError as exc:
        raise _Refused(exc) from None
    error = _resolve_models(args, config.needs_prm) or _check_device(args)
    if error:
        raise _Refused(error)
    out_dir = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    try:
        check_out_dir(out_dir, args.resume)
    except FileExistsError as exc:
        raise _Refused(exc) from None
    error = _check_out(out_dir)
    if error:
        raise _Refused(error)
    args.out_dir = out_dir  # from here on Ctrl-C says how to resume
    _warn_builtin_policy(args, problems)
    return dataset, problems, config, out_dir


def _evaluate(args: argparse.Namespace) -> int:
    """The body of `ponder run`: the options become a ``DatasetSpec`` and an ``EvalConfig``,
    checked by their ``validate`` (:func:`_prepare`), then one call runs them (:func:`_execute`:
    in this process or, with --ray, on Ray workers) and the summary is written."""
    dataset, problems, config, out_dir = _prepare(args)
    rows = _execute(args, dataset, problems, config, out_dir)
    return _report(rows, out_dir)


def _sections(args: argparse.Namespace, dataset, config) -> dict:
    """The run record's sections besides ``search``: ``dataset``, ``models`` (references and
    what is known of their weights before loading), ``execution``."""
    labels = args.labels
    models: dict = {"dtype": args.dtype or ("float32" if args.device == "cpu" else "bfloat16"),
                    "policy": _model_record(labels["policy"], args.policy, url=args.policy_url)}
    if config.needs_prm:
        models["prm"] = _model_record(labels["prm"], args.prm, format=None if args.prm_format == "auto" else args.prm_format,
                                      beta=args.prm_beta)
        if args.prm_reference is not None:
            models["prm_reference"] = _model_record(labels["prm_reference"], args.prm_reference)
    if args.reference_policy is not None:
        models["reference_policy"] = _model_record(labels["reference_policy"], args.reference_policy)
    execution = {"device": args.device, "batch_size": config.batch_size, "kv_budget": args.kv_budget,
                 "methods": list(dict.fromkeys(config.methods)), "ns": list(config.ns)}
    return {"dataset": dataset.record(), "models": models, "execution": execution}


def _checked_manifest(out_dir, problems, config, sections: dict, resume: bool) -> dict:
    from .evaluation import check_manifest, run_manifest

    try:
        return check_manifest(out_dir, run_manifest(problems, config.base_config, **sections), resume)
    except ValueError as exc:
        raise _Refused(exc) from None


def _execute(args: argparse.Namespace, dataset, problems: list, config, out_dir) -> list[dict]:
    """Record the run (run.json, checked against a resumed run before any model loads), load
    the models, run ``config`` over ``problems`` and then the reference policy's greedy pass;
    returns the rows. --ray: the same on Ray workers (``ponder.distributed.evaluate_cli``)."""
    import dataclasses

    from .evaluation import GREEDY, model_revision, run_evaluation
    from .hf.kv import KVCacheFull

    sections = _sections(args, dataset, config)
    manifest = _checked_manifest(out_dir, problems, config, sections, args.resume)
    if args.no_progress:
        _quiet_loading()
    if args.ray is not None:  # the models load on the Ray workers, which search the batches
        from .distributed import evaluate_cli

        return evaluate_cli(args, problems, config, sections, out_dir)
    labels, models, base = args.labels, sections["models"], config.base_config
    n_max = max(config.ns)
    policy = _load("--policy", labels["policy"],
                   lambda: _build_remote_policy(args) if args.policy_url else
                   _build_policy(args.policy, args.device, args.dtype, kv_budget=_kv_budget(args, problems, n_max, base)))
    prm = None
    if config.needs_prm:
        prm = _load("--prm", labels["prm"], lambda: _build_prm(
            args.prm, args.prm_format, args.device, args.dtype, kv_budget=_kv_budget(args, problems, n_max, base),
            reference=args.prm_reference, beta=args.prm_beta))
        # what the PRM resolved: its format, beta and (implicit PRMs) the reference it reads
        fmt = getattr(prm, "format", None)
        if fmt is not None:
            models["prm"]["format"] = fmt
            models["prm"]["beta"] = getattr(prm, "beta", None)  # None: a PRM format without beta
        ref_model = getattr(prm, "ref_model", None)
        if ref_model is not None:
            path = getattr(ref_model, "name_or_path", None)
            models["prm_reference"] = _model_record(labels.get("prm_reference", "(the PRM's config)"), path)
    revision = model_revision(_loaded_path(policy) or args.policy)
    if revision is not None:  # a hub model's commit, known once it is downloaded
        models["policy"]["revision"] = revision
    # the loaded models (hub commits now cached, the PRM's resolved settings) against run.json
    manifest = _checked_manifest(out_dir, problems, config, sections, True)
    es = config.base_config.early_stop
    stop = "" if es is None else (
        f", early stop of the sampling votes at {es.threshold} in rounds of {es.round_size}"
        + ("" if es.futility is None else f", futility {es.futility}")
        + ("" if es.futility_score is None else f" below PRM score {es.futility_score}"))
    print(f"ponder run: {len(problems)} problems, methods {','.join(config.methods)}, "
          f"n {','.join(map(str, config.ns))}{stop} -> {out_dir}", file=sys.stderr)
    progress = not args.no_progress
    try:
        rows = run_evaluation(problems, policy, prm, config, out_dir=out_dir, resume=args.resume, progress=progress,
                              policy_label=labels["policy"], manifest=manifest)
        if args.reference_policy is not None:
            del policy, prm
            reference = _load("--reference-policy", labels["reference_policy"], lambda: _build_policy(
                args.reference_policy, args.device, args.dtype, kv_budget=_kv_budget(args, problems, 1, base)))
            revision = model_revision(_loaded_path(reference) or args.reference_policy)
            if revision is not None and "revision" not in models["reference_policy"]:
                models["reference_policy"]["revision"] = revision
                manifest = _checked_manifest(out_dir, problems, config, sections, True)
            # the same directory: its rows are told apart by their policy label
            greedy = dataclasses.replace(config, methods=[GREEDY], ns=[1])
            rows += run_evaluation(problems, reference, None, greedy, out_dir=out_dir, resume=True, progress=progress,
                                   policy_label=labels["reference_policy"], manifest=manifest)
    except (ValueError, FileExistsError) as exc:
        raise _Refused(exc) from None
    except KVCacheFull as exc:  # even a single problem did not fit: the message names --kv-budget
        raise _Refused(f"KVCacheFull: {exc}") from None
    return rows


def _report(rows: list, out_dir) -> int:
    """The end of `ponder run`: summary.csv / summary.md / scaling.png, the table, the files."""
    import os

    from .evaluation import MANIFEST_FILE, RESULTS_FILE, markdown_table, plot_scaling, write_summary

    summary = write_summary(rows, out_dir)
    print(markdown_table(summary), end="")
    files = [out_dir / RESULTS_FILE, out_dir / "summary.csv", out_dir / "summary.md"]
    try:
        files.append(plot_scaling(summary, out_dir))
    except ImportError:
        print("ponder run: matplotlib is not installed; no scaling.png (pip install matplotlib)", file=sys.stderr)
    files.append(out_dir / MANIFEST_FILE)
    print("\nwrote " + ", ".join(os.fspath(f) for f in files))
    print(
        "\nOn your own models: ponder run --policy <hub id or dir> --prm <PRM hub id or dir> "
        "--dataset <file.jsonl or hub id> (see: ponder run --help)"
    )
    return 0


def _version() -> str:
    from ._version import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ponder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ponder {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="evaluate search methods on a dataset (see: ponder run --help); "
                         "with no arguments: the built-in models on builtin:arith", add_help=False)
    run.add_argument("rest", nargs=argparse.REMAINDER, help="see: ponder run --help")
    run.set_defaults(func=lambda a: _run(a.rest))

    bench = sub.add_parser("bench", help="benchmarks (ponder bench core)", description="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="which")
    core = bench_sub.add_parser("core", help="control plane: C++ core vs pure-Python reference", add_help=False)
    core.add_argument("rest", nargs=argparse.REMAINDER, help="see: ponder bench core --help")
    core.set_defaults(func=_bench_core)
    bench.set_defaults(func=lambda _a: _print_help(bench))

    toy = sub.add_parser("toy", help="the built-in task and models (ponder toy train)",
                         description="The built-in task (builtin:arith) and its models.")
    toy_sub = toy.add_subparsers(dest="which")
    train = toy_sub.add_parser("train", help="retrain the built-in models from a seed (see: ponder toy train --help)",
                               add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(func=_toy_train)
    toy.set_defaults(func=lambda _a: _print_help(toy))

    serve = sub.add_parser("serve", help="OpenAI-compatible server with test-time search (see: ponder serve --help)",
                           add_help=False)
    serve.add_argument("rest", nargs=argparse.REMAINDER, help="see: ponder serve --help")

    calibrate = sub.add_parser("calibrate", help="fit a strategy table for --methods auto (see: ponder calibrate --help)",
                               add_help=False)
    calibrate.add_argument("rest", nargs=argparse.REMAINDER, help="see: ponder calibrate --help")

    info = sub.add_parser("info", help="build and CUDA information as JSON")
    info.set_defaults(func=_info)
    return parser


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``ponder`` command: returns the exit status (0 done, 2 a mistake in the command
    line, one line on stderr; 130 interrupted with Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # `run`, `bench core` and `toy train` hand every later option to their own parser.
        if argv[:1] == ["run"]:
            return _run(argv[1:])
        if argv[:2] == ["bench", "core"]:
            return _bench_core(argparse.Namespace(rest=argv[2:]))
        if argv[:2] == ["toy", "train"]:
            return _toy_train(argparse.Namespace(rest=argv[2:]))
        if argv[:1] == ["calibrate"]:  # ponder calibrate: python/ponder/calibrate.py
            from .calibrate import main as calibrate_main

            return calibrate_main(argv[1:])
        if argv[:1] == ["serve"]:  # ponder serve: python/ponder/serve/cli.py
            from .serve.cli import main as serve_main

            return serve_main(argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\nponder {' '.join(argv[:2])}: interrupted".replace("  ", " "), file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
