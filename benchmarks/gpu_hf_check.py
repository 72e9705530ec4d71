"""The Hugging Face path on the paged KV cache, checked on one device (part of gpu_check.sh).

For tiny random models of three families (Llama with GQA 2:1, Qwen2 with MQA, GPT-2) in float32
and bfloat16, on a pool with a block size that is not a power of two: a prompt is prefilled,
forked three ways (the shared partial block is copied on write), each fork appends a chunk
(prefill path: gather + SDPA) and then decodes tokens one by one (decode path: paged decode
attention). Every logits row is compared with the same model's own forward over the whole
sequence (no cache, SDPA).

Tolerances: float32: max |paged - reference| <= 2e-3 (TF32 off). bfloat16: the error against
the float32 model's logits is at most twice the error of the model's own bfloat16 forward,
plus 0.05 (the kernels accumulate in float32; the rule of the kernel tests).

Usage: python benchmarks/gpu_hf_check.py [--device cuda] [--out results.json] [--quick]
Exit status 1 when a comparison fails. Needs torch, transformers and ponder (no network).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# torch, transformers and ponder.hf.kv are imported in main(): --help answers without them.
torch = transformers = pkv = None

VOCAB = 97
BLOCK_SIZE = 5  # not a power of two: slots straddle blocks unevenly


def configs():
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    return {
        "llama": transformers.LlamaConfig(num_key_value_heads=2, max_position_embeddings=256, **common),
        "qwen2": transformers.Qwen2Config(num_key_value_heads=1, max_position_embeddings=256, **common),
        "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                        bos_token_id=0, eos_token_id=0),
    }


def full_logits(model, tokens, device):
    """The model's own forward over the whole sequence (no cache): float32 [len(tokens), vocab]."""
    return model(input_ids=torch.tensor([list(tokens)], device=device)).logits[0].float()


def run_paged(model, device, prompt, chunks, decode_steps, gen):
    """Logits rows from the paged cache and the token lists they belong to: [(tokens, logits[V])]."""
    cache = pkv.PagedKVCache.for_model(model, block_size=BLOCK_SIZE, num_blocks=64)
    seq, cached = cache.new_sequence(prompt)
    rows = []
    out = cache.forward(model, [seq], [prompt[cached:]], logits="last")
    rows.append((list(prompt), out[0]))
    forks = [int(s) for s in cache.fork(seq, len(chunks))]
    cache.free([seq])
    paths = [list(prompt) for _ in forks]
    out = cache.forward(model, forks, chunks, logits="last")  # chunked prefill of each fork (CoW first)
    for i, c in enumerate(chunks):
        paths[i] += c
        rows.append((list(paths[i]), out[i]))
    for _ in range(decode_steps):
        nxt = [[int(t)] for t in torch.randint(1, VOCAB, (len(forks),), generator=gen)]
        out = cache.forward(model, forks, nxt, logits="last")  # decode: one token per sequence
        for i, t in enumerate(nxt):
            paths[i] += t
            rows.append((list(paths[i]), out[i]))
    return rows, cache.stats()


def check_family(name, config, device, decode_steps):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    ref32 = transformers.AutoModelForCausalLM.from_config(config).to(device).eval()
    prompt = [int(t) for t in torch.randint(1, VOCAB, (13,), generator=gen)]  # 13 = 2 blocks + a partial one
    chunks = [[int(t) for t in torch.randint(1, VOCAB, (n,), generator=gen)] for n in (1, 4, 7)]
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        model = transformers.AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
        model.load_state_dict({k: v.to(dtype) for k, v in ref32.state_dict().items()})
        t0 = time.perf_counter()
        rows, stats = run_paged(model, device, prompt, chunks, decode_steps, torch.Generator().manual_seed(2))
        elapsed = time.perf_counter() - t0
        # reference models run plain SDPA (paged_attention without a batch falls back to it)
        err, own_err = 0.0, 0.0
        for tokens, got in rows:
            want32 = full_logits(ref32, tokens, device)[-1]
            err = max(err, (got.float() - want32).abs().max().item())
            if dtype != torch.float32:
                own = full_logits(model, tokens, device)[-1]
                own_err = max(own_err, (own - want32).abs().max().item())
        if dtype == torch.float32:
            bound = 2e-3
        else:
            bound = 2 * own_err + 0.05
        ok = err <= bound and stats["cow_copies"] >= 1
        results.append(dict(family=name, dtype=str(dtype).replace("torch.", ""), rows=len(rows), max_abs_err=err,
                            hf_own_bf16_err=own_err if dtype != torch.float32 else None, bound=bound,
                            cow_copies=stats["cow_copies"], seconds=round(elapsed, 3), ok=bool(ok)))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="llama only, 2 decode steps")
    args = p.parse_args(argv)
    global torch, transformers, pkv
    import torch
    import transformers

    import ponder.hf.kv as pkv

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    families = configs()
    if args.quick:
        families = {"llama": families["llama"]}
    results = []
    with torch.inference_mode():
        for name, config in families.items():
            results += check_family(name, config, device, decode_steps=2 if args.quick else 4)
    print(f"{'family':8} {'dtype':9} {'rows':>4} {'max|err|':>10} {'bound':>8} {'cow':>4} {'s':>6}  ok")
    for r in results:
        print(f"{r['family']:8} {r['dtype']:9} {r['rows']:>4} {r['max_abs_err']:>10.2e} {r['bound']:>8.2e} "
              f"{r['cow_copies']:>4} {r['seconds']:>6.2f}  {'ok' if r['ok'] else 'FAIL'}")
    ok = all(r["ok"] for r in results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=str(device), ok=ok, results=results), f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
