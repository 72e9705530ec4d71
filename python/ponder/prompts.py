"""How a problem becomes the policy's prompt: one rendering for every policy (HFPolicy,
OpenAIPolicy), so a remote policy continues exactly the text the in-process one would."""

from __future__ import annotations


def render_prompt(tokenizer, problem: str, system_prompt: str | None, use_chat_template: bool) -> str:
    """The prompt text: the tokenizer's chat template with the optional system prompt, the
    problem as the user turn and the generation prompt; the problem itself without a template."""
    if not use_chat_template:
        return problem
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": problem})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_token_ids(tokenizer, problem: str, system_prompt: str | None, use_chat_template: bool) -> list[int]:
    """The prompt's token ids. A chat template writes its own special tokens (BOS), so they are
    not added again; a plain prompt gets the tokenizer's (e.g. BOS)."""
    text = render_prompt(tokenizer, problem, system_prompt, use_chat_template)
    return list(tokenizer.encode(text, add_special_tokens=not use_chat_template))
