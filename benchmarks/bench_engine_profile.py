#!/usr/bin/env python
"""Where the engine's time goes: the forward-cost bound and a per-stage profile.

Two parts, both single-threaded CPU on the built-in models (``builtin:policy-small`` +
``builtin:prm``), timed with this thread's CPU time (``time.thread_time``):

* ``bound``: the cost per token of one forward of the policy (decode: 1 new token per row;
  a step prefill: 12) and of the implicit PRM (both models, 12 new tokens per row) at batch
  sizes 1 .. 256 and contexts 64 / 192 tokens. Batching can only gain what the cost per
  token falls between the sequential run's batch (one request: n rows) and the engine's (all
  live searches' rows).
* ``stages``: bench_engine's workload served sequentially (one ``ponder.search`` per request)
  and by the engine, with every model call timed: policy start / sample / rollout / restore,
  PRM start / score_steps / score_paths / restore, and inside them the model forwards and the
  sampling loop's own work; the rest is the engine's and the methods' bookkeeping.

``--json`` prints one JSON object. ``--requests`` (default 64) and ``--quick`` (16 requests,
n in {4, 8}, contexts / batches reduced) as bench_engine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import ponder  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CLOCK = time.thread_time


def _rows(B: int, n: int, salt: int) -> list[list[int]]:
    """B token rows of n ids in 1..100, distinct in their first two tokens (so no KV block is
    shared through the prefix index)."""
    return [([1 + b % 100, 1 + b // 100] + [1 + (b * 7 + i * 3 + salt) % 100 for i in range(n)])[:n] for b in range(B)]


def forward_cost(kv, model, B: int, ctx: int, T: int, reps: int, companion=None) -> float:
    """Best of ``reps``: CPU ms per new token of one forward of B rows, each adding T tokens
    to its own ``ctx``-token sequence (with ``companion`` = (kv, model): both models, as the
    implicit PRM runs them, plus its log-ratio)."""
    import torch

    full = _rows(B, ctx, 0)
    seqs = [kv.new_sequence(row)[0] for row in full]
    with torch.inference_mode():
        for i in range(0, B, 8):
            batch = kv.prepare(seqs[i:i + 8], full[i:i + 8])
            batch.run(model)
            if companion is not None:
                batch.on(companion[0]).run(companion[1])
    best = float("inf")
    try:
        for _ in range(reps):
            forks = [int(kv.fork(s, 1)[0]) for s in seqs]
            t = CLOCK()
            with torch.inference_mode():
                batch = kv.prepare(forks, _rows(B, T, 5))
                out = batch.run(model).logits.float().log_softmax(-1)
                if companion is not None:
                    out -= batch.on(companion[0]).run(companion[1]).logits.float().log_softmax(-1)
            best = min(best, CLOCK() - t)
            kv.free(forks)
    finally:
        kv.free(seqs)
    return best / (B * T) * 1e3


def run_bound(policy, prm, quick: bool) -> dict:
    batches = [1, 4, 16, 64] if quick else [1, 4, 16, 64, 256]
    contexts = [64] if quick else [64, 192]
    reps = 2 if quick else 4
    out: dict = {"batches": batches, "contexts": contexts}
    for name, kv, model, T, comp in (
        ("policy_decode", policy.kv, policy.model, 1, None),
        ("policy_step_prefill", policy.kv, policy.model, 12, None),
        ("prm_step", prm.kv, prm.model, 12, (prm.ref_kv, prm.ref_model) if prm.ref_model is not None else None),
    ):
        out[name] = {str(ctx): {str(B): forward_cost(kv, model, B, ctx, T, reps, comp) for B in batches} for ctx in contexts}
    return out


class Timers:
    """CPU seconds and calls per label; ``wrap`` times a bound method under a label (nested
    labels are timed on their own, not subtracted)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)
        self.rows: dict[str, int] = defaultdict(int)

    def wrap(self, obj, name: str, label: str, rows=None) -> None:
        fn = getattr(obj, name)

        def timed(*a, **kw):
            t = CLOCK()
            try:
                return fn(*a, **kw)
            finally:
                self.t[label] += CLOCK() - t
                self.n[label] += 1
                if rows is not None:
                    self.rows[label] += rows(*a, **kw)

        setattr(obj, name, timed)

    def report(self, total: float) -> dict:
        out = {"total_s": total}
        for k in sorted(self.t):
            out[k] = {"s": self.t[k], "share": self.t[k] / total if total else 0.0, "calls": self.n[k]}
            if self.rows.get(k):
                out[k]["mean_rows"] = self.rows[k] / self.n[k]
        return out


def instrument(policy, prm, timers: Timers) -> None:
    """Time every model call of the policy and the PRM (instance attributes shadow the methods)."""
    for name in ("start", "sample_steps", "sample_steps_seeded", "rollout", "restore"):
        timers.wrap(policy, name, f"policy.{name}")
    for name in ("start", "score_steps", "score_paths", "restore"):
        timers.wrap(prm, name, f"prm.{name}")
    # the forwards inside them (B rows) and the sampling loop's tokenizer work
    timers.wrap(policy, "_forward", "policy.forward", rows=lambda seqs, tokens: len(seqs))
    timers.wrap(prm, "_logratios", "prm.forward (both models)", rows=lambda seqs, rows: len(seqs))
    timers.wrap(policy.tokenizer, "batch_decode", "policy.tokenizer.batch_decode")


def run_stages(policy, prm, args) -> dict:
    import bench_engine

    num = args.requests or (16 if args.quick else 64)
    ns = [4, 8] if args.quick else [4, 16]
    arrivals, problems, configs = bench_engine.workload(num, ns, 200.0, seed=0)
    out = {}
    for name, fn in (("sequential", bench_engine.run_sequential), ("engine", bench_engine.run_engine)):
        timers = Timers()
        saved = {k: v for k, v in vars(policy).items()}, {k: v for k, v in vars(prm).items()}
        tok = policy.tokenizer.batch_decode
        instrument(policy, prm, timers)
        t = CLOCK()
        try:
            res = fn(policy, prm, arrivals, problems, configs)
        finally:
            total = CLOCK() - t
            for obj, before in zip((policy, prm), saved):
                for k in list(vars(obj)):
                    if k not in before:
                        delattr(obj, k)
            policy.tokenizer.batch_decode = tok
        out[name] = timers.report(total)
        out[name]["requests_per_s"] = res[0]["requests_per_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--part", choices=["bound", "stages", "both"], default="both")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import bench_engine
    import ponder
    from ponder.toy.builtin import resolve_model

    # pools for 256 rows of 192 tokens in the bound; bench_engine's large pools for the stages
    policy = ponder.HFPolicy(resolve_model("builtin:policy-small"), kv_budget=1 << 17)
    prm = ponder.HFPRM(resolve_model("builtin:prm"), kv_budget=1 << 17)
    out: dict = {}
    if args.part in ("bound", "both"):
        out["bound_ms_per_token"] = run_bound(policy, prm, args.quick)
    if args.part in ("stages", "both"):
        bench_engine.set_pool(policy, 40960)
        bench_engine.set_pool(prm, 40960)
        out["stages"] = run_stages(policy, prm, args)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    if "bound_ms_per_token" in out:
        b = out["bound_ms_per_token"]
        print("CPU ms per token of one forward (rows = batch):")
        print("| forward | context | " + " | ".join(f"B={x}" for x in b["batches"]) + " |")
        print("|---|---|" + "---|" * len(b["batches"]))
        for name in ("policy_decode", "policy_step_prefill", "prm_step"):
            for ctx, row in b[name].items():
                print(f"| {name} | {ctx} | " + " | ".join(f"{row[str(x)]:.3f}" for x in b["batches"]) + " |")
    if "stages" in out:
        for run, st in out["stages"].items():
            print(f"\n{run}: {st['total_s']:.2f} s CPU, {st['requests_per_s']:.2f} requests/s")
            for k, v in st.items():
                if isinstance(v, dict):
                    extra = f", {v['mean_rows']:.1f} rows/call" if "mean_rows" in v else ""
                    print(f"  {k:36s} {v['s']:7.2f} s {v['share']:6.1%}  {v['calls']} calls{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
