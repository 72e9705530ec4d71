"""The gathered layout of PagedKVCache: models that attend in their own code (ALiBi in the layer,
local windows built at init, windows only in the mask) run on the pool through the Cache API.

``PagedBatch.gathered()`` lays every row's keys out left-padded, like transformers' own padded
batches; ``cache.update`` returns the layer's whole K/V read from the pool, and the model builds
its own masks and biases. Every test compares with the model's own cache-free forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import ponder.hf.kv as pkv

VOCAB = 97


def _perturbed(model):
    with torch.no_grad():  # like trained weights: no parameter left at a constant init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def bloom(n_head=4):
    torch.manual_seed(0)
    cfg = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=n_head)
    return _perturbed(transformers.BloomForCausalLM(cfg))


def mpt():
    torch.manual_seed(1)
    cfg = transformers.MptConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=128)
    return _perturbed(transformers.MptForCausalLM(cfg))


def gpt_neo(window=4):
    torch.manual_seed(2)
    cfg = transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, window_size=window,
                                    attention_types=[[["global", "local"], 1]], max_position_embeddings=128)
    return _perturbed(transformers.GPTNeoForCausalLM(cfg))


@torch.inference_mode()
def full(model, tokens):
    return model(input_ids=torch.tensor([list(tokens)]), use_cache=False).logits[0].float()


def toks(rng, n):
    return [int(t) for t in rng.integers(3, VOCAB, size=n)]


def test_gathered_layout_left_pads_every_row_to_its_last_query():
    """Rows of pasts 9, 2 and 5 adding 1, 3 and 2 tokens: key index Lg - T + t holds position
    past + t of that row, the left padding is masked, and every real key reads its own slot."""
    spec = pkv.KVSpec(num_layers=1, num_kv_heads=1, head_dim=2)
    kv = pkv.PagedKVCache(spec, num_blocks=16, block_size=4)
    rows, pasts, adds = [], (9, 2, 5), (1, 3, 2)
    for i, past in enumerate(pasts):
        tokens = [10 * i + k for k in range(past)]  # no shared prefix
        seq, cached = kv.new_sequence(tokens)
        assert cached == 0
        kv.prepare([seq], [tokens])
        rows.append(seq)
    batch = kv.prepare(rows, [[7] * n for n in adds]).gathered()
    T, Lg = 3, max(pasts) + 3
    assert batch.key_mask.shape == batch.key_slots.shape == (3, Lg)
    assert batch.key_length == Lg and batch.gathered() is batch
    table = batch.block_tables.long()
    for b, (past, n) in enumerate(zip(pasts, adds)):
        shift = Lg - T - past
        assert batch.key_mask[b, :shift].sum() == 0 and bool(batch.key_mask[b, shift:].all())
        for j in range(past + n):  # key position j of row b sits at index shift + j
            want = int(table[b, j // 4]) * 4 + j % 4
            assert int(batch.key_slots[b, shift + j]) == want
        for t in range(n):
            assert shift + past + t == Lg - T + t
    kw = batch.model_kwargs()
    assert kw["attention_mask"] is batch.key_mask and "ponder_batch" not in kw


@pytest.mark.parametrize("make", [bloom, mpt, gpt_neo], ids=["bloom", "mpt", "gpt_neo"])
def test_alibi_and_local_models_are_exact_on_forks_and_uneven_steps(make):
    """BLOOM (ALiBi inside the layer), MPT (its own ALiBi attention), GPT-Neo (a 4-token local
    window): paged on the gathered layout; a cached prefix, forks copied on write, decode
    steps and chunks of different lengths in one batch all equal the cache-free forward."""
    model = make()
    assert pkv.paged_refusal(model) is None and pkv.paged_mode(model) == "gathered"
    kv = pkv.PagedKVCache.for_model(model, block_size=4, num_blocks=64)
    rng = np.random.default_rng(11)
    prompt = toks(rng, 10)
    seq, _ = kv.new_sequence(prompt)
    got = kv.forward(model, [seq], [prompt], logits="all")[0]
    torch.testing.assert_close(got, full(model, prompt), atol=1e-4, rtol=0)
    again, cached = kv.new_sequence(prompt + toks(rng, 3))  # the cached prefix is reused
    assert cached == 8
    other = toks(rng, 4)
    second, _ = kv.new_sequence(other)
    kids = [int(k) for k in kv.fork(seq, 2)]
    rows = [*kids, second]
    paths = {kids[0]: list(prompt), kids[1]: list(prompt), second: []}
    first = [toks(rng, 1), toks(rng, 5), other]
    for step in (first, [toks(rng, 1) for _ in rows], [toks(rng, n) for n in (3, 1, 2)]):
        got = kv.forward(model, rows, step, logits="all")
        for i, (s, t) in enumerate(zip(rows, step)):
            paths[s] += t
            torch.testing.assert_close(got[i, : len(t)], full(model, paths[s])[-len(t):], atol=1e-4, rtol=0)
    last = kv.forward(model, rows, [toks(rng, 1) for _ in rows])  # "last" logits, one decode step
    assert last.shape == (3, VOCAB)
    assert kv.stats()["cow_copies"] >= 1
    kv.free([*rows, seq, again])


def test_bloom_alibi_bias_with_odd_head_count_matches_its_own():
    """ALiBi slopes for a head count that is not a power of two (BLOOM's extra slopes)."""
    model = bloom(n_head=2)
    with torch.no_grad():
        model.transformer.h[0].self_attention.query_key_value.weight.mul_(4)  # sharp attention: the bias matters
    kv = pkv.PagedKVCache.for_model(model, block_size=4, num_blocks=32)
    rng = np.random.default_rng(3)
    a, b = toks(rng, 13), toks(rng, 2)
    sa, _ = kv.new_sequence(a)
    sb, _ = kv.new_sequence(b)
    got = kv.forward(model, [sa, sb], [a, b], logits="all")
    torch.testing.assert_close(got[0], full(model, a), atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1, :2], full(model, b), atol=1e-4, rtol=0)


def test_gpt_neo_with_a_window_the_probe_cannot_cross_is_still_exact():
    """A 256-token local window (GPT-Neo's real one) is built into a buffer at init: the short
    probe cannot cross it, so GPT-Neo never runs on the pool layout; a path longer than a
    small window is exact on the gathered one (checked with window 6, past 30 tokens)."""
    big = gpt_neo(window=256)
    assert pkv.paged_refusal(big) is None and pkv.paged_mode(big) == "gathered"
    model = gpt_neo(window=6)
    kv = pkv.PagedKVCache.for_model(model, block_size=4, num_blocks=64)
    rng = np.random.default_rng(5)
    path = toks(rng, 30)
    seq, _ = kv.new_sequence(path)
    kv.forward(model, [seq], [path])
    for _ in range(3):
        t = toks(rng, 1)
        path += t
        torch.testing.assert_close(kv.forward(model, [seq], [t])[0], full(model, path)[-1], atol=1e-4, rtol=0)


def test_a_pool_model_and_a_gathered_companion_share_the_sequences():
    """An implicit-PRM-like pair: a Llama on the pool layout and a BLOOM companion on the
    gathered layout over the same block tables (forks, copy on write): both exact."""
    torch.manual_seed(4)
    llama = _perturbed(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)))
    other = bloom()
    kv = pkv.PagedKVCache.for_model(llama, block_size=4, num_blocks=64)
    twin = kv.companion(other)
    assert pkv.paged_mode(llama) == "pool" and pkv.paged_mode(other) == "gathered"
    rng = np.random.default_rng(9)
    prompt = toks(rng, 6)
    seq, _ = kv.new_sequence(prompt)
    batch = kv.prepare([seq], [prompt])
    with torch.inference_mode():
        batch.run(llama)
        batch.on(twin).run(other)
    kids = [int(k) for k in kv.fork(seq, 2)]
    steps = [toks(rng, 3), toks(rng, 1)]
    batch = kv.prepare(kids, steps)
    with torch.inference_mode():
        a = batch.run(llama).logits.float()
        b = batch.on(twin).run(other).logits.float()
    for i, t in enumerate(steps):
        path = prompt + t
        torch.testing.assert_close(a[i, : len(t)], full(llama, path)[-len(t):], atol=1e-4, rtol=0)
        torch.testing.assert_close(b[i, : len(t)], full(other, path)[-len(t):], atol=1e-4, rtol=0)
