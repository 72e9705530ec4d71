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

Best-of-N (``best_of_n``, sampled at ``--bon-temperature``) runs three ways on the same samples
(one ``HFPolicy`` sampler with the same seed on every side: there is no vLLM here, so the
policy side is ponder's own in all three and the rows compare the PRM):

* ponder: ``HFPRM`` scoring each finished solution once (``score_paths``: one row per solution
  on a fork of its question part, which is computed once per problem);
* ponder step by step: ``HFPRM`` with ``score_paths`` hidden (every step scored when sampled,
  the engine's path for PRMs without it, and ponder's before this row existed);
* baseline (plain forward): ``RecomputePRM.score_paths``, search-and-learn's best-of-N PRM:
  every finished solution rendered in full and run through the plain transformers model
  once (no cache), every step read at its marker.

PRM time is measured around every PRM call; PRM tokens/s = tokens run through the PRM / that
time. ``prm_forward`` compares the two forward paths on *the same sequences at the same batch
size* (the finished best-of-N solutions, PRM-formatted, rows sorted by length and batched as
``HFPRM`` batches them; the paged side from an empty pool, so no token is reused): a plain
transformers forward (``RecomputePRM``: left-padded SDPA, no cache) against the paged path
(``PagedKVCache.prepare`` + ``PagedBatch.run``, logits at the scored positions); the policy's
prefill path (prompt + solution rows) the same way (``policy_prefill``). Each is the best of
``--repeats`` timings.

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


class Timed:
    """A PRM whose calls (start, score_steps, score_paths, release) are timed: ``seconds``."""

    CALLS = ("start", "score_steps", "score_paths", "release")

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seconds = 0.0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name not in self.CALLS:
            return attr

        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kw)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


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

    problems = args.problem_list[: args.problems]
    sampling = SamplingParams(temperature=args.temperature, max_step_tokens=args.max_step_tokens, seed=args.seed)
    config = SearchConfig(
        method=method, n=args.n, beam_width=args.beam_width, num_iterations=args.iterations,
        max_steps=args.max_steps, lookahead=args.lookahead, agg=args.agg, sampling=sampling, seed=args.seed,
    )

    def models():  # fresh instances per run: each starts with empty caches and an unseeded generator
        return (HFPolicy(policy_dir, kv_budget=args.kv_budget, block_size=args.block_size),
                HFPRM(prm_dir, format=args.prm_format, kv_budget=args.kv_budget, block_size=args.block_size))

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
        timed = Timed(prm)
        t0 = time.perf_counter()
        res = search(problems, pol, timed, config)
        wall = time.perf_counter() - t0
        ps, rs = pol.stats(), prm.stats()
        results[side] = (res, prm)
        out[side] = {
            "policy_tokens": int(ps["tokens_prefilled"]),
            "policy_tokens_generated": int(ps["tokens_generated"]),
            "policy_forward_passes": int(ps["forward_passes"]),
            "prm_tokens": int(rs["tokens_scored"]),
            "prm_s": timed.seconds,
            "prm_tokens_per_s": rs["tokens_scored"] / max(timed.seconds, 1e-9),
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
    out["wall_over_baseline"] = out["ponder"]["wall_s"] / out["baseline"]["wall_s"]
    out["agreement"] = compare(res, base_res)
    out["completions_with_answer"] = int(sum(sum(1 for c in r.completions if c.answer is not None) for r in res))
    return out


def run_best_of_n(args, policy_dir: str, prm_dir: str) -> dict:
    """Best-of-N three ways on the same samples (module docstring): ponder (score_paths),
    ponder step by step, and the plain full-path forward baseline."""
    from ponder import SearchConfig, search
    from ponder.baselines.recompute import RecomputePRM
    from ponder.hf.policy import HFPolicy
    from ponder.hf.prm import HFPRM
    from ponder.protocols import SamplingParams
    from ponder.testing.wrappers import StepByStep

    problems = args.problem_list[: args.problems]
    sampling = SamplingParams(temperature=args.bon_temperature, max_step_tokens=args.max_step_tokens, seed=args.seed)
    config = SearchConfig(method="best_of_n", n=args.n, max_steps=args.max_steps, agg="last", sampling=sampling,
                          seed=args.seed)
    sides = {"ponder": lambda p: p, "ponder_step_by_step": StepByStep, "baseline": RecomputePRM}

    def models(side):
        pol = HFPolicy(policy_dir, kv_budget=args.kv_budget, block_size=args.block_size)
        prm = HFPRM(prm_dir, format=args.prm_format, kv_budget=args.kv_budget, block_size=args.block_size)
        return pol, sides[side](prm)

    warm = SearchConfig(**{**config.__dict__, "n": 2})
    for side in sides:
        search(problems[:1], *models(side), warm)
    out: dict = {"method": "best_of_n", "problems": len(problems), "config": {
        "n": args.n, "max_steps": args.max_steps, "max_step_tokens": args.max_step_tokens,
        "temperature": args.bon_temperature, "agg": "last"}}
    results, unique = {}, 0
    for rep in range(args.search_repeats):  # sides interleaved; each side keeps its fastest run
        for side in sides:
            pol, prm = models(side)
            timed = Timed(prm)
            t0 = time.perf_counter()
            res = search(problems, pol, timed, config)
            wall = time.perf_counter() - t0
            rs = prm.stats()
            log(f"best_of_n {side}: {wall:.2f} s, PRM {rs['tokens_scored']:,} tokens in {timed.seconds:.2f} s")
            if side == "baseline":
                unique = int(rs["unique_tokens"])  # the baseline's count of the tree's PRM tokens
            if rep and wall >= out[side]["wall_s"]:
                continue
            results[side] = res
            out[side] = {
                "wall_s": wall,
                "policy_tokens": int(pol.stats()["tokens_prefilled"]),
                "policy_tokens_generated": int(pol.stats()["tokens_generated"]),
                "prm_tokens": int(rs["tokens_scored"]),
                "prm_s": timed.seconds,
                "prm_tokens_per_s": rs["tokens_scored"] / max(timed.seconds, 1e-9),
                "answers": [r.answer for r in res],
            }
    out["unique_prm_tokens"] = unique
    out["prm_tokens_over_unique"] = out["ponder"]["prm_tokens"] / out["unique_prm_tokens"]
    out["wall_over_baseline"] = out["ponder"]["wall_s"] / out["baseline"]["wall_s"]
    out["step_by_step_wall_over_baseline"] = out["ponder_step_by_step"]["wall_s"] / out["baseline"]["wall_s"]
    out["prm_tokens_per_s_over_baseline"] = out["ponder"]["prm_tokens_per_s"] / out["baseline"]["prm_tokens_per_s"]
    out["agreement"] = compare(results["ponder"], results["baseline"])
    out["agreement_step_by_step"] = compare(results["ponder"], results["ponder_step_by_step"])
    out["solutions"] = [(r.problem, list(c.steps)) for r in results["ponder"] for c in r.completions if c.steps]
    return out


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def forward_paths(args, policy_dir: str, prm_dir: str, solutions) -> dict:
    """Plain transformers forward vs the paged path on the same rows at the same batch size
    (module docstring): the PRM's scoring forward and the policy's prefill."""
    import torch

    from ponder.baselines.recompute import RecomputePRM, _left_pad
    from ponder.hf.policy import HFPolicy
    from ponder.hf.prm import HFPRM

    prm = HFPRM(prm_dir, format=args.prm_format, kv_budget=args.kv_budget, block_size=args.block_size)
    plain_prm = RecomputePRM(prm)
    solutions = solutions[: args.forward_rows]
    rows = sorted((prm.encode_full(prm._node_text(q, steps)) for q, steps in solutions), key=len)
    implicit = prm.ref_model is not None
    # marker formats: every marker is read; implicit-prm: every token's log-ratio under both models
    marks = [[len(r) - 1] if implicit else [i for i, t in enumerate(r) if t == prm._marker_id] for r in rows]
    starts = [plain_prm._answer_start(q) for q, _ in solutions] if implicit else [0] * len(rows)
    limit = prm._logratio_batch_tokens if implicit else None
    batches = list(prm._batches(rows, limit))

    def paged_prm():
        for i, j in batches:
            seqs = [prm.kv.new_sequence(r[:1])[0] for r in rows[i:j]]  # nothing cached: every token computed
            if implicit:
                prm._logratios(seqs, rows[i:j])
            else:
                prm._scores_at(seqs, rows[i:j], marks[i:j])
            prm.kv.free(seqs)

    def plain_prm_run():
        for i, j in batches:
            plain_prm._score_at(rows[i:j], marks[i:j], starts[i:j])

    pol = HFPolicy(policy_dir, kv_budget=args.kv_budget, block_size=args.block_size)
    prows = sorted((pol.prompt_tokens(q) + pol.tokenizer.encode("".join(steps), add_special_tokens=False)
                    for q, steps in solutions), key=len)
    pbatches = list(prm._batches(prows))

    def paged_policy():
        for i, j in pbatches:
            seqs = [pol.kv.new_sequence(r[:1])[0] for r in prows[i:j]]
            pol.kv.forward(pol.model, seqs, prows[i:j], logits="last")
            pol.kv.free(seqs)

    @torch.inference_mode()
    def plain_policy():
        for i, j in pbatches:
            ids, mask = _left_pad(prows[i:j], 0, pol.device)
            pol.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                      logits_to_keep=1)

    out = {}
    for name, (paged, plain, rs, bs) in {"prm_forward": (paged_prm, plain_prm_run, rows, batches),
                                         "policy_prefill": (paged_policy, plain_policy, prows, pbatches)}.items():
        paged(), plain()  # warm-up
        tokens = sum(len(r) for r in rs)
        t_paged = t_plain = float("inf")
        for _ in range(args.repeats):  # interleaved, best of each: a busy machine slows both alike
            t_paged, t_plain = min(t_paged, _best_time(paged, 1)), min(t_plain, _best_time(plain, 1))
        out[name] = {
            "rows": len(rs), "tokens": tokens, "batches": len(bs),
            "mean_rows_per_batch": len(rs) / max(len(bs), 1),
            "paged_s": t_paged, "plain_s": t_plain,
            "paged_tokens_per_s": tokens / t_paged, "plain_tokens_per_s": tokens / t_plain,
            "paged_over_plain": t_plain / t_paged,
        }
        log(f"{name}: {tokens:,} tokens in {len(bs)} batches: paged {tokens / t_paged:,.0f} tokens/s, "
            f"plain {tokens / t_plain:,.0f} tokens/s ({t_plain / t_paged:.2f})")
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
    parser.add_argument("--bon-temperature", type=float, default=0.8, help="best-of-N sampling temperature")
    parser.add_argument("--repeats", type=int, default=5, help="timings per side of the forward comparison (best kept)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("beam_search", "dvts"),
                        help="leave these tree searches out (their keys are then null)")
    parser.add_argument("--search-repeats", type=int, default=2,
                        help="best-of-N runs per side, sides interleaved (the fastest of each is kept)")
    parser.add_argument("--forward-rows", type=int, default=512, help="solutions in the forward comparison (at most)")
    parser.add_argument("--models", choices=("random", "builtin"), default="random",
                        help="random: the tiny random math-shepherd models built here; builtin: builtin:policy-small + "
                             "builtin:prm (implicit PRM) on builtin:arith problems (the issue's setting; slower)")
    args = parser.parse_args(argv)
    if args.quick:
        args.problems, args.n, args.beam_width, args.iterations, args.max_steps, args.max_step_tokens = 2, 4, 2, 3, 4, 12
        args.hidden, args.layers, args.repeats, args.search_repeats = 64, 2, 3, 1
    if args.n % args.beam_width:
        parser.error("--n must be a multiple of --beam-width")
    if args.models == "builtin":  # the setting: builtin:arith with the shipped models (implicit PRM)
        from ponder.data import load_problems
        from ponder.methods.config import SearchConfig
        from ponder.protocols import SamplingParams

        args.problem_list = [p.problem for p in load_problems("builtin:arith", limit=args.problems)]
        args.prm_format = "auto"
        if "--max-step-tokens" not in (argv or sys.argv):
            args.max_step_tokens = SamplingParams().max_step_tokens
        if "--max-steps" not in (argv or sys.argv):
            args.max_steps = SearchConfig().max_steps
    else:
        args.problem_list, args.prm_format = PROBLEMS, "math-shepherd"
    args.problems = min(args.problems, len(args.problem_list))

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ponder_bench_search_") as tmp:
        if args.models == "builtin":
            policy_dir, prm_dir = "builtin:policy-small", "builtin:prm"
        else:
            policy_dir, prm_dir = build_models(tmp, args.seed, args.hidden, args.layers)
            log(f"models built in {time.perf_counter() - t0:.1f} s (hidden {args.hidden}, {args.layers} layers)")
        methods = {m: run_method(m, args, policy_dir, prm_dir) for m in ("beam_search", "dvts") if m not in args.skip}
        bon = run_best_of_n(args, policy_dir, prm_dir)
        forward = forward_paths(args, policy_dir, prm_dir, bon.pop("solutions"))
    beam = methods.get("beam_search", {})
    agree = all(m["agreement"]["same_answers"] and m["agreement"]["same_trees"] for m in methods.values())
    from ponder import _core

    result = {
        "prm_tokens_per_s_over_plain_forward": forward["prm_forward"]["paged_over_plain"],
        "policy_prefill_tokens_per_s_over_plain_forward": forward["policy_prefill"]["paged_over_plain"],
        "best_of_n_wall_over_baseline": bon["wall_over_baseline"],
        "beam_search_wall_over_baseline": beam.get("wall_over_baseline"),
        "dvts_wall_over_baseline": methods.get("dvts", {}).get("wall_over_baseline"),
        "best_of_n_prm_tokens_per_s_over_baseline": bon["prm_tokens_per_s_over_baseline"],
        "goals": {"prm_tokens_per_s_over_plain_forward": ">= 0.9", "best_of_n_wall_over_baseline": "<= 0.8",
                  "beam_search_wall_over_baseline": "<= 0.2 (5x)", "dvts_wall_over_baseline": "<= 0.2 (5x)"},
        "policy_tokens_over_unique": beam.get("policy_tokens_over_unique"),
        "prm_tokens_over_unique": beam.get("prm_tokens_over_unique"),
        "baseline_policy_tokens_over_unique": beam.get("baseline_policy_tokens_over_unique"),
        "baseline_prm_tokens_over_unique": beam.get("baseline_prm_tokens_over_unique"),
        "wall_time_ratio_vs_baseline": beam.get("wall_time_ratio_vs_baseline"),
        "goal_tokens_over_unique": GOAL,
        "meets_goal": all(m["policy_tokens_over_unique"] <= GOAL and m["prm_tokens_over_unique"] <= GOAL for m in methods.values()),
        "sides_agree": agree,
        "methods": methods,
        "best_of_n": bon,
        "forward": forward,
        "quick": args.quick,
        "models": ({"policy": policy_dir, "prm": prm_dir, "problems": "builtin:arith"} if args.models == "builtin"
                   else {"hidden": args.hidden, "layers": args.layers, "seed": args.seed}),
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
    for side, label in (("ponder", "ponder"), ("ponder_step_by_step", "ponder step by step"), ("baseline", "plain forward")):
        b = bon[side]
        rows.append((f"best_of_n: {label}", f"{b['wall_s']:.2f} s", f"PRM {b['prm_tokens']:,} tokens in {b['prm_s']:.2f} s "
                     f"= {b['prm_tokens_per_s']:,.0f} tokens/s"))
    rows.append(("best_of_n: wall ponder / plain forward", f"{bon['wall_over_baseline']:.2f}",
                 f"goal <= 0.8; same answers {bon['agreement']['same_answers']}, "
                 f"score max |diff| {bon['agreement']['score_max_abs_diff']:.1e}"))
    for name, f in forward.items():
        rows.append((f"{name}: tokens/s paged / plain", f"{f['paged_tokens_per_s']:,.0f} / {f['plain_tokens_per_s']:,.0f}",
                     f"{f['paged_over_plain']:.2f} ({f['tokens']:,} tokens, {f['batches']} batches); goal >= 0.9"))
    width = max(len(r[0]) for r in rows)
    print(f"ponder search benchmark{' (quick)' if args.quick else ''} ({args.models} models): {args.problems} problems, "
          f"n={args.n}, beam_width={args.beam_width}, {args.iterations} iterations, max_steps={args.max_steps}, "
          f"max_step_tokens={args.max_step_tokens}, temperature={args.temperature} (best-of-N {args.bon_temperature})")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:<28} {note}")
    print(f"  goal: tokens computed <= {GOAL}x unique for policy and PRM: {'met' if result['meets_goal'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
