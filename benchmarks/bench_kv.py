#!/usr/bin/env python
"""KV-cache benchmarks: prefix-index throughput and a beam-search-shaped decode on a tiny Llama.

1. PrefixIndex match + insert on a beam-search-shaped trace (every path of every beam of every
   problem is looked up and then inserted, as a prefix cache sees requests), C++
   ``ponder._core.PrefixIndex`` vs the pure-Python radix tree ``ponder.twins.PrefixIndex``
   (block-granular radix tree with SGLang's semantics), same trace, same process.
2. N forks of a prompt decoded for S steps of T tokens (beam-search shaped: after each step the
   best N/M beams are kept and forked M ways) on a tiny random Llama:
   - paged: ``ponder.hf.kv.PagedKVCache`` (prompt computed once, every shared step once);
   - recompute: what search-and-learn does without a prefix cache: every step re-prefills every
     beam's whole path with a fresh ``DynamicCache`` and decodes the step's T tokens.
   Both are fed the same pre-drawn tokens (teacher forcing), so they do the same model work per
   token; reported: tokens computed by each, unique tokens of the tree, their ratio, and the
   wall-time ratio. The final logits of both are compared (they must agree).

``--json`` prints one JSON object; ``--quick`` runs a reduced version in well under 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

try:
    import ponder  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import numpy as np  # noqa: E402

from ponder import (
    _core,  # noqa: E402
    twins,  # noqa: E402
)


def log(msg: str) -> None:
    print(f"[bench_kv] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- 1. prefix index


def beam_trace(problems: int, prompt_len: int, beams: int, width: int, steps: int, step_len: int, seed: int):
    """Token paths in request order: for each iteration and problem, every beam's path."""
    rng = np.random.default_rng(seed)
    trace = []
    for p in range(problems):
        prompt = rng.integers(0, 32000, prompt_len).tolist()
        paths = [list(prompt) for _ in range(beams)]
        for _ in range(steps):
            paths = [path + rng.integers(0, 32000, step_len).tolist() for path in paths]
            trace.extend(paths)
            keep = rng.choice(beams, size=beams // width, replace=False)
            paths = [list(paths[k]) for k in keep for _ in range(width)]
    return trace


def run_index(index_cls, trace, block_size: int) -> tuple[float, int, int]:
    """Replay ``trace`` (match, then insert with fresh block ids for the unmatched blocks)."""
    index = index_cls(block_size)
    next_block = 0
    hits = 0
    arrays = [np.asarray(path, dtype=np.int32) for path in trace]  # conversion is not timed
    clock = time.perf_counter
    spent = 0.0  # only the index's own calls are timed, not the glue that builds block ids
    for tokens in arrays:
        t0 = clock()
        matched, blocks = index.match(tokens)
        spent += clock() - t0
        hits += int(matched)
        full = len(tokens) // block_size
        new = full - len(blocks)
        ids = np.concatenate([np.asarray(blocks, dtype=np.int32), np.arange(next_block, next_block + new, dtype=np.int32)])
        next_block += new
        prefix = tokens[: full * block_size]
        t0 = clock()
        index.insert(prefix, ids)
        spent += clock() - t0
    return spent, hits, next_block


def bench_prefix_index(args) -> dict:
    trace = beam_trace(args.index_problems, 256, 16, 4, args.index_steps, 20, args.seed)
    tokens = sum(len(t) for t in trace)
    log(f"prefix index: {len(trace)} requests, {tokens:,} tokens, block size {args.block_size}")
    core_s, core_hits, core_blocks = min(
        (run_index(_core.PrefixIndex, trace, args.block_size) for _ in range(3)), key=lambda r: r[0]
    )
    ref_s, ref_hits, ref_blocks = run_index(twins.PrefixIndex, trace, args.block_size)
    if (core_hits, core_blocks) != (ref_hits, ref_blocks):
        raise SystemExit(f"prefix index mismatch: core {(core_hits, core_blocks)} vs twin {(ref_hits, ref_blocks)}")
    return {
        "requests": len(trace),
        "tokens": tokens,
        "tokens_matched": core_hits,
        "blocks_inserted": core_blocks,
        "core_s": core_s,
        "reference_s": ref_s,
        "core_requests_per_s": len(trace) / core_s,
        "reference_requests_per_s": len(trace) / ref_s,
        "speedup": ref_s / core_s,
    }


# ----------------------------------------------------------------------------- 2. decode


def tiny_llama(seed: int):
    import torch
    import transformers

    import ponder.hf.kv as pkv

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=pkv.ATTN_IMPLEMENTATION)
    return model.eval()


def draw_tokens(args, rng):
    prompt = rng.integers(1, 512, args.prompt_len).tolist()
    steps = rng.integers(1, 512, (args.steps, args.beams, args.step_len))
    keeps = [rng.choice(args.beams, size=args.beams // args.width, replace=False) for _ in range(args.steps)]
    return prompt, steps, keeps


def decode_paged(model, args, prompt, steps, keeps):
    import ponder.hf.kv as pkv

    need = args.prompt_len + args.beams * args.steps * args.step_len + 4 * args.beams * args.block_size
    kv = pkv.PagedKVCache.for_model(model, block_size=args.block_size, token_budget=need)
    t0 = time.perf_counter()
    seq, _ = kv.new_sequence(prompt)
    kv.forward(model, [seq], [prompt])
    beams = kv.fork(seq, args.beams)
    kv.free([seq])
    logits = None
    for s in range(args.steps):
        for t in range(args.step_len):
            logits = kv.forward(model, beams, steps[s, :, t, None].tolist())
        if s + 1 < args.steps:
            kept = [int(beams[k]) for k in keeps[s]]
            forks = np.concatenate([kv.fork(b, args.width) for b in kept])
            kv.free(beams)
            beams = forks
    wall = time.perf_counter() - t0
    return wall, kv.stats()["tokens_appended"], logits


def decode_recompute(model, args, prompt, steps, keeps):
    import torch
    from transformers import DynamicCache

    paths = [list(prompt) for _ in range(args.beams)]
    computed = 0
    logits = None
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(args.steps):
            cache = DynamicCache()
            ids = torch.tensor(paths)
            L = ids.shape[1]
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)  # re-prefill every path
            computed += ids.numel()
            for t in range(args.step_len):
                tok = torch.from_numpy(steps[s, :, t, None])
                pos = torch.full((args.beams, 1), L + t)
                logits = model(input_ids=tok, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]
                computed += args.beams
            paths = [path + steps[s, b].tolist() for b, path in enumerate(paths)]
            if s + 1 < args.steps:
                paths = [list(paths[k]) for k in keeps[s] for _ in range(args.width)]
    wall = time.perf_counter() - t0
    return wall, computed, logits


def bench_decode(args) -> dict:
    import torch

    # One intra-op thread: both sides run the same model code, and on a small shared machine a
    # thread pool per process oversubscribes the cores and measures the scheduler instead.
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    model = tiny_llama(args.seed)
    prompt, steps, keeps = draw_tokens(args, rng)
    unique = args.prompt_len + args.beams * args.steps * args.step_len
    log(f"decode: {args.beams} beams, prompt {args.prompt_len}, {args.steps} steps x {args.step_len} tokens")
    decode_paged(model, argparse.Namespace(**{**vars(args), "steps": 1}), prompt, steps[:1], keeps)  # warm-up
    paged_s, paged_tokens, paged_logits = decode_paged(model, args, prompt, steps, keeps)
    log(f"paged: {paged_s:.2f} s, {paged_tokens:,} tokens computed")
    re_s, re_tokens, re_logits = decode_recompute(model, args, prompt, steps, keeps)
    log(f"recompute: {re_s:.2f} s, {re_tokens:,} tokens computed")
    max_diff = float((paged_logits.float() - re_logits.float()).abs().max())
    if max_diff > 1e-3:
        raise SystemExit(f"paged and recomputed logits differ by {max_diff}")
    return {
        "beams": args.beams,
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "step_len": args.step_len,
        "block_size": args.block_size,
        "unique_tokens": unique,
        "paged_tokens_computed": paged_tokens,
        "recompute_tokens_computed": re_tokens,
        "paged_s": paged_s,
        "recompute_s": re_s,
        "final_logits_max_abs_diff": max_diff,
    }


# ----------------------------------------------------------------------------- report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes (well under 60 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", help="also write the JSON object to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--beams", type=int, default=16)
    parser.add_argument("--width", type=int, default=4, help="beam width M: keep N/M beams, fork each M ways")
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-len", type=int, default=20)
    parser.add_argument("--index-problems", type=int, default=64)
    parser.add_argument("--index-steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.quick:
        args.index_problems, args.index_steps, args.steps = 16, 10, 4
    if args.beams % args.width:
        parser.error("--beams must be a multiple of --width")

    index = bench_prefix_index(args)
    decode = bench_decode(args)
    result = {
        "prefix_index_speedup": index["speedup"],
        "tokens_computed_over_unique": decode["paged_tokens_computed"] / decode["unique_tokens"],
        "recompute_tokens_over_unique": decode["recompute_tokens_computed"] / decode["unique_tokens"],
        "wall_time_ratio_vs_recompute": decode["recompute_s"] / decode["paged_s"],
        "prefix_index": index,
        "decode": decode,
        "quick": args.quick,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "build": dict(_core.build_info()),
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    d = decode
    rows = [
        ("prefix index: requests/s (C++ / Python)", f"{index['core_requests_per_s']:,.0f} / {index['reference_requests_per_s']:,.0f}",
         f"{index['speedup']:.1f}x faster (goal >= 20x)"),
        ("decode: tokens computed (paged / recompute)", f"{d['paged_tokens_computed']:,} / {d['recompute_tokens_computed']:,}",
         f"unique tokens {d['unique_tokens']:,}"),
        ("decode: tokens computed / unique", f"{result['tokens_computed_over_unique']:.3f} (paged)",
         f"{result['recompute_tokens_over_unique']:.2f} (recompute); goal <= 1.05"),
        ("decode: wall time (paged / recompute)", f"{d['paged_s']:.2f} s / {d['recompute_s']:.2f} s",
         f"{result['wall_time_ratio_vs_recompute']:.2f}x faster"),
        ("decode: final logits max |diff|", f"{d['final_logits_max_abs_diff']:.2e}", "paged vs recompute"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"ponder KV cache benchmark{' (quick)' if args.quick else ''}")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:<28} {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
