#!/usr/bin/env python
"""Continuous batching: ``ponder.Engine`` against one search per request and static batches.

On the built-in models (``builtin:policy-small`` + ``builtin:prm``, CPU), requests from
``builtin:arith`` with mixed methods (majority, best-of-N, weighted best-of-N, beam search,
DVTS; request i has method i mod 5) and n in {4, 16} ({4, 8} with ``--quick``) arrive as a
Poisson process (``--rate`` requests/s). Served three ways:

* sequential: one ``ponder.search`` call per request, in arrival order;
* static: one ``ponder.search`` call per (method, n) group, as ``ponder run`` batches, each
  starting once its last request has arrived (groups in that order);
* engine: one ``ponder.Engine``; requests are submitted when they arrive and the engine steps.

Time is a virtual clock driven by measured compute: each search call / engine step advances it
by the CPU time it took in this thread (``time.thread_time``; torch runs single-threaded, so
that is all of its compute, and other processes on a shared machine do not inflate it;
``--clock wall`` uses wall time), an idle server jumps to the next arrival. So arrivals never
wait on ``sleep`` and the three are compared on the same arrival times. Latency = finish -
arrival.

Memory: the sequential run records each request's peak KV blocks (policy, PRM) when searched
alone; their sum is what the workload needs at once (every request live together). The engine
runs first with large pools (``--pool-tokens``), then again with pools of a quarter of that need
(``--pool-fraction``; never below the largest request's own peak, which nothing could fit), where admission control and preemption must keep every request from
failing: ``preemptions``, ``resumed`` (preempted requests readmitted with their tree),
``reprefill_tokens`` (tokens the models ran to rebuild them: only what the prefix index had
lost), ``kv_full_errors`` (requests that failed with ``KVCacheFull``) and
``throughput_quarter_pool_over_sequential`` come from that run. ``same_answers``
(``same_answers_quarter_pool``): the fraction of requests whose engine answer (in the quarter
pool) equals their sequential answer (per-request random streams: equal up to
batch-composition numerics).

``--json`` prints one JSON object; ``--quick`` runs a reduced version (under ~60 s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import ponder  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import numpy as np

CLOCK = time.thread_time

METHODS = ["majority", "best_of_n", "weighted_best_of_n", "beam_search", "dvts"]
GOAL_THROUGHPUT = 3.0


def workload(num: int, ns: list[int], rate: float, seed: int):
    """(arrival times, problems, configs): request i has method i mod 5, n = ns[(i // 5) % 2]."""
    from ponder import SamplingParams, SearchConfig
    from ponder.data import load_problems

    problems = load_problems("builtin:arith")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=num))
    arrivals -= arrivals[0]
    picks = [problems[(i * 37) % len(problems)].problem for i in range(num)]
    configs = []
    for i in range(num):
        n = ns[(i // 5) % len(ns)]
        configs.append(
            SearchConfig(method=METHODS[i % 5], n=n, beam_width=4, num_iterations=16, max_steps=16, seed=i,
                         sampling=SamplingParams(max_step_tokens=96))
        )
    return arrivals.tolist(), picks, configs


def set_pool(model, tokens: int) -> None:
    """Give an idle HFPolicy / HFPRM a fresh KV pool of ``tokens`` tokens."""
    from ponder.hf.kv import PagedKVCache

    assert model.stats()["live_nodes"] == 0
    block = model.kv.block_size
    model.kv = PagedKVCache.for_model(model.model, block_size=block, token_budget=tokens)
    if getattr(model, "ref_kv", None) is not None:
        model.ref_kv = model.kv.companion(model.ref_model)


def summarize(name, arrivals, finish, generated, extra=None):
    lat = np.array(finish) - np.array(arrivals)
    span = max(finish) - min(arrivals)
    out = {
        "name": name,
        "requests_per_s": len(arrivals) / span,
        "policy_tokens_per_s": sum(generated) / span,
        "p50_latency_s": float(np.percentile(lat, 50)),
        "p99_latency_s": float(np.percentile(lat, 99)),
        "span_s": span,
    }
    out.update(extra or {})
    return out


class PeakKV:
    """Forwards to a model and records the peak KV blocks in use after each batched call."""

    def __init__(self, inner, calls):
        self.inner, self.peak = inner, 0
        for name in calls:
            setattr(self, name, self._tracked(getattr(inner, name)))

    def _tracked(self, fn):
        def call(*a, **kw):
            out = fn(*a, **kw)
            self.peak = max(self.peak, self.inner.kv.stats()["blocks_in_use"])
            return out
        return call

    def __getattr__(self, name):
        return getattr(self.inner, name)


def run_sequential(policy, prm, arrivals, problems, configs):
    """Also returns each request's peak KV blocks (policy, PRM) when searched alone."""
    import ponder

    pol, rm = PeakKV(policy, ["start", "sample_steps", "rollout"]), PeakKV(prm, ["start", "score_steps"])
    clock, finish, generated, answers, peaks = 0.0, [], [], [], []
    for a, p, c in zip(arrivals, problems, configs):
        clock = max(clock, a)
        pol.peak = rm.peak = 0
        t = CLOCK()
        (r,) = ponder.search([p], pol, rm if c.method != "majority" else None, c)
        clock += CLOCK() - t
        finish.append(clock)
        generated.append(r.budget.policy_tokens_generated)
        answers.append(r.answer)
        peaks.append((pol.peak, rm.peak))
    return summarize("sequential", arrivals, finish, generated), answers, peaks


def run_static(policy, prm, arrivals, problems, configs):
    import ponder

    groups: dict = {}
    for i, c in enumerate(configs):
        groups.setdefault((c.method, c.n), []).append(i)
    order = sorted(groups.values(), key=lambda ids: arrivals[ids[-1]])
    clock, finish, generated = 0.0, [0.0] * len(arrivals), [0] * len(arrivals)
    for ids in order:
        clock = max(clock, arrivals[ids[-1]])
        cfg = configs[ids[0]]
        t = CLOCK()
        rs = ponder.search([problems[i] for i in ids], policy, prm if cfg.method != "majority" else None, cfg)
        clock += CLOCK() - t
        for i, r in zip(ids, rs):
            finish[i] = clock
            generated[i] = r.budget.policy_tokens_generated
    return summarize("static", arrivals, finish, generated, {"batches": len(order)})


def run_engine(policy, prm, arrivals, problems, configs, name="engine"):
    import ponder

    engine = ponder.Engine(policy, prm)
    clock, nxt = 0.0, 0
    handles, finish = [], {}
    peak = {"policy": 0, "prm": 0}
    while nxt < len(arrivals) or engine.has_work():
        if not engine.has_work() and nxt < len(arrivals):
            clock = max(clock, arrivals[nxt])
        while nxt < len(arrivals) and arrivals[nxt] <= clock:
            handles.append(engine.submit(problems[nxt], configs[nxt]))
            nxt += 1
        t = CLOCK()
        engine.step()
        clock += CLOCK() - t
        for h in handles:
            if h.done() and h.id not in finish:
                finish[h.id] = clock
        peak["policy"] = max(peak["policy"], policy.kv.stats()["blocks_in_use"])
        peak["prm"] = max(peak["prm"], prm.kv.stats()["blocks_in_use"])
        peak["live"] = max(peak.get("live", 0), engine.stats()["live"])
    errors = [h for h in handles if h._error is not None]
    kv_full = sum(1 for h in errors if isinstance(h._error, ponder.KVCacheFull))
    if len(errors) > kv_full:
        raise errors[0]._error
    ok = [h for h in handles if h._error is None]
    st = engine.stats()
    generated = [h.result().budget.policy_tokens_generated if h._error is None else 0 for h in handles]
    extra = {
        "mean_policy_batch": st["mean_policy_batch"],
        "mean_prm_batch": st["mean_prm_batch"],
        "steps": st["steps"],
        "preemptions": st["preemptions"],
        "resumed": st["resumed"],
        "reprefill_tokens": st["tokens_reprefilled"],
        "kv_full_errors": kv_full,
        "peak_policy_blocks": peak["policy"],
        "peak_prm_blocks": peak["prm"],
        "peak_live_requests": peak["live"],
    }
    answers = [h.result().answer if h._error is None else None for h in handles]
    assert len(ok) + len(errors) == len(handles)
    return summarize(name, arrivals, [finish[h.id] for h in handles], generated, extra), answers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 requests, n in {4, 8}")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--requests", type=int, default=None, help="number of requests (default 64; quick 16)")
    ap.add_argument("--rate", type=float, default=200.0, help="Poisson arrival rate, requests/s (default 200)")
    ap.add_argument("--pool-fraction", type=float, default=0.25, help="small pool / peak need (default 0.25)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="what advances the virtual clock (default cpu: this thread's CPU time)")
    ap.add_argument("--pool-tokens", type=int, default=40960, help="KV pool of each model in the large-pool runs (default 40960 tokens: 64 requests at once fit)")
    args = ap.parse_args(argv)

    import torch

    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    import ponder
    from ponder.toy.builtin import resolve_model

    num = args.requests or (16 if args.quick else 64)
    ns = [4, 8] if args.quick else [4, 16]
    arrivals, problems, configs = workload(num, ns, args.rate, seed=0)
    big = args.pool_tokens
    t0 = time.perf_counter()
    policy = ponder.HFPolicy(resolve_model("builtin:policy-small"), kv_budget=big)
    prm = ponder.HFPRM(resolve_model("builtin:prm"), kv_budget=big)
    load_s = time.perf_counter() - t0

    seq, seq_answers, peaks = run_sequential(policy, prm, arrivals, problems, configs)
    static = run_static(policy, prm, arrivals, problems, configs)
    eng, eng_answers = run_engine(policy, prm, arrivals, problems, configs)
    # what the workload needs at once: every request live together, each at its own peak
    need = {"policy": sum(p for p, _ in peaks), "prm": sum(r for _, r in peaks)}
    largest = {"policy": max(p for p, _ in peaks), "prm": max(r for _, r in peaks)}
    # a quarter of the need at once, but never below the largest request's own peak: a request
    # that alone does not fit fails whatever the engine does (with best-of-N scored once per
    # solution the PRM's need at once can fall below 4x its largest request)
    small = {k: max(1, int(v * args.pool_fraction), largest[k]) for k, v in need.items()}
    set_pool(policy, small["policy"] * policy.kv.block_size)
    set_pool(prm, small["prm"] * prm.kv.block_size)
    tight, tight_answers = run_engine(policy, prm, arrivals, problems, configs, name="engine_quarter_pool")
    set_pool(policy, big)
    set_pool(prm, big)

    out = {
        "requests": num,
        "ns": ns,
        "rate": args.rate,
        "clock": args.clock,
        "load_s": load_s,
        "runs": [seq, static, eng, tight],
        "throughput_over_sequential": eng["requests_per_s"] / seq["requests_per_s"],
        "throughput_over_static": eng["requests_per_s"] / static["requests_per_s"],
        "p99_latency_s": eng["p99_latency_s"],
        "p99_latency_sequential_s": seq["p99_latency_s"],
        "pool_blocks": small,
        "blocks_needed_at_once": need,
        "largest_request_blocks": largest,
        "preemptions": tight["preemptions"],
        "resumed": tight["resumed"],
        "reprefill_tokens": tight["reprefill_tokens"],
        "kv_full_errors": tight["kv_full_errors"],
        "throughput_quarter_pool_over_sequential": tight["requests_per_s"] / seq["requests_per_s"],
        "same_answers": float(np.mean([a == b for a, b in zip(seq_answers, eng_answers)])),
        "same_answers_quarter_pool": float(np.mean([a == b for a, b in zip(seq_answers, tight_answers)])),
        "goal_throughput_over_sequential": GOAL_THROUGHPUT,
    }
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{num} requests, n in {ns}, Poisson rate {args.rate}/s; models loaded in {load_s:.1f} s")
    cols = ["requests_per_s", "policy_tokens_per_s", "p50_latency_s", "p99_latency_s", "mean_policy_batch", "mean_prm_batch", "preemptions",
            "reprefill_tokens", "kv_full_errors"]
    print("| run | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in out["runs"]:
        cells = [f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")
    print(f"throughput over sequential: {out['throughput_over_sequential']:.2f}x (goal >= {GOAL_THROUGHPUT}x); "
          f"over static: {out['throughput_over_static']:.2f}x")
    print(f"p99 latency: engine {out['p99_latency_s']:.2f} s, sequential {out['p99_latency_sequential_s']:.2f} s")
    print(f"quarter pool ({small} blocks of {need} needed at once; largest request {largest}): {out['preemptions']} preemptions "
          f"({out['resumed']} resumed with their tree, {out['reprefill_tokens']} tokens re-prefilled), "
          f"{out['kv_full_errors']} KVCacheFull errors, {out['throughput_quarter_pool_over_sequential']:.2f}x sequential; "
          f"same answers as sequential: {out['same_answers']:.0%} (quarter pool {out['same_answers_quarter_pool']:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
