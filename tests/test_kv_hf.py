"""PagedKVCache under unmodified Hugging Face models: logits equal a full recompute.

Tiny random-weight Llama, Qwen2 and GPT-2 models are built from a config, saved with
``save_pretrained`` and loaded back offline with ``attn_implementation="ponder_paged"``.
The reference for every sequence is the same model run on the sequence's whole token list with
no cache (the ponder_paged attention falls back to SDPA without a PagedBatch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import ponder.kv as pkv

VOCAB = 97


def _configs():
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    return {
        "llama": transformers.LlamaConfig(num_key_value_heads=2, max_position_embeddings=512, **common),
        "qwen2": transformers.Qwen2Config(num_key_value_heads=1, max_position_embeddings=512, **common),
        "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                        bos_token_id=0, eos_token_id=0),
    }


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def model_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    config = _configs()[request.param]
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path


def load(path, dtype=torch.float32):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=pkv.ATTN_IMPLEMENTATION, local_files_only=True
    )
    return model.eval()


@torch.inference_mode()
def full_logits(model, tokens):
    """Reference: the whole sequence from scratch, no cache. float32 [len(tokens), vocab]."""
    return model(input_ids=torch.tensor([list(tokens)])).logits[0].float()


def rng_tokens(rng, n):
    return [int(t) for t in rng.integers(1, VOCAB, size=n)]


def test_prefill_fork_chunks_and_decode_match_full_recompute(model_dir):
    model = load(model_dir)
    rng = np.random.default_rng(0)
    kv = pkv.PagedKVCache.for_model(model, block_size=8, num_blocks=64)
    prompt = rng_tokens(rng, 21)  # longer than two blocks, ends inside a partial block
    seq, cached = kv.new_sequence(prompt)
    assert cached == 0
    got = kv.forward(model, [seq], [prompt], logits="all")[0]
    torch.testing.assert_close(got, full_logits(model, prompt), atol=1e-4, rtol=0)

    # Fork inside the partial block; every child appends a different chunk (copy-on-write).
    kids = kv.fork(seq, 4)
    paths = {int(k): list(prompt) for k in kids}
    chunks = [rng_tokens(rng, n) for n in (1, 3, 8, 11)]
    got = kv.forward(model, kids, chunks, logits="all")
    for i, k in enumerate(kids):
        paths[int(k)] += chunks[i]
        ref = full_logits(model, paths[int(k)])[-len(chunks[i]):]
        torch.testing.assert_close(got[i, : len(chunks[i])], ref, atol=1e-4, rtol=0)
    assert kv.stats()["cow_copies"] >= 3

    # Batched single-token decode (the paged decode kernel) for a few steps.
    for _ in range(5):
        step = [rng_tokens(rng, 1) for _ in kids]
        got = kv.forward(model, kids, step, logits="last")
        for i, k in enumerate(kids):
            paths[int(k)] += step[i]
            torch.testing.assert_close(got[i], full_logits(model, paths[int(k)])[-1], atol=1e-4, rtol=0)

    # A second fork generation from one child, then the parent is freed.
    grandkids = kv.fork(int(kids[1]), 2)
    kv.free(kids)
    steps = [rng_tokens(rng, 5), rng_tokens(rng, 2)]
    got = kv.forward(model, grandkids, steps, logits="last")
    for i, g in enumerate(grandkids):
        ref = full_logits(model, paths[int(kids[1])] + steps[i])[-1]
        torch.testing.assert_close(got[i], ref, atol=1e-4, rtol=0)


def test_cached_prefix_is_reused_and_eviction_stays_correct(model_dir):
    model = load(model_dir)
    rng = np.random.default_rng(1)
    kv = pkv.PagedKVCache.for_model(model, block_size=4, num_blocks=24)
    prompt = rng_tokens(rng, 18)
    seq, _ = kv.new_sequence(prompt)
    kv.forward(model, [seq], [prompt])
    kv.free([seq])

    # Same prompt again: its full blocks come from the index and only the rest is computed.
    again, cached = kv.new_sequence(prompt)
    assert cached == 16
    got = kv.forward(model, [again], [prompt[cached:]], logits="all")[0]
    torch.testing.assert_close(got[: len(prompt) - cached], full_logits(model, prompt)[cached:], atol=1e-4, rtol=0)
    kv.free([again])

    # Unrelated prompts fill the pool and force evictions of the cached prefix.
    for _ in range(3):
        other = rng_tokens(rng, 40)
        s, c = kv.new_sequence(other)
        got = kv.forward(model, [s], [other[c:]])
        torch.testing.assert_close(got[0], full_logits(model, other)[-1], atol=1e-4, rtol=0)
        kv.free([s])
    assert kv.stats()["evictions"] > 0
    s, c = kv.new_sequence(prompt)
    assert c < 16
    got = kv.forward(model, [s], [prompt[c:]])
    torch.testing.assert_close(got[0], full_logits(model, prompt)[-1], atol=1e-4, rtol=0)


def test_pool_full_raises_and_leaves_cache_usable(model_dir):
    model = load(model_dir)
    kv = pkv.PagedKVCache.for_model(model, block_size=4, num_blocks=4)
    seq, _ = kv.new_sequence([1, 2, 3])
    with pytest.raises(pkv.KVCacheFull):
        kv.forward(model, [seq], [list(range(1, 30))])
    assert kv.seq_lens([seq]).tolist() == [0]
    got = kv.forward(model, [seq], [[1, 2, 3]])
    torch.testing.assert_close(got[0], full_logits(model, [1, 2, 3])[-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_error_is_within_twice_hf_own_error(model_dir, dtype):
    """fp16/bf16: ponder's error vs an fp32 recompute is at most 2x (+ 1e-2) the error of
    transformers' own SDPA path in the same dtype."""
    dt = getattr(torch, dtype)
    ref32 = load(model_dir)
    model = load(model_dir, dtype=dt)
    rng = np.random.default_rng(2)
    kv = pkv.PagedKVCache.for_model(model, block_size=8, num_blocks=32)
    prompt = rng_tokens(rng, 13)
    seq, _ = kv.new_sequence(prompt)
    kv.forward(model, [seq], [prompt])
    kids = kv.fork(seq, 2)
    conts = [rng_tokens(rng, 3), rng_tokens(rng, 1)]
    got = kv.forward(model, kids, conts, logits="last").float()
    for i in range(2):
        full = prompt + conts[i]
        exact = full_logits(ref32, full)[-1]
        hf_err = (full_logits(model, full)[-1] - exact).abs().max().item()
        ours = (got[i] - exact).abs().max().item()
        assert ours <= 2 * hf_err + 1e-2, (ours, hf_err)


def test_for_model_sizing_and_errors(model_dir, monkeypatch):
    model = load(model_dir)
    spec = pkv.kv_spec_of(model.config)
    kv = pkv.PagedKVCache.for_model(model, block_size=16, token_budget=100)
    assert kv.num_blocks == 7 and kv.k[0].shape == (7, 16, spec.num_kv_heads, spec.head_dim)
    assert len(kv.k) == spec.num_layers
    kv = pkv.PagedKVCache.for_model(model, block_size=16, memory_fraction=1e-4)
    assert kv.num_blocks >= 1
    with pytest.raises(ValueError, match="does not fit"):
        pkv.PagedKVCache.for_model(model, token_budget=10**15)
    with pytest.raises(ValueError, match="memory_fraction"):
        pkv.PagedKVCache.for_model(model, memory_fraction=1.5)
    with pytest.raises(ValueError, match="at most one"):
        pkv.PagedKVCache.for_model(model, token_budget=10, num_blocks=2)
    kv = pkv.PagedKVCache.for_model(model, block_size=16, token_budget=100)
    monkeypatch.setattr(pkv, "_free_bytes", lambda device: 1000)
    with pytest.raises(ValueError, match="the companion KV cache does not fit: 7 blocks x 16 tokens"):
        kv.companion(model)
    assert not kv._companions


def test_unsupported_layouts_are_rejected_with_a_clear_error():
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    with pytest.raises(ValueError, match="sliding"):
        pkv.kv_spec_of(cfg)


def test_update_without_batch_explains_what_to_do(model_dir):
    model = load(model_dir)
    kv = pkv.PagedKVCache.for_model(model, num_blocks=4)
    with pytest.raises(ValueError, match="PagedBatch"):
        model(input_ids=torch.tensor([[1, 2]]), position_ids=torch.tensor([[0, 1]]), cache=kv, use_cache=True)


def test_companion_cache_runs_a_second_model_over_the_same_sequences(model_dir):
    """A companion shares the block tables: forks, copy-on-write and cached prefixes of the
    primary hold for the second model (another architecture and seed), whose logits equal a
    full recompute of each path."""
    model = load(model_dir)
    torch.manual_seed(5)
    other = transformers.AutoModelForCausalLM.from_config(_configs()["qwen2"])
    other.set_attn_implementation(pkv.ATTN_IMPLEMENTATION)
    other.eval()
    rng = np.random.default_rng(7)
    kv = pkv.PagedKVCache.for_model(model, block_size=4, num_blocks=64)
    twin = kv.companion(other)
    assert twin.manager is kv.manager and twin.spec == pkv.kv_spec_of(other.config)

    def run(seqs, tokens):
        batch = kv.prepare(seqs, tokens)
        with torch.inference_mode():
            a = model(**batch.model_kwargs()).logits.float()
            b = other(**batch.on(twin).model_kwargs()).logits.float()
        return a, b

    prompt = rng_tokens(rng, 10)  # ends inside a block: forks copy it on write
    seq, _ = kv.new_sequence(prompt)
    run([seq], [prompt])
    kids = [int(k) for k in kv.fork(seq, 3)]
    chunks = [rng_tokens(rng, n) for n in (1, 4, 7)]
    a, b = run(kids, chunks)
    assert kv.stats()["cow_copies"] >= 2
    for i, c in enumerate(chunks):
        path = prompt + c
        torch.testing.assert_close(a[i, : len(c)], full_logits(model, path)[-len(c):], atol=1e-4, rtol=0)
        torch.testing.assert_close(b[i, : len(c)], full_logits(other, path)[-len(c):], atol=1e-4, rtol=0)
    # A new sequence over a cached prefix reads the companion's pool too.
    kv.free(kids)
    again, cached = kv.new_sequence(prompt + chunks[2])
    assert cached == 16
    rest = (prompt + chunks[2])[cached:]
    a, b = run([again], [rest])
    torch.testing.assert_close(b[0, : len(rest)], full_logits(other, prompt + chunks[2])[cached:], atol=1e-4, rtol=0)

    with pytest.raises(ValueError, match="companion"):
        twin.prepare([again], [[1]])
    with pytest.raises(ValueError, match="companion"):
        twin.companion(other)
    stranger = pkv.PagedKVCache.for_model(other, block_size=4, num_blocks=8)
    with pytest.raises(ValueError, match="block manager"):
        kv.prepare([again], [[1]]).on(stranger)
    # a cache built on another's manager must have its shape
    with pytest.raises(ValueError, match="64 blocks of 4 tokens, not 8 of 4"):
        pkv.PagedKVCache(pkv.kv_spec_of(other.config), num_blocks=8, block_size=4, manager=kv.manager)
