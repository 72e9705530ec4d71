#!/usr/bin/env python
"""Choose the early-stop rules of ``bench_adaptive.py`` on calibration records (never the held-out set).

Every rule of a grid (rounds of 2 or 4; futility off or at a level; the futility rule's PRM
gate off or at a score; leader threshold ``--threshold``) is replayed, by the state machine's
own decisions (``bench_adaptive.replay_early_stop``), on the i.i.d. samples of each record of
``--records`` (default: the shipped ``ponder/toy/strategy.records.jsonl``, the calibration set
of the built-in table), for early-stopped majority and weighted best-of-N with cap n = ``--cap``.

Criterion (fixed before any held-out measurement, docs/adaptive.md): among the rules whose
accuracy stays within ``--max-loss`` (0.005: half a point) of the same vote at n = cap on the
same draws, the one with the fewest policy tokens (ties: the grid's order, simpler first).
``--json`` prints the whole grid and the choice; ``--quick`` replays a small grid on the first
60 records (~20 s).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_adaptive import replay_early_stop  # noqa: E402
from ponder.calibrate import load_records  # noqa: E402
from ponder.methods.stopping import EarlyStop  # noqa: E402

FUTILITY = (None, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
GATE = (None, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7)


def grid(threshold: float, quick: bool) -> list[EarlyStop]:
    """The rules tried, simpler first: rounds 4 before 2, no futility, then no gate."""
    futility = (None, 0.1, 0.25) if quick else FUTILITY
    gate = (None, 0.1, 0.5) if quick else GATE
    out = []
    for r, f, g in itertools.product((4, 2), futility, gate):
        if f is None and g is not None:
            continue
        out.append(EarlyStop(threshold, r, f, g).validate())
    return out


def evaluate(records, rule: EarlyStop, cap: int, weighted: bool) -> dict:
    full = [r.sampled_outcome("weighted" if weighted else "majority", cap) for r in records]
    got = [replay_early_stop(r, rule, cap, weighted) for r in records]
    n = len(records)
    return {"round_size": rule.round_size, "futility": rule.futility, "futility_score": rule.futility_score,
            "accuracy": sum(c for c, _ in got) / n, "accuracy_at_cap": sum(c for c, _ in full) / n,
            "accuracy_delta": (sum(c for c, _ in got) - sum(c for c, _ in full)) / n,
            "problems_lost": sum(c for c, _ in full) - sum(c for c, _ in got),
            "token_ratio": sum(t for _, t in got) / max(1, sum(t for _, t in full))}


def choose(rows: list[dict], max_loss: float) -> dict | None:
    ok = [r for r in rows if r["accuracy_delta"] >= -max_loss - 1e-12]
    return min(ok, key=lambda r: r["token_ratio"]) if ok else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", default=None, help="calibration records (default: the shipped ones)")
    ap.add_argument("--cap", type=int, default=16)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--max-loss", type=float, default=0.005)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    path = args.records or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "ponder", "toy",
                                        "strategy.records.jsonl")
    records = load_records(path)
    if args.quick:
        records = records[:60]
    too_few = [r.id for r in records if len(r.samples) < args.cap]
    if too_few:
        print(f"fit_early_stop: {len(too_few)} records hold fewer than --cap {args.cap} samples "
              f"(e.g. {too_few[0]}); lower --cap or use records with more samples", file=sys.stderr)
        return 2
    out = {"records": os.path.abspath(path), "problems": len(records), "cap": args.cap, "threshold": args.threshold,
           "max_loss": args.max_loss, "criterion": "fewest tokens with accuracy_delta >= -max_loss"}
    for weighted, name in ((False, "majority"), (True, "weighted_best_of_n")):
        rows = [evaluate(records, rule, args.cap, weighted) for rule in grid(args.threshold, args.quick)]
        out[name] = {"grid": rows, "chosen": choose(rows, args.max_loss)}
    if args.json:
        print(json.dumps(out))
    else:
        for name in ("majority", "weighted_best_of_n"):
            c = out[name]["chosen"]
            print(f"{name}: " + ("no rule keeps the accuracy" if c is None else
                                 f"rounds {c['round_size']}, futility {c['futility']}, futility_score "
                                 f"{c['futility_score']}: token ratio {c['token_ratio']:.3f}, accuracy delta "
                                 f"{c['accuracy_delta']:+.4f} ({c['problems_lost']} of {len(records)} lost)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
