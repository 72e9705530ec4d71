#!/usr/bin/env python
"""End-to-end search benchmark: beam search and DVTS, ponder vs the search-and-learn way.

Two tiny random models are built from configs with a fixed seed and saved to a temporary
directory at startup (fully offline): a Llama policy with a Llama-3 style chat template and a
math-shepherd-format PRM (" ки" step tag, "+"/"-" read at the tag). Their byte-level BPE
tokenizer is trained here on a few arithmetic strings; a few tokens (EOS, newlines, boxed
answers, common words) are made to dominate the policy's random LM head so that steps end at
the blank-line delimiter, at EOS and with boxed answers reasonably often.

Each method runs the same problems with the same ``SearchConfig`` twice:

* ponder: ``HFPolicy`` + ``HFPRM`` (paged KV caches shaped like the search tree: every token of
  the tree is computed at most once, by the policy and by the PRM);
* baseline: ``ponder.baselines.recompute.RecomputePolicy`` / ``RecomputePRM`` wrapping the same
  models (search-and-learn's way: every iteration re-encodes every full path from scratch with a
  fresh ``DynamicCache`` and rescores every full path with the PRM).

Reported per method: policy and PRM tokens processed by each side, the unique tokens of the
tree (policy: the distinct prompts + every step of ``result.tree``; PRM: the distinct question
parts + the formatted tokens every scored path adds to its parent's, i.e. what HFPRM must score
once), tokens/unique for both sides, wall time of each and the ratio, and whether both sides
produced the same trees, scores and answers (with temperature 0 they must).

``--json`` prints one JSON object; ``--quick`` runs a reduced version (well under 60 s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import ponder  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import numpy as np

GOAL = 1.05
PROBLEMS = [
    "What is 2 + 3?",
    "Compute 4 * 6 - 5.",
    "If x + 7 = 12, what is x?",
    "What is 9 - 4?",
    "What is 3 * 3 + 1?",
    "Compute 20 / 4.",
]
ANSWERS = ["\\boxed{5}", "\\boxed{19}", "\\boxed{10}", "\\boxed{24}"]
STEPS = [
    "Step 1: add 2 and 3 to get 5.\n\n",
    "We multiply 4 by 6 to get 24.\n\n",
    "Then subtract 5 from 24.\n\n",
    "So x = 12 - 7 = 5.\n\n",
    "The answer is \\boxed{5}.",
    "Check: 5 + 7 = 12, which is right.\n\n",
    "Hence 24 - 5 = 19.",
]
CORPUS = PROBLEMS + STEPS + ["The answer is 19. So the result is 5 and x is 5."] * 3
LLAMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def log(msg: str) -> None:
    print(f"[bench_search] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- tiny models


def make_tokenizer(kind: str):
    """kind "policy": Llama-3 style chat template, eos <|eot_id|>; "prm": no template, BOS added
    by the post-processor, eos </s>, the math-shepherd tag " ки" as a token of its own."""
    import transformers
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    if kind == "prm":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    eos = "<|eot_id|>" if kind == "policy" else "</s>"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>")
    if kind == "policy":
        fast.add_tokens([" " + a for a in ANSWERS])  # one token each, so the random LM can write them
        fast.chat_template = LLAMA_CHAT
    else:
        fast.add_tokens([" ки"])
    return fast


def build_models(root: str, seed: int, hidden: int, layers: int) -> tuple[str, str]:
    """Save the policy and the PRM (random weights from ``seed``) under ``root``; return their dirs."""
    import torch
    import transformers

    def config(tok):
        return transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )

    paths = []
    for kind in ("policy", "prm"):
        tok = make_tokenizer(kind)
        torch.manual_seed(seed + (kind == "prm"))
        model = transformers.AutoModelForCausalLM.from_config(config(tok))
        if kind == "policy":
            # A few tokens dominate the random LM head (EOS, newlines, boxed answers, words).
            g = torch.Generator().manual_seed(seed + 7)
            with torch.no_grad():
                w = model.lm_head.weight
                w.mul_(0.05)
                ids = {tok.eos_token_id, *tok.encode("\n", add_special_tokens=False), *tok.encode("\n\n", add_special_tokens=False)}
                ids |= {tok.convert_tokens_to_ids(t) for t in ("Ġthe", "Ġis", "5", "Ġ=", "Ġ+", "Ġto")}
                ids |= {tok.convert_tokens_to_ids(" " + a) for a in ANSWERS}
                ids.discard(tok.unk_token_id)
                for i in sorted(x for x in ids if x is not None):
                    w[i] = torch.randn(w.shape[1], generator=g)
        path = os.path.join(root, kind)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


# ----------------------------------------------------------------------------- one workload


def unique_policy_tokens(results) -> int:
    """The distinct prompts (one per problem: all its roots share it) + every step of the tree."""
    total = 0
    for r in results:
        t = r.tree
        roots = t["parent"] < 0
        total += int(t["num_tokens"][roots][0]) if roots.any() else 0
        total += int(t["num_tokens"][(~roots) & t["has_step"]].sum())
    return total


def compare(a, b) -> dict:
    """Do two runs agree: answers, tree shapes (token counts per node) and step scores."""
    answers = [x.answer for x in a] == [y.answer for y in b]
    shapes = all(
        np.array_equal(x.tree["parent"], y.tree["parent"]) and np.array_equal(x.tree["num_tokens"], y.tree["num_tokens"])
        for x, y in zip(a, b)
    )
    texts = all([c.text for c in x.completions] == [c.text for c in y.completions] for x, y in zip(a, b))
    diff = 0.0
    if shapes:
        for x, y in zip(a, b):
            sx, sy = x.tree["score"].astype(np.float64), y.tree["score"].astype(np.float64)
            both = ~(np.isnan(sx) | np.isnan(sy))
            if both.any():
                diff = max(diff, float(np.abs(sx[both] - sy[both]).max()))
    return {"same_answers": answers, "same_trees": shapes, "same_completions": texts, "score_max_abs_diff": diff}


def run_method(method: str, args, policy_dir: str, prm_dir: str) -> dict:
    from ponder import SearchConfig, search
    from ponder.baselines.recompute import RecomputePolicy, RecomputePRM
    from ponder.hf.policy import HFPolicy
    from ponder.hf.prm import HFPRM
    from ponder.protocols import SamplingParams

    problems = PROBLEMS[: args.problems]
    sampling = SamplingParams(temperature=args.temperature, max_step_tokens=args.max_step_tokens, seed=args.seed)
    config = SearchConfig(
        method=method, n=args.n, beam_width=args.beam_width, num_iterations=args.iterations,
        max_steps=args.max_steps, lookahead=args.lookahead, agg=args.agg, sampling=sampling, seed=args.seed,
    )

    def models():  # fresh instances per run: each starts with empty caches and an unseeded generator
        return (HFPolicy(policy_dir, kv_budget=args.kv_budget, block_size=args.block_size),
                HFPRM(prm_dir, format="math-shepherd", kv_budget=args.kv_budget, block_size=args.block_size))

    warm = SearchConfig(**{**config.__dict__, "n": args.beam_width, "num_iterations": 1, "max_steps": 1})
    for side in ("ponder", "baseline"):  # warm-up (first-call costs) on one small search
        pol, prm = models()
        if side == "baseline":
            pol, prm = RecomputePolicy(pol), RecomputePRM(prm)
        search(problems[:1], pol, prm, warm)

    out: dict = {"method": method, "problems": len(problems), "config": {
        "n": args.n, "beam_width": args.beam_width, "num_iterations": args.iterations, "max_steps": args.max_steps,
        "max_step_tokens": args.max_step_tokens, "temperature": args.temperature, "agg": args.agg, "lookahead": args.lookahead}}
    results = {}
    for side in ("ponder", "baseline"):
        pol, prm = models()
        if side == "baseline":
            pol, prm = RecomputePolicy(pol), RecomputePRM(prm)
        t0 = time.perf_counter()
        res = search(problems, pol, prm, config)
        wall = time.perf_counter() - t0
        ps, rs = pol.stats(), prm.stats()
        results[side] = (res, prm)
        out[side] = {
            "policy_tokens": int(ps["tokens_prefilled"]),
            "policy_tokens_generated": int(ps["tokens_generated"]),
            "policy_forward_passes": int(ps["forward_passes"]),
            "prm_tokens": int(rs["tokens_scored"]),
            "wall_s": wall,
            "answers": [r.answer for r in res],
            "tree_nodes": int(sum(len(r.tree["node_id"]) for r in res)),
        }
        log(f"{method} {side}: {wall:.2f} s, policy {ps['tokens_prefilled']:,} tokens, PRM {rs['tokens_scored']:,} tokens")
    res, _ = results["ponder"]
    base_res, base_prm = results["baseline"]
    out["unique_policy_tokens"] = unique_policy_tokens(res)
    out["unique_prm_tokens"] = int(base_prm.stats()["unique_tokens"])
    for side, key in (("ponder", ""), ("baseline", "baseline_")):
        out[f"{key}policy_tokens_over_unique"] = out[side]["policy_tokens"] / out["unique_policy_tokens"]
        out[f"{key}prm_tokens_over_unique"] = out[side]["prm_tokens"] / out["unique_prm_tokens"]
    out["wall_time_ratio_vs_baseline"] = out["baseline"]["wall_s"] / out["ponder"]["wall_s"]
    out["agreement"] = compare(res, base_res)
    out["completions_with_answer"] = int(sum(sum(1 for c in r.completions if c.answer is not None) for r in res))
    return out


# ----------------------------------------------------------------------------- report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="reduced sizes (seconds: 2 problems, n=4, hidden 64, 2 layers; CI runs it)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", help="also write the JSON object to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--max-step-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (both sides must agree exactly)")
    parser.add_argument("--agg", default="last")
    parser.add_argument("--lookahead", type=int, default=0,
                        help="greedy lookahead steps (their tokens are not in the tree: the ratios then exceed 1)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-budget", type=int, default=1 << 16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (same for both sides)")
    args = parser.parse_args(argv)
    if args.quick:
        args.problems, args.n, args.beam_width, args.iterations, args.max_steps, args.max_step_tokens = 2, 4, 2, 3, 4, 12
        args.hidden, args.layers = 64, 2
    if args.n % args.beam_width:
        parser.error("--n must be a multiple of --beam-width")
    args.problems = min(args.problems, len(PROBLEMS))

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ponder_bench_search_") as tmp:
        policy_dir, prm_dir = build_models(tmp, args.seed, args.hidden, args.layers)
        log(f"models built in {time.perf_counter() - t0:.1f} s (hidden {args.hidden}, {args.layers} layers)")
        methods = {m: run_method(m, args, policy_dir, prm_dir) for m in ("beam_search", "dvts")}
    beam = methods["beam_search"]
    agree = all(m["agreement"]["same_answers"] and m["agreement"]["same_trees"] for m in methods.values())
    from ponder import _core

    result = {
        "policy_tokens_over_unique": beam["policy_tokens_over_unique"],
        "prm_tokens_over_unique": beam["prm_tokens_over_unique"],
        "baseline_policy_tokens_over_unique": beam["baseline_policy_tokens_over_unique"],
        "baseline_prm_tokens_over_unique": beam["baseline_prm_tokens_over_unique"],
        "wall_time_ratio_vs_baseline": beam["wall_time_ratio_vs_baseline"],
        "goal_tokens_over_unique": GOAL,
        "meets_goal": all(m["policy_tokens_over_unique"] <= GOAL and m["prm_tokens_over_unique"] <= GOAL for m in methods.values()),
        "sides_agree": agree,
        "methods": methods,
        "quick": args.quick,
        "models": {"hidden": args.hidden, "layers": args.layers, "seed": args.seed},
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch_threads": args.threads},
        "build": dict(_core.build_info()),
        "total_s": time.perf_counter() - t0,
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0

    rows = []
    for name, m in methods.items():
        p, b, a = m["ponder"], m["baseline"], m["agreement"]
        rows += [
            (f"{name}: policy tokens (ponder / recompute)", f"{p['policy_tokens']:,} / {b['policy_tokens']:,}",
             f"unique {m['unique_policy_tokens']:,}"),
            (f"{name}: policy tokens / unique", f"{m['policy_tokens_over_unique']:.3f} (ponder)",
             f"{m['baseline_policy_tokens_over_unique']:.2f} (recompute); goal <= {GOAL}"),
            (f"{name}: PRM tokens (ponder / recompute)", f"{p['prm_tokens']:,} / {b['prm_tokens']:,}",
             f"unique {m['unique_prm_tokens']:,}"),
            (f"{name}: PRM tokens / unique", f"{m['prm_tokens_over_unique']:.3f} (ponder)",
             f"{m['baseline_prm_tokens_over_unique']:.2f} (recompute); goal <= {GOAL}"),
            (f"{name}: wall time (ponder / recompute)", f"{p['wall_s']:.2f} s / {b['wall_s']:.2f} s",
             f"{m['wall_time_ratio_vs_baseline']:.2f}x faster"),
            (f"{name}: same answers / trees", f"{'✓' if a['same_answers'] else '✗'} / {'✓' if a['same_trees'] else '✗'}",
             f"answers {p['answers']}; score max |diff| {a['score_max_abs_diff']:.1e}"),
        ]
    width = max(len(r[0]) for r in rows)
    c = methods["beam_search"]["config"]
    print(f"ponder search benchmark{' (quick)' if args.quick else ''}: {args.problems} problems, n={c['n']}, "
          f"beam_width={c['beam_width']}, {c['num_iterations']} iterations, max_steps={c['max_steps']}, "
          f"max_step_tokens={c['max_step_tokens']}, temperature={c['temperature']}")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:<28} {note}")
    print(f"  goal: tokens computed <= {GOAL}x unique for policy and PRM: {'met' if result['meets_goal'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
