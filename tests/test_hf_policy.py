"""HFPolicy on tiny random models (``ponder.testing.tiny``, the ``dirs`` fixture of conftest),
fully offline: well-formed steps, chat-template roots, seeded determinism, sampling filters,
batched greedy == one problem at a time, prefill accounting and bad calls."""

from __future__ import annotations

import pytest
import torch

from ponder.hf.policy import HFPolicy
from ponder.hf.sampling import sample_next
from ponder.protocols import Policy, SamplingParams
from ponder.testing.tiny import QUESTIONS


def check_well_formed(step, params, eos_ids, tok):
    delim = params.step_delimiter
    assert 1 <= len(step.tokens) <= params.max_step_tokens
    assert step.text == tok.decode([t for t in step.tokens if t not in eos_ids], skip_special_tokens=False)
    before = tok.decode(step.tokens[:-1], skip_special_tokens=False)
    assert delim not in before, "the step runs past its first delimiter"
    if step.eos:
        assert step.tokens[-1] in eos_ids and not step.truncated
        return "eos"
    assert not any(t in eos_ids for t in step.tokens)
    if step.truncated:
        assert len(step.tokens) == params.max_step_tokens and delim not in step.text
        return "truncated"
    assert delim in step.text
    return "delimiter"


def test_policy_steps_are_well_formed_and_roots_use_the_chat_template(dirs):
    policy = HFPolicy(dirs["policy_llama"], system_prompt="Be brief.", kv_budget=4096, block_size=8)
    assert isinstance(policy, Policy)
    tok = policy.tokenizer
    prompts = policy.start([0, 1], QUESTIONS[:2])
    for q, p in zip(QUESTIONS, prompts):
        text = tok.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        assert p == tok.encode(text, add_special_tokens=False) and p[0] == tok.bos_token_id
    params = SamplingParams(temperature=1.0, max_step_tokens=5, seed=0)
    steps = policy.sample_steps([0] * 12 + [1] * 12, list(range(2, 26)), params)
    kinds = {check_well_formed(s, params, policy.eos_ids, tok) for s in steps}
    assert kinds == {"eos", "truncated", "delimiter"}
    # A second level from unfinished children, then a rollout; stats add up.
    live = [2 + i for i, s in enumerate(steps) if not s.eos][:4]
    more = policy.sample_steps(live, [100, 101, 102, 103], params)
    for s in more:
        check_well_formed(s, params, policy.eos_ids, tok)
    rolled = policy.rollout([100, 101], 3, SamplingParams(temperature=0.0, max_step_tokens=5))
    for row in rolled:
        assert 1 <= len(row) <= 3 and all(not s.eos for s in row[:-1])
    generated = sum(len(s.tokens) for s in steps + more) + sum(len(s.tokens) for r in rolled for s in r)
    st = policy.stats()
    assert st["tokens_generated"] == generated
    assert st["num_parameters"] == sum(p.numel() for p in policy.model.parameters()) > 0
    # A delimiter several tokens long is found across token boundaries too.
    long_delim = SamplingParams(temperature=1.0, max_step_tokens=12, seed=3, step_delimiter=" the")
    for s in policy.sample_steps([100] * 6, list(range(200, 206)), long_delim):
        check_well_formed(s, long_delim, policy.eos_ids, tok)


def test_policy_is_deterministic_for_a_seed(dirs):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=5, max_step_tokens=6, seed=7)

    def run(seed):
        pol = HFPolicy(dirs["policy_llama"], kv_budget=2048)
        pol.start([0, 1], QUESTIONS[:2])
        a = pol.sample_steps([0, 0, 0, 1, 1, 1], [2, 3, 4, 5, 6, 7], SamplingParams(**{**params.__dict__, "seed": seed}))
        b = pol.sample_steps([2, 3, 5], [8, 9, 10], SamplingParams(**{**params.__dict__, "seed": seed}))
        return [(s.tokens, s.eos, s.truncated) for s in a + b]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sample_next_filters():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0.0), None), greedy)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=1.0, top_k=1), g), greedy)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=1.0, top_p=1e-6), g), greedy)
    # top_k = 3: only the three best tokens are ever drawn.
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(20):
        picked = sample_next(logits, SamplingParams(temperature=5.0, top_k=3), g)
        assert all(picked[i] in top3[i] for i in range(4))


@pytest.mark.parametrize("which", ["policy_llama", "policy_qwen2"])
def test_batched_greedy_equals_one_problem_at_a_time(dirs, which):
    greedy = SamplingParams(temperature=0.0, max_step_tokens=6)

    def run(pol, roots, problems):
        pol.start(roots, problems)
        first = pol.sample_steps([r for r in roots for _ in range(2)], [10 + 10 * r + k for r in roots for k in (1, 2)], greedy)
        second = pol.sample_steps([11 + 10 * r for r in roots], [13 + 10 * r for r in roots], greedy)
        rolled = pol.rollout([12 + 10 * r for r in roots], 2, greedy)
        key = lambda s: (s.tokens, s.text, s.eos, s.truncated)
        return {
            r: ([key(s) for s in first[2 * i : 2 * i + 2]], key(second[i]), [key(s) for s in rolled[i]])
            for i, r in enumerate(roots)
        }

    batched = run(HFPolicy(dirs[which], kv_budget=2048, block_size=4), [0, 1, 2], QUESTIONS)
    single = HFPolicy(dirs[which], kv_budget=2048, block_size=4)
    for r, q in enumerate(QUESTIONS):
        assert run(single, [r], [q])[r] == batched[r]
        # Siblings of a greedy expansion are identical.
        assert batched[r][0][0] == batched[r][0][1]


def test_prefilled_tokens_equal_the_unique_tokens_of_the_tree(dirs):
    pol = HFPolicy(dirs["policy_plain"], kv_budget=4096, block_size=4)
    tok = pol.tokenizer
    problems = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0]]  # root 2 repeats root 0's prompt: forked
    prompts = pol.start([0, 1, 2], problems)
    assert prompts[0] == tok.encode(QUESTIONS[0]) and prompts[0][0] == tok.bos_token_id  # no template: BOS added
    assert prompts[2] == prompts[0]
    assert pol.stats()["tokens_prefilled"] == len(prompts[0]) + len(prompts[1])
    params = SamplingParams(temperature=1.0, max_step_tokens=6, seed=1)
    a = pol.sample_steps([0, 0, 1, 2, 2], [3, 4, 5, 6, 7], params)
    b = pol.sample_steps([3, 3, 5], [8, 9, 10], params)
    c = pol.sample_steps([8], [11], params)
    steps = {3: a[0], 4: a[1], 5: a[2], 6: a[3], 7: a[4], 8: b[0], 9: b[1], 10: b[2], 11: c[0]}
    expanded = {3, 5, 8}
    # Every prompt token once, every step token once, except the last token of steps whose node
    # was never expanded (it was sampled but running it through the model is not needed yet).
    unique = len(prompts[0]) + len(prompts[1]) + sum(len(s.tokens) for s in steps.values())
    assert pol.stats()["tokens_prefilled"] == unique - (len(steps) - len(expanded))
    # A rollout from node 9 runs its pending token once, then each lookahead step but its last token.
    before = pol.stats()["tokens_prefilled"]
    rolled = pol.rollout([9], 3, SamplingParams(temperature=0.0, max_step_tokens=4))[0]
    assert pol.stats()["tokens_prefilled"] - before == 1 + sum(len(s.tokens) for s in rolled) - 1
    # Releasing everything returns every block to the pool (cached full blocks stay evictable).
    pol.release(list(range(12)))
    pol.release([3, 999])  # idempotent
    kv = pol.stats()
    assert kv["live_nodes"] == 0 and kv["kv_blocks_in_use"] == 0


def test_policy_rejects_bad_calls(dirs):
    pol = HFPolicy(dirs["policy_llama"], kv_budget=1024, max_steps_per_rollout=2)
    pol.start([0], QUESTIONS[:1])
    p = SamplingParams(temperature=0.0, max_step_tokens=3)
    with pytest.raises(KeyError, match="not held"):
        pol.sample_steps([5], [6], p)
    with pytest.raises(ValueError, match="already held"):
        pol.sample_steps([0], [0], p)
    with pytest.raises(ValueError, match="repeat"):
        pol.sample_steps([0, 0], [1, 1], p)
    with pytest.raises(ValueError, match="max_steps_per_rollout"):
        pol.rollout([0], 3, p)
    with pytest.raises(ValueError, match="max_step_tokens"):
        pol.sample_steps([0], [1], SamplingParams(max_step_tokens=0))
    with pytest.raises(ValueError, match="already held"):
        pol.start([0], QUESTIONS[:1])
    assert pol.sample_steps([0], [1], p)[0].tokens  # still usable


def test_builtin_policy_warns_once_on_problems_it_cannot_read():
    """The shipped policies only understand builtin:arith's "Compute <expression>." problems:
    HFPolicy warns once (per policy) when given others, never on that form or on a user model."""
    import warnings

    from ponder.toy.builtin import is_builtin_model, resolve_model, unlike_builtin_problems

    assert is_builtin_model(resolve_model("builtin:policy-small")) and not is_builtin_model("/tmp/some-model")
    assert unlike_builtin_problems(["Compute (2 + 3) * 4.", "What is 2 + 2?"]) == ["What is 2 + 2?"]
    policy = HFPolicy("builtin:policy-small", device="cpu")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        policy.start([0], ["Compute 7 - 5."])
        assert not [w for w in seen if "only understands" in str(w.message)]
        policy.start([1, 2], ["What is 2 + 2?", "Name a prime."])
        policy.start([3], ["What is 3 + 3?"])
    said = [w for w in seen if "only understands" in str(w.message)]
    assert len(said) == 1 and "What is 2 + 2?" in str(said[0].message)
    policy.release([0, 1, 2, 3])
