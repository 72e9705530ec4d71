#!/usr/bin/env python
"""How well does the built-in PRM verify? It against what policy-large itself knows.

On the first ``--per-level`` problems of each level of ``builtin:arith``, ``builtin:policy-small``
samples ``--n`` solutions (temperature ``--temperature``, ponder's own engine). The same
solutions are then chosen from by

* majority voting (no verifier), and the oracle (is a correct answer among them: pass@n);
* ``builtin:prm``: best-of-n by the last / the minimum step score, and PRM-weighted voting;
* ``builtin:policy-large``'s likelihood, a verifier that is *not* a trained PRM: a step's score
  is the smallest probability the large policy gives any of its tokens (teacher-forced on the
  path as the small policy wrote it); best-of-n by the minimum over steps.

It also reports each verifier's step ROC AUC on the first wrong step of every solution against
the correct steps before it (the steps after a first error are left out: they are wrong by
convention, not by anything written in them). ``builtin:prm`` is the large policy trained
further, so comparing its rows with the likelihood rows shows what the verifier knows beyond the
policy it is compared with.

    python benchmarks/bench_verifier.py                       # levels 2-4, 30 problems each
    python benchmarks/bench_verifier.py --levels 3 --json     # JSON on stdout
    python benchmarks/bench_verifier.py --quick --json        # a smoke run in seconds (CI)

Nothing here is asserted: the numbers are what the run measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter

try:
    import ponder  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import torch

from ponder import SamplingParams, SearchConfig, search
from ponder.hf.policy import HFPolicy
from ponder.hf.prm import HFPRM
from ponder.toy import arith
from ponder.toy.builtin import builtin_model_path


def likelihood_step_scores(model, tokenizer, question: str, steps: list[str]) -> list[float]:
    """Per step: min over its tokens of P(token | everything before it) under ``model`` (a causal
    LM with the policies' chat template), on the prompt + steps exactly as the policy wrote them."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    spans = []
    for step in steps:
        step_ids = tokenizer.encode(step, add_special_tokens=False)
        spans.append((len(ids), len(ids) + len(step_ids)))
        ids += step_ids
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [math.exp(min((logp[i - 1, ids[i]].item() for i in range(a, b)), default=0.0)) for a, b in spans]


def _auc(good: list[float], bad: list[float]) -> float | None:
    if not good or not bad:
        return None
    pairs = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
    return pairs / (len(good) * len(bad))


def _pick(completions, scores, key) -> bool:
    best = max(zip(completions, scores), key=lambda cs: key(cs[1]), default=None)
    return best is not None and best[0]["correct"]


def _vote(completions, weights) -> bool:
    """Whether the answer with the largest total weight is correct."""
    votes: Counter = Counter()
    for c, w in zip(completions, weights):
        votes[c["answer"]] += w
    if not votes:
        return False
    top = votes.most_common(1)[0][0]
    return any(c["correct"] for c in completions if c["answer"] == top)


def run_level(level: int, args, policy, prm, large, tokenizer) -> dict:
    problems = [p for p in arith.load_arith("test") if p.level == level][: args.per_level]
    config = SearchConfig(method="best_of_n", n=args.n, max_steps=16, seed=args.seed,
                          sampling=SamplingParams(temperature=args.temperature, max_step_tokens=96))
    results = search([p.problem for p in problems], policy, prm, config)
    counts: Counter = Counter()
    steps_good = {"prm": [], "likelihood": []}
    steps_bad = {"prm": [], "likelihood": []}
    for p, r in zip(problems, results):
        done = [c for c in r.completions if c.answer is not None and c.steps]
        gold = int(p.answer)
        comps = [{"answer": c.answer, "correct": int(c.answer) == gold} for c in done]
        prm_scores = [list(c.step_scores) for c in done]
        lik_scores = [likelihood_step_scores(large, tokenizer, p.problem, list(c.steps)) for c in done]
        counts["oracle"] += any(c["correct"] for c in comps)
        counts["majority"] += _vote(comps, [1.0] * len(comps))
        counts["prm_last"] += _pick(comps, prm_scores, lambda s: s[-1])
        counts["prm_min"] += _pick(comps, prm_scores, min)
        counts["prm_weighted"] += _vote(comps, [s[-1] for s in prm_scores])
        counts["likelihood_min"] += _pick(comps, lik_scores, min)
        for c, ps, ls in zip(done, prm_scores, lik_scores):
            labels = arith.label_steps(p.problem, [s.strip() for s in c.steps])
            upto = labels.index(False) + 1 if False in labels else len(labels)
            for ok, a, b in zip(labels[:upto], ps, ls):
                (steps_good if ok else steps_bad)["prm"].append(a)
                (steps_good if ok else steps_bad)["likelihood"].append(b)
    out = {"level": level, "problems": len(problems), **{k: counts[k] for k in
           ("oracle", "majority", "prm_last", "prm_min", "prm_weighted", "likelihood_min")}}
    for name in ("prm", "likelihood"):
        auc = _auc(steps_good[name], steps_bad[name])
        out[f"{name}_first_error_auc"] = None if auc is None else round(auc, 3)
    out["first_errors"] = len(steps_bad["prm"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="2,3,4", help="levels of builtin:arith (default %(default)s)")
    parser.add_argument("--per-level", type=int, default=30, help="problems per level (default %(default)s)")
    parser.add_argument("--n", type=int, default=16, help="samples per problem (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in seconds: level 2, 2 problems, n = 2 (numbers meaningless; CI runs it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.levels, args.per_level, args.n = "2", 2, 2
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer, LlamaForCausalLM

    large_path = builtin_model_path("policy-large")
    budget = 1 << (12 if args.quick else 17)
    policy = HFPolicy(builtin_model_path("policy-small"), device="cpu", kv_budget=budget)
    prm = HFPRM(builtin_model_path("prm"), device="cpu", kv_budget=budget)
    large = LlamaForCausalLM.from_pretrained(large_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(large_path)
    t0 = time.time()
    rows = [run_level(int(lv), args, policy, prm, large, tokenizer) for lv in args.levels.split(",")]
    report = {"n": args.n, "temperature": args.temperature, "seconds": round(time.time() - t0, 1), "levels": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    cols = ["level", "problems", "oracle", "majority", "prm_last", "prm_min", "prm_weighted", "likelihood_min",
            "prm_first_error_auc", "likelihood_first_error_auc", "first_errors"]
    print(f"best-of-{args.n} from policy-small's samples (T={args.temperature}), problems solved; {report['seconds']} s")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
