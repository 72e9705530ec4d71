"""PagedKVCache under unmodified Hugging Face models: logits equal a full recompute.

Tiny random-weight Llama, Qwen2 and GPT-2 models are built from a config, saved with
``save_pretrained`` and loaded back offline with ``attn_implementation="ponder_paged"``.
The reference for every sequence is the same model run on the sequence's whole token list with
no cache (the ponder_paged attention falls back to SDPA without a PagedBatch).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import transformers

import ponder.hf.kv as pkv

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
    # Sliding-window layers are held (the attention applies the window); recurrent ones are not.
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    assert pkv.kv_spec_of(cfg).num_layers == 2
    cfg = transformers.Qwen3NextConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ValueError, match="linear_attention"):
        pkv.kv_spec_of(cfg)
    cfg = transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                                    attention_types=[[["global", "local"], 1]])
    assert pkv.kv_spec_of(cfg).num_layers == 2  # local layers: the gathered layout applies them


def test_sliding_window_is_applied_from_the_pool():
    """Mistral with a 5-token window, prompts and chunks much longer than it: paged == full."""
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=5)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    kv = pkv.PagedKVCache.for_model(model, block_size=4, num_blocks=64)
    rng = np.random.default_rng(3)
    prompt = rng_tokens(rng, 19)
    seq, _ = kv.new_sequence(prompt)
    kv.forward(model, [seq], [prompt])
    kids = kv.fork(seq, 2)
    paths = [prompt + rng_tokens(rng, 9), prompt + rng_tokens(rng, 1)]
    got = kv.forward(model, kids, [p[len(prompt):] for p in paths], logits="all")
    torch.testing.assert_close(got[0, :9], full_logits(model, paths[0])[-9:], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1, :1], full_logits(model, paths[1])[-1:], atol=1e-4, rtol=0)
    for _ in range(3):  # decode steps: the window is applied there too
        step = [rng_tokens(rng, 1) for _ in kids]
        got = kv.forward(model, kids, step)
        for i in range(2):
            paths[i] += step[i]
            torch.testing.assert_close(got[i], full_logits(model, paths[i])[-1], atol=1e-4, rtol=0)


def _tiny(cls_name, **extra):
    torch.manual_seed(0)
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    cfg = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, **extra)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # like trained weights: no parameter left at a constant init (Doge's A is 0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def refuse_diffllama(monkeypatch):
    """DiffLlama refused by the self-check (it runs exactly on the gathered layout, so the
    fallback tests force its refusal); every other model is probed as usual."""
    probe = pkv._probe_run

    def refusing(model, own, *, gathered):
        if type(model).__name__ == "DiffLlamaForCausalLM":
            return "DiffLlamaForCausalLM: refused for this test"
        return probe(model, own, gathered=gathered)

    monkeypatch.setattr(pkv, "_probe_run", refusing)


@pytest.mark.parametrize("arch", ["DiffLlamaForCausalLM", "JetMoeForCausalLM", "DogeForCausalLM"])
def test_models_the_pool_would_get_wrong_run_on_the_gathered_layout(arch):
    """These models change K/V or the mask after cache.update; the ponder_paged attention reads
    the pool and would be wrong by O(1). The self-check refuses the pool layout and puts them
    on the gathered layout (their own attention over the K/V update returns), where a prefill,
    forks and uneven steps equal their cache-free forward."""
    model = _tiny(arch)
    assert pkv._probe_run(model, pkv._own_attention(model), gathered=False) is not None
    assert pkv.paged_refusal(model) is None and pkv.paged_mode(model) == "gathered"
    assert model.config._attn_implementation != pkv.ATTN_IMPLEMENTATION  # it runs on its own attention
    kv = pkv.PagedKVCache.for_model(model, block_size=4, num_blocks=64)
    rng = np.random.default_rng(4)
    prompt = rng_tokens(rng, 9)
    seq, _ = kv.new_sequence(prompt)
    torch.testing.assert_close(kv.forward(model, [seq], [prompt], logits="all")[0], full_logits(model, prompt),
                               atol=1e-4, rtol=0)
    kids = [int(k) for k in kv.fork(seq, 2)]
    paths = {k: list(prompt) for k in kids}
    for chunk in ((3, 1), (1, 1), (2, 5)):
        new = [rng_tokens(rng, n) for n in chunk]
        got = kv.forward(model, kids, new, logits="all")
        for i, (k, t) in enumerate(zip(kids, new)):
            paths[k] += t
            torch.testing.assert_close(got[i, : len(t)], full_logits(model, paths[k])[-len(t):], atol=1e-4, rtol=0)


def test_self_check_turns_paged_path_exceptions_into_refusals(monkeypatch):
    model = _tiny("LlamaForCausalLM")

    def broken(*args, **kwargs):
        raise RuntimeError("boom in the paged path")

    monkeypatch.setattr(pkv.PagedKVCache, "update", broken)
    reason = pkv.paged_refusal(model)
    assert reason == ("LlamaForCausalLM: the paged KV path fails on a probe (RuntimeError: boom in the paged path); "
                      "on the gathered layout: fails on a probe (RuntimeError: boom in the paged path)")
    assert pkv.paged_refusal(model) is reason  # once per model


def test_cache_for_model_falls_back_once_with_a_warning_and_stays_exact(refuse_diffllama):
    from ponder.hf.kv_fallback import FallbackKVCache, cache_for_model

    model = _tiny("DiffLlamaForCausalLM")
    with pytest.warns(RuntimeWarning, match="DiffLlamaForCausalLM: refused for this test"):
        kv = cache_for_model(model, block_size=4, token_budget=64)
    assert isinstance(kv, FallbackKVCache) and kv.mode == "cache"
    st = kv.stats()
    assert st["backend"] == "fallback" and st["reason"].startswith("DiffLlamaForCausalLM")
    rng = np.random.default_rng(5)
    prompt = rng_tokens(rng, 9)
    seq, cached = kv.new_sequence(prompt)
    assert cached == 0
    kv.forward(model, [seq], [prompt])
    kids = kv.fork(seq, 3)
    paths = [prompt + rng_tokens(rng, n) for n in (1, 4, 2)]
    got = kv.forward(model, kids, [p[9:] for p in paths], logits="all")
    for i, p in enumerate(paths):
        n = len(p) - 9
        torch.testing.assert_close(got[i, :n], full_logits(model, p)[-n:], atol=1e-4, rtol=0)
    kv.free(kids)
    kv.free([seq])
    assert kv.stats()["blocks_in_use"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second cache for the same model does not warn again
        cache_for_model(model, token_budget=64)


def _save_with_tokenizer(path, arch, seed=0):
    from ponder.testing.tiny import make_tokenizer

    tok = make_tokenizer("llama" if arch != "ms" else "ms")
    torch.manual_seed(seed)
    cls = "DiffLlamaForCausalLM" if arch in ("diffllama", "ms") else "LlamaForCausalLM"
    cfg = getattr(transformers, cls.replace("ForCausalLM", "Config"))(
        vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, eos_token_id=tok.eos_token_id, pad_token_id=2, tie_word_embeddings=False)
    model = getattr(transformers, cls)(cfg)
    with torch.no_grad():  # make EOS and blank lines likely so steps end both ways
        for t in {tok.eos_token_id, *tok.encode("\n\n", add_special_tokens=False)}:
            model.lm_head.weight[t] *= 8
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


def test_policy_on_a_refused_model_searches_exactly_on_the_fallback(tmp_path, refuse_diffllama):
    """HFPolicy on DiffLlama: greedy steps (forks, decode, rollout) equal the argmax of the
    model's cache-free forward over each path, and stats() reports the fallback."""
    from ponder.hf.policy import HFPolicy
    from ponder.protocols import SamplingParams

    path, tok = _save_with_tokenizer(tmp_path / "diff", "diffllama")
    with pytest.warns(RuntimeWarning, match="DiffLlamaForCausalLM"):
        pol = HFPolicy(path, device="cpu", kv_budget=1024, block_size=4)
    st = pol.stats()
    assert st["kv_backend"] == "fallback" and st["kv_reason"].startswith("DiffLlamaForCausalLM")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    greedy = SamplingParams(temperature=0.0, max_step_tokens=5)
    prompts = pol.start([0, 1], ["What is 2 + 3?", "Compute 4 * 6 - 5."])
    steps = pol.sample_steps([0, 0, 1], [2, 3, 4], greedy)
    more = pol.sample_steps([2, 4], [5, 6], greedy)
    rolled = pol.rollout([5], 2, greedy)
    walks = [(prompts[0], [steps[0]]), (prompts[0], [steps[1]]), (prompts[1], [steps[2]]),
             (prompts[0], [steps[0], more[0]]), (prompts[1], [steps[2], more[1]]),
             (prompts[0], [steps[0], more[0], *rolled[0]])]
    checked = 0
    for prompt, chain in walks:
        seq = list(prompt)
        for step in chain:
            for t in step.tokens:
                assert int(full_logits(ref, seq)[-1].argmax()) == t
                seq.append(t)
                checked += 1
    assert checked >= 10
    pol.release(range(7))
    assert pol.stats()["kv_blocks_in_use"] == 0


def test_prms_on_refused_models_score_exactly_on_the_fallback(tmp_path, refuse_diffllama):
    """A math-shepherd PRM that is a DiffLlama, and an implicit PRM whose model is a DiffLlama
    over a Llama reference (the companion goes to the fallback with it): scores equal the
    published full-path usage."""
    from ponder.hf.prm import HFPRM
    from ponder.testing.prm_reference import ref_implicit, ref_math_shepherd
    from ponder.testing.tiny import QUESTIONS, STEPS

    ms, ms_tok = _save_with_tokenizer(tmp_path / "ms", "ms")
    with pytest.warns(RuntimeWarning, match="DiffLlamaForCausalLM"):
        prm = HFPRM(ms, format="math-shepherd", device="cpu", kv_budget=1024, block_size=4)
    assert prm.stats()["kv_backend"] == "fallback"
    model = transformers.AutoModelForCausalLM.from_pretrained(ms, local_files_only=True).eval()
    prm.start([0], [QUESTIONS[1]])
    s1 = prm.score_steps([0, 0], [1, 2], [STEPS[1], STEPS[5]])
    s2 = prm.score_steps([1], [3], [STEPS[2]], lookahead=[[STEPS[7]]])
    with torch.inference_mode():
        want = [ref_math_shepherd(model, ms_tok, QUESTIONS[1], [STEPS[1]])[-1],
                ref_math_shepherd(model, ms_tok, QUESTIONS[1], [STEPS[5]])[-1],
                ref_math_shepherd(model, ms_tok, QUESTIONS[1], [STEPS[1], STEPS[2], STEPS[7]])[-1]]
    np.testing.assert_allclose(s1 + s2, want, atol=1e-4, rtol=0)

    reference, _ = _save_with_tokenizer(tmp_path / "ref", "llama", seed=1)
    implicit, tok = _save_with_tokenizer(tmp_path / "implicit", "diffllama", seed=2)
    with pytest.warns(RuntimeWarning, match="DiffLlamaForCausalLM"):
        prm = HFPRM(implicit, format="implicit-prm", reference=reference, beta=0.5, device="cpu",
                    kv_budget=1024, block_size=4)
    assert prm.stats()["kv_backend"] == "fallback" and prm.ref_kv.group is prm.kv.group
    prm.start([0], [QUESTIONS[0]])
    got = prm.score_steps([0, 0], [1, 2], [STEPS[0], STEPS[3]])
    got += prm.score_steps([1], [3], [STEPS[4]])
    m = transformers.AutoModelForCausalLM.from_pretrained(implicit, local_files_only=True).eval()
    r = transformers.AutoModelForCausalLM.from_pretrained(reference, local_files_only=True).eval()
    with torch.inference_mode():
        want = [ref_implicit(m, r, tok, QUESTIONS[0], [STEPS[0]])[-1], ref_implicit(m, r, tok, QUESTIONS[0], [STEPS[3]])[-1],
                ref_implicit(m, r, tok, QUESTIONS[0], [STEPS[0], STEPS[4]])[-1]]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


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


def test_gpt_neo_loads_as_ponder_paged_and_runs_its_local_layers_on_the_gathered_layout(tmp_path):
    """GPT-Neo picks its attention class by name (a KeyError for ponder_paged before): it loads,
    and its local layers (a window built into a buffer at init, which neither ponder_paged nor
    the probe can shrink) put it on the gathered layout, where prompts and chunks longer than
    the window reproduce its own logits."""
    from ponder.hf.kv_fallback import cache_for_model

    torch.manual_seed(0)
    cfg = transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, window_size=4,
                                    attention_types=[[["global", "local"], 1]], max_position_embeddings=128)
    transformers.GPTNeoForCausalLM(cfg).save_pretrained(tmp_path)
    model = load(tmp_path)
    assert pkv.paged_refusal(model) is None and pkv.paged_mode(model) == "gathered"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kv = cache_for_model(model, block_size=4, token_budget=64)
    assert isinstance(kv, pkv.PagedKVCache)
    rng = np.random.default_rng(2)
    prompt = rng_tokens(rng, 9)
    seq, _ = kv.new_sequence(prompt)
    kv.forward(model, [seq], [prompt])
    kids = kv.fork(seq, 2)
    paths = [prompt + rng_tokens(rng, 3), prompt + rng_tokens(rng, 1)]
    got = kv.forward(model, kids, [p[9:] for p in paths], logits="all")
    torch.testing.assert_close(got[0, :3], full_logits(model, paths[0])[-3:], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1, :1], full_logits(model, paths[1])[-1:], atol=1e-4, rtol=0)
