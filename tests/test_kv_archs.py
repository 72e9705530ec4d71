"""Every causal LM of the installed transformers is exact on ponder's KV cache, or refused.

For each model type AutoModelForCausalLM knows, a random-weight model is built from its own
config class with tiny sizes (2 layers, hidden 64, vocabulary 100, sliding windows of 6 so
that the probes cross them). ``ponder.hf.kv_fallback.cache_for_model`` then gives either the
paged cache (the self-check accepted the model, on the pool or the gathered layout:
``ponder.hf.kv.paged_mode``) or the fallback (refused), and a workload of
its own (two prompts of different lengths in one batch, a fork, a one-token decode step and
a step of 3 / 1 / 2 tokens) must reproduce the model's cache-free forward on every path:
never silently wrong. The families issue 12 names must be exact on the *paged* path.

Model types that cannot be built tiny are skipped with the reason (their build error).
``PONDER_KV_COMPAT_OUT=path`` writes the sweep's table (docs/kv_compat.md is made from it).
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import ponder.hf.kv as pkv
from ponder.hf.kv_fallback import FallbackKVCache, cache_for_model

VOCAB = 100
SIZES = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=VOCAB, max_position_embeddings=256, n_positions=256,
    moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, shared_expert_intermediate_size=32, sliding_window=6, attention_window_size=6,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, sep_token_id=2, cls_token_id=1,
    n_inner=64, ffn_dim=64, d_ff=64, num_layers=2, decoder_layers=2, decoder_ffn_dim=64, decoder_attention_heads=4,
    first_k_dense_replace=1, is_decoder=True, rotary_dim=8, d_head=16, window_size=6,
)
# Per-type sizes the generic ones above get wrong.
OVERRIDES = {
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], num_heads=4),
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=1, state_size=8, chunk_size=16),
    "falcon_h1": dict(mamba_d_ssm=128, mamba_n_heads=8, mamba_d_state=8, mamba_chunk_size=16),
    "nemotron_h": dict(mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=16),
    "rwkv": dict(context_length=64),
    "hrm_text": dict(H_cycles=1, L_cycles=1),
    "prophetnet": dict(num_encoder_layers=1, num_decoder_layers=2, num_encoder_attention_heads=4,
                       num_decoder_attention_heads=4, encoder_ffn_dim=64),
}
# Issue 12: these must run on the paged path.
PAGED_FAMILIES = {"gpt_neox", "falcon", "opt", "bloom", "gpt_neo", "stablelm", "mpt", "phi", "gemma2", "gemma3_text",
                  "llama", "qwen2", "gpt2", "mistral"}
# Known not (yet) paged: they must be refused and exact on the fallback (see docs/kv_compat.md).
PAGED_PENDING: set[str] = set()
# They attend over their own layout of the pool: BLOOM (ALiBi in the layer), MPT and GPT-NeoX-Japanese
# (their own attention code), GPT-Neo (local layers), PhiMoE (its window is in the mask only).
GATHERED = {"bloom", "mpt", "gpt_neo", "gpt_neox_japanese", "phimoe"}
# Silently wrong on the pool layout before the self-check (they change K/V or the mask after
# cache.update): never on the pool layout.
NOT_POOL = {"diffllama", "jetmoe", "doge"}
MAX_PARAMS = 3_000_000
RESULTS: dict[str, tuple[str, str]] = {}


def _fields(cls) -> set[str]:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return names | set(getattr(cls, "attribute_map", None) or {})


def tiny_model(model_type: str):
    """The model type's causal LM with tiny sizes, float32, eval; pytest.skip with the build
    error when its config class or model cannot be built that small."""
    cls = CONFIG_MAPPING[model_type]
    names = _fields(cls)
    kw = {k: v for k, v in SIZES.items() if k in names}
    kw.update(OVERRIDES.get(model_type, {}))
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    arch = arch if isinstance(arch, str) else arch[0]
    try:
        config = cls(**kw)
        model_cls = getattr(transformers, arch)
        with torch.device("meta"):
            size = sum(p.numel() for p in model_cls(config).parameters())
        if size > MAX_PARAMS:
            raise ValueError(f"{size} parameters with the tiny sizes (sub-models keep their defaults)")
        torch.manual_seed(0)
        model = model_cls(config).eval()
        with torch.no_grad():  # like trained weights: no parameter left at a constant init
            for p in model.parameters():
                if p.is_floating_point():
                    p.add_(torch.randn_like(p) * 0.05)
        full(model, list(range(3, 15)))  # the model's own forward must run at this size
    except Exception as exc:  # noqa: BLE001 - the reason is the skip message
        first = (str(exc).strip().splitlines() or [""])[-1][:200]
        RESULTS[model_type] = ("skipped", f"cannot be built tiny: {type(exc).__name__}: {first}")
        pytest.skip(f"{model_type}: cannot be built tiny: {type(exc).__name__}: {first}")
    return model


@torch.inference_mode()
def full(model, tokens):
    return model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float()


@torch.inference_mode()
def run_workload(model, kv):
    """Max |cache - full| and max |full| over every new token of the workload."""
    g = torch.Generator().manual_seed(7)
    tok = lambda n: [int(t) for t in torch.randint(3, VOCAB, (n,), generator=g)]  # noqa: E731
    a, b = tok(8), tok(3)
    sa, ca = kv.new_sequence(a)
    sb, cb = kv.new_sequence(b)
    paths = {sa: a, sb: b}
    checks = []
    out = kv.forward(model, [sa, sb], [a[ca:], b[cb:]], logits="all")
    checks += [(out[0, : len(a) - ca], a, len(a) - ca), (out[1, : len(b) - cb], b, len(b) - cb)]
    kids = [int(k) for k in kv.fork(sa, 2)]
    rows = [kids[0], kids[1], sb]
    for chunk, mode in (((1, 1, 1), "last"), ((3, 1, 2), "all")):
        new = [tok(n) for n in chunk]
        for s, t in zip(rows, new):
            paths[s] = paths.get(s, a) + t
        out = kv.forward(model, rows, new, logits=mode)
        for i, (s, n) in enumerate(zip(rows, chunk)):
            checks.append((out[i][None] if mode == "last" else out[i, :n], list(paths[s]), 1 if mode == "last" else n))
    kv.free(rows + [sa])
    err = scale = 0.0
    for got, path, n in checks:
        ref = full(model, path)[-n:]
        err = max(err, float((got.float() - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    return err, scale


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_exact_or_refused(model_type):
    model = tiny_model(model_type)
    reason = pkv.paged_refusal(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kv = cache_for_model(model, block_size=4, token_budget=256)
    assert isinstance(kv, FallbackKVCache) == (reason is not None)
    err, scale = run_workload(model, kv)
    backend = f"paged ({pkv.paged_mode(model)})" if reason is None else f"fallback ({kv.mode})"
    RESULTS[model_type] = (backend, "" if reason is None else reason)
    assert err <= 1e-4 * max(scale, 1e-6), f"{model_type} on {backend}: max error {err:.3g}, logit scale {scale:.3g}"
    if reason is not None:
        stats = kv.stats()
        assert stats["backend"] == "fallback" and stats["reason"] == reason
        assert reason.startswith(type(model).__name__)
    if model_type in PAGED_FAMILIES - PAGED_PENDING:
        assert reason is None, reason
    if model_type in GATHERED:
        assert pkv.paged_mode(model) == "gathered"
    if model_type in NOT_POOL:
        assert reason is not None or pkv.paged_mode(model) == "gathered"


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    out = os.environ.get("PONDER_KV_COMPAT_OUT")
    if out and RESULTS:
        lines = ["| model type | class | backend | reason |", "|---|---|---|---|"]
        for mt in sorted(RESULTS):
            arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[mt]
            arch = arch if isinstance(arch, str) else arch[0]
            backend, why = RESULTS[mt]
            lines.append(f"| {mt} | {arch} | {backend} | {why.replace('|', '/')} |")
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
