"""The ``ponder`` command line.

    ponder run            the main job (for now: the control-plane benchmark, see below)
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


def _run(args: argparse.Namespace) -> int:
    # The search engine (methods over Hugging Face policies and PRMs) is not part of this
    # release yet; until it is, the main job measures the search control plane it will run on.
    from .bench import control_plane

    print(
        "ponder run: the search engine is not in this release yet; running the control-plane "
        "benchmark (C++ core vs pure-Python reference) instead.",
        file=sys.stderr,
    )
    return control_plane.main(args.rest if args.rest else ["--quick"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ponder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the main job (for now: the control-plane benchmark, --quick by default)")
    run.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to `ponder bench core`")
    run.set_defaults(func=_run)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="which", required=True)
    core = bench_sub.add_parser("core", help="control plane: C++ core vs pure-Python reference", add_help=False)
    core.add_argument("rest", nargs=argparse.REMAINDER, help="see `ponder bench core --help`")
    core.set_defaults(func=_bench_core)

    info = sub.add_parser("info", help="build and CUDA information as JSON")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `run` and `bench core` hand every later option to the benchmark's own parser.
    if argv[:1] == ["run"]:
        return _run(argparse.Namespace(rest=argv[1:]))
    if argv[:2] == ["bench", "core"]:
        return _bench_core(argparse.Namespace(rest=argv[2:]))
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
