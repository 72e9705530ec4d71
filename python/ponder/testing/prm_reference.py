"""Each PRM format's *published usage*, written out independently of ``ponder.hf.prm``.

The oracle for incremental PRM scoring: the whole path rendered as text, tokenized at once and
run through a plain (no cache) model, the score read at every step tag. ``ref_*(..., question,
steps)`` returns one float per step (the score of the path cut after that step); a path's
incremental score must equal the last one. Models run in ``torch.inference_mode``.
"""

from __future__ import annotations

import math

import torch
import transformers

from ponder.testing.tiny import load_plain_lm

__all__ = ["QWEN_SYSTEM", "ref_implicit", "ref_math_shepherd", "ref_qwen", "ref_rlhflow", "reference_for"]


@torch.inference_mode()
def ref_math_shepherd(model, tok, question, steps):
    """The model card / search-and-learn usage: blank-line delimiters become ' ки\\n\\n', a
    final tag is added, the whole text is encoded (BOS included) and scored at every tag."""
    text = (question + " " + "".join(steps)).replace("\n\n", " ки\n\n")
    if not text.endswith("\n\n"):
        text += " ки"
    ids = tok.encode(text)
    tag = tok.convert_tokens_to_ids(" ки")
    good, bad = tok.encode("+", add_special_tokens=False)[-1], tok.encode("-", add_special_tokens=False)[-1]
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    pos = [i for i, t in enumerate(ids) if t == tag]
    assert len(pos) == len(steps)
    return logits[pos][:, [good, bad]].softmax(-1)[:, 0].tolist()


@torch.inference_mode()
def ref_rlhflow(model, tok, question, steps):
    """search-and-learn's RLHFlow scoring: for every k the conversation of the first k steps is
    rendered and encoded in full; the score is read at position -3 (predicting the final '+')."""
    plus, minus = tok.encode("+", add_special_tokens=False)[-1], tok.encode("-", add_special_tokens=False)[-1]
    conv, out = [], []
    for k, s in enumerate(steps):
        piece = s.split("\n\n")[0]
        conv.append({"role": "user", "content": question + " " + piece if k == 0 else piece})
        conv.append({"role": "assistant", "content": "+"})
        ids = tok.encode(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)
        assert ids[-2] == plus
        logits = model(input_ids=torch.tensor([ids])).logits[0, -3, [plus, minus]]
        out.append(logits.softmax(-1)[0].item())
    return out


#: the system prompt of the Qwen2.5-Math-PRM model card
QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@torch.inference_mode()
def ref_qwen(score_fn, tok, question, steps, system=QWEN_SYSTEM):
    """The Qwen2.5-Math-PRM model card: system + user + assistant '<extra_0>'-joined steps,
    ``tokenizer.encode`` of the rendered string, softmax(logits)[1] at every <extra_0>."""
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": question},
        {"role": "assistant", "content": "<extra_0>".join(s.strip() for s in steps) + "<extra_0>"},
    ]
    ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
    sep = tok.encode("<extra_0>")[0]
    logits = score_fn(torch.tensor([ids]))[0]  # [T, 2]
    mask = torch.tensor(ids) == sep
    return logits[mask].softmax(-1)[:, 1].tolist()


@torch.inference_mode()
def ref_implicit(model, ref_model, tok, question, steps, beta=0.5):
    """EurusPRM's usage: the chat of the question and the "\n\n"-joined steps, per-token
    log pi - log pi_ref summed with coefficient beta from the first token after the question
    part. Step k reads the sum over the rendering of its first k steps cut at the end of the
    turn, encoded on its own (the same as slicing the whole path's sums wherever the cut is a
    token boundary). sigmoid of it for every step."""
    marker = "PONDERSTEPSENTINEL"
    probe = tok.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": marker}],
                                    tokenize=False)
    answer_start = len(tok.encode(probe[: probe.find(marker)].rstrip(), add_special_tokens=False))
    out = []
    for k in range(1, len(steps) + 1):
        text = tok.apply_chat_template(
            [{"role": "user", "content": question},
             {"role": "assistant", "content": "\n\n".join(s.strip() for s in steps[:k])}],
            tokenize=False)
        x = torch.tensor([tok.encode(text[: text.rfind(tok.eos_token)], add_special_tokens=False)])
        logp, logp_ref = model(input_ids=x).logits[0].log_softmax(-1), ref_model(input_ids=x).logits[0].log_softmax(-1)
        ratio = (logp - logp_ref).double()
        per_token = ratio[:-1].gather(-1, x[0, 1:, None]).squeeze(-1)  # [T-1]: token t+1
        q = beta * per_token[answer_start - 1 :].sum().item()
        out.append(1.0 / (1.0 + math.exp(-q)))
    return out


def reference_for(name: str, dirs: dict):
    """(HFPRM directory, reference function(question, steps) -> per-step scores) for format case
    ``name`` (math-shepherd, rlhflow, rlhflow-unstable, implicit-prm, qwen-prm, qwen-prm-native)
    over ``dirs`` as ``ponder.testing.tiny.save_test_models`` builds it."""
    if name == "math-shepherd":
        path = dirs["ms"]
        model, tok = load_plain_lm(path), transformers.AutoTokenizer.from_pretrained(path)
        return path, lambda q, s: ref_math_shepherd(model, tok, q, s)
    if name in ("rlhflow", "rlhflow-unstable"):
        path = dirs["rlhflow" if name == "rlhflow" else "unstable"]
        model, tok = load_plain_lm(path), transformers.AutoTokenizer.from_pretrained(path)
        return path, lambda q, s: ref_rlhflow(model, tok, q, s)
    if name == "implicit-prm":
        path = dirs["implicit"]
        model, ref = load_plain_lm(path), load_plain_lm(dirs["implicit_ref"])
        tok = transformers.AutoTokenizer.from_pretrained(path)
        return path, lambda q, s: ref_implicit(model, ref, tok, q, s)
    if name == "qwen-prm":
        path = dirs["qwen_cls"]
        model = transformers.AutoModelForTokenClassification.from_pretrained(path, local_files_only=True).eval()
        tok = transformers.AutoTokenizer.from_pretrained(path)
        return path, lambda q, s: ref_qwen(lambda ids: model(input_ids=ids).logits, tok, q, s)
    path = dirs["qwen_native"]
    base, head = dirs["native_modules"]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return path, lambda q, s: ref_qwen(lambda ids: head(base(input_ids=ids).last_hidden_state), tok, q, s)
