"""``ponder toy train``: (re)train the built-in models of ``builtin:arith`` from a seed.

The data path, one stage per function, each written to ``OUT/<stage>`` and skipped on a rerun
once finished (so an interrupted run resumes; a stage in flight restarts from its last
checkpoint):

1. ``policy-small`` / ``policy-large``: Llama causal LMs (``ponder.toy.builtin``) trained on
   reference solutions of generated training problems (:func:`ponder.toy.arith.train_stream`'s
   generator, evaluation expressions excluded), loss on the solution tokens only. The small one
   starts from scratch; the large one is *grown* from the trained small one (:func:`grow`:
   twice the width and one more layer, computing the same function) and trained on further
   batches: a 5x model trained from scratch would see a fifth of the small one's tokens in the
   same CPU time and end up worse than it.
   Batch ``k`` is a function of ``(seed, stage, k)``: one level per batch (levels cycle, so every
   level gets the same number of tokens) filled up to ``tokens_per_batch`` padded tokens.
2. ``samples``: solutions sampled from the *saved* small policy by ponder's own engine
   (``ponder.search`` majority voting, so the steps are split exactly as a search splits them),
   on fresh training problems, labelled step by step with :func:`ponder.toy.arith.label_steps`,
   appended to ``samples.jsonl`` batch by batch.
3. ``prm``: an *implicit PRM* (format ``implicit-prm``: EurusPRM's, arXiv 2412.01981) with the
   large policy as its reference: step k scores sigmoid(q_k), q_k = beta * the sum of
   log pi_prm - log pi_ref over the answer's tokens up to the end of step k. The PRM's model is
   the large policy trained ``prm_lm_steps`` more steps on fresh reference solutions (a verifier
   that knows more arithmetic than the policy it is compared with, as real PRMs are tuned from
   stronger math models), taken at inverse temperature alpha (its final RMSNorm gain times
   alpha), so its log-ratio penalises every token in proportion to how unlikely the PRM finds it,
   relative to the large policy. alpha (from ``prm_inverse_temperatures``) and beta are fitted on
   the samples: the pair with the lowest class-balanced binary cross-entropy of sigmoid(q_k)
   against the exact label of every step.
   Why not fine-tune a PRM on the labels: a Math-Shepherd classifier (a "+"/"-" read at a step
   tag) must learn to compare every written digit with what the model predicted one position
   earlier, a new circuit it did not learn in this CPU budget (first-error AUC ~0.8); full
   fine-tunes of the implicit PRM on the labels (lr 3e-5, 200 steps, with and without a
   fast-learning output gain) ranked the held-out samples worse than the fitted temperature
   (README, "How the PRM was made").

Weights are saved with ``save_pretrained`` in float16 (safetensors) to keep the package small;
ponder loads them in float32 on CPU. Everything is seeded; on the same torch version and thread
count a rerun writes the same weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import arith
from .builtin import ARCHITECTURES, MODELS_DIR, build_tokenizer, model_config

__all__ = ["TrainConfig", "train_all", "main"]

DONE_FILE = "DONE.json"
# Levels of successive policy batches: the middle levels twice as often as the easiest and the
# hardest one (level 1 is learnt quickly; level 5 is long and mostly out of a tiny model's reach).
LEVEL_CYCLE = (1, 2, 3, 4, 5, 2, 3, 4)


@dataclass
class TrainConfig:
    """What ``ponder toy train`` does. Step counts (not wall time) fix the work, so a seed
    reproduces the models; the defaults take about 50 minutes on 2 CPU cores."""

    seed: int = 0
    threads: int = 2
    tokens_per_batch: int = 4096
    small_steps: int = 2000
    small_lr: float = 3e-3
    large_steps: int = 500
    large_lr: float = 5e-4
    grow_noise: float = 2e-3
    warmup: int = 40
    # PRM data: problems per level sampled from the small policy, completions per problem
    sample_problems_per_level: int = 120
    sample_n: int = 4
    sample_temperature: float = 0.8
    sample_batch: int = 40
    sample_max_steps: int = 16
    sample_max_step_tokens: int = 160
    # PRM: further LM steps from the large policy, then the inverse temperatures tried
    # (comma-separated); beta is fitted for each
    prm_lm_steps: int = 300
    prm_lm_lr: float = 3e-4
    prm_inverse_temperatures: str = "1,1.5,2,2.5,3,4,5,6,8,12,16"

    def validate(self) -> TrainConfig:
        for name in ("threads", "tokens_per_batch", "sample_problems_per_level", "sample_n", "sample_batch",
                     "sample_max_steps", "sample_max_step_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("small_steps", "large_steps", "prm_lm_steps", "warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.inverse_temperatures()
        return self

    def inverse_temperatures(self) -> list[float]:
        """``prm_inverse_temperatures`` parsed; ValueError unless a non-empty list of numbers >= 1."""
        try:
            values = [float(x) for x in self.prm_inverse_temperatures.split(",")]
        except ValueError:
            values = []
        if not values or not all(math.isfinite(v) and v >= 1.0 for v in values):
            raise ValueError(f"prm_inverse_temperatures must be comma-separated numbers >= 1, got {self.prm_inverse_temperatures!r}")
        return values


# ----------------------------------------------------------------------------- data


def _rng(seed: int, stage: str, k: int) -> random.Random:
    # str seeds are hashed with SHA-512 by random.Random: stable across runs and platforms.
    return random.Random(f"{seed}/{stage}/{k}")


def _problems(rng: random.Random, level: int, count: int) -> list[arith.ArithProblem]:
    held_out = arith._eval_expressions()
    out: list[arith.ArithProblem] = []
    while len(out) < count:
        p = arith.generate_problem(rng, level)
        if p.expression not in held_out:
            out.append(p)
    return out


def policy_example(tokenizer, problem: arith.ArithProblem) -> tuple[list[int], int]:
    """(token ids of prompt + reference solution + ``<|end|>``, prompt length): the policy is
    trained on exactly what ``HFPolicy`` prompts with and what a finished path holds."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.question}], tokenize=False, add_generation_prompt=True
    )
    p_ids = tokenizer.encode(prompt, add_special_tokens=False)
    s_ids = tokenizer.encode(arith.solution_text(problem), add_special_tokens=False)
    return p_ids + s_ids + [tokenizer.eos_token_id], len(p_ids)


def policy_batch(tokenizer, seed: int, stage: str, k: int, tokens_per_batch: int):
    """Batch ``k`` of a policy stage: (input_ids int64 [B, T], labels int64 [B, T]) with
    labels -100 on the prompt and padding."""
    rng = _rng(seed, stage, k)
    level = LEVEL_CYCLE[k % len(LEVEL_CYCLE)]
    rows: list[tuple[list[int], int]] = []
    longest = 0
    while True:
        ids, plen = policy_example(tokenizer, _problems(rng, level, 1)[0])
        if rows and max(longest, len(ids)) * (len(rows) + 1) > tokens_per_batch:
            break
        rows.append((ids, plen))
        longest = max(longest, len(ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long)
    for i, (ids, plen) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, plen : len(ids)] = torch.tensor(ids[plen:])
    return input_ids, labels


def prm_example(tokenizer, question: str, steps: list[str], labels: list[bool]) -> tuple[list[int], int, list[int], list[bool]]:
    """(token ids of the implicit-PRM rendering of the path, index of its first scored token,
    per step the index of its last token, the step labels). The rendering and the cuts are
    ``ponder.hf.prm``'s own (format ``implicit-prm``), so training and scoring agree."""
    from ..hf.prm.formats import _ImplicitPRM

    ids, answer_start, ends = _ImplicitPRM(tokenizer).spans(question, steps)
    if len(ends) != len(labels):
        raise ValueError(f"{len(ends)} steps for {len(labels)} labels")
    return ids, answer_start, ends, list(labels)


# ----------------------------------------------------------------------------- training


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _progress(total: int, desc: str, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)


def _save(model, tokenizer, out: Path, card: dict) -> None:
    """save_pretrained in float16 + tokenizer + a DONE marker, written to a temporary folder
    and renamed so a killed run never leaves a half-written model."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    half = model.to(torch.float16)
    half.generation_config.eos_token_id = tokenizer.eos_token_id
    half.generation_config.pad_token_id = tokenizer.pad_token_id
    half.save_pretrained(tmp, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE_FILE).write_text(json.dumps(card, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _done(out: Path) -> bool:
    return (out / DONE_FILE).is_file()


def _train_loop(model, stage: str, steps: int, lr: float, warmup: int, batch_fn, loss_fn, ckpt: Path) -> dict:
    """AdamW with warmup + cosine decay to 10%, gradient clipping at 1.0. Checkpoints model,
    optimizer and step to ``ckpt`` every 100 steps; resumes from it. Returns loss statistics."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    start = 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
    model.train()
    bar = _progress(steps, stage, start)
    recent: list[float] = []
    t0 = time.time()
    for k in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(k, steps, lr, warmup)
        loss = loss_fn(model, *batch_fn(k))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-50:]
        bar.update(1)
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
        if (k + 1) % 100 == 0 and k + 1 < steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": k + 1}, tmp)
            os.replace(tmp, ckpt)
    bar.close()
    model.eval()
    ckpt.unlink(missing_ok=True)
    return {"steps": steps, "final_loss_avg50": sum(recent) / len(recent) if recent else None, "seconds": round(time.time() - t0, 1)}


def _lm_loss(model, input_ids, labels):
    return model(input_ids=input_ids, labels=labels).loss


def _double(w: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``w`` tiled twice along each dim of ``dims``, divided by 2 per doubled *input* dim (the
    last one of a Linear weight [out, in]) so a doubled input [x; x] gives the same output."""
    for d in dims:
        w = torch.cat([w, w], dim=d)
    if w.dim() == 2 and 1 in dims:
        w = w / 2
    return w


@torch.no_grad()
def grow(small, large, noise_std: float, generator: torch.Generator) -> None:
    """Initialise ``large`` from ``small`` so it computes the same function (Net2Net-style
    model growth), then add noise so the copies can diverge.

    Width: every hidden, head and MLP unit of ``small`` appears twice in ``large`` (hidden and
    intermediate sizes doubled, twice the heads at the same head size, so RoPE is unchanged):
    the residual stream of ``large`` is ``[x; x]``, RMSNorm of it equals ``[norm(x); norm(x)]``,
    every Linear's input half-weights sum the two copies, and the final norm is halved so the
    tied LM head ``[E, E]`` gives the small model's logits. Depth: layers beyond ``small``'s
    are appended with zero output projections (``o_proj``, ``down_proj``), i.e. as identities.
    """
    sc, lc = small.config, large.config
    head_dim = sc.hidden_size // sc.num_attention_heads
    if (lc.hidden_size, lc.intermediate_size, lc.num_attention_heads) != (
        2 * sc.hidden_size, 2 * sc.intermediate_size, 2 * sc.num_attention_heads
    ) or lc.hidden_size // lc.num_attention_heads != head_dim or lc.num_hidden_layers < sc.num_hidden_layers:
        raise ValueError("grow() needs twice the hidden size, MLP size and heads at the same head size, and >= the layers")
    src = small.state_dict()
    dst = large.state_dict()
    for key, w in src.items():
        if key == "lm_head.weight" and large.config.tie_word_embeddings:
            continue
        if key.endswith("norm.weight"):
            new = torch.cat([w, w]) / (2 if key == "model.norm.weight" else 1)
        elif key == "model.embed_tokens.weight":
            new = torch.cat([w, w], dim=1)
        else:  # a Linear [out, in]: both dims doubled
            new = _double(w, (0, 1))
        if new.shape != dst[key].shape:
            raise ValueError(f"grow(): {key} has shape {tuple(new.shape)}, expected {tuple(dst[key].shape)}")
        dst[key].copy_(new)
    for i in range(sc.num_hidden_layers, lc.num_hidden_layers):
        dst[f"model.layers.{i}.self_attn.o_proj.weight"].zero_()
        dst[f"model.layers.{i}.mlp.down_proj.weight"].zero_()
    if noise_std > 0:
        for key, w in dst.items():
            if w.dim() == 2 and key != "lm_head.weight":
                w.add_(torch.randn(w.shape, generator=generator) * noise_std)


def train_policy(name: str, config: TrainConfig, out_dir: Path, grow_from: Path | None = None) -> Path:
    """Stage ``policy-small`` / ``policy-large``: train (from scratch, or grown from the saved
    model ``grow_from`` with :func:`grow`), save to ``out_dir/name``."""
    from transformers import LlamaForCausalLM

    out = out_dir / name
    if _done(out):
        return out
    tokenizer = build_tokenizer()
    torch.manual_seed(config.seed * 1000 + (1 if name == "policy-small" else 2))
    model = LlamaForCausalLM(model_config(name, tokenizer))
    if grow_from is not None:
        small = LlamaForCausalLM.from_pretrained(grow_from, dtype=torch.float32)
        grow(small, model, config.grow_noise, torch.Generator().manual_seed(config.seed * 1000 + 4))
    steps = config.small_steps if name == "policy-small" else config.large_steps
    lr = config.small_lr if name == "policy-small" else config.large_lr
    stats = _train_loop(
        model,
        name,
        steps,
        lr,
        config.warmup,
        lambda k: policy_batch(tokenizer, config.seed, name, k, config.tokens_per_batch),
        _lm_loss,
        out_dir / f".{name}.ckpt",
    )
    card = {
        "model": f"builtin:{name}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "architecture": ARCHITECTURES[name],
        "grown_from": None if grow_from is None else "builtin:policy-small",
        "train_config": dataclasses.asdict(config),
        "training": stats,
        "made_by": "ponder toy train (ponder.toy.train.train_policy)",
    }
    _save(model, tokenizer, out, card)
    return out


def sample_solutions(config: TrainConfig, out_dir: Path, policy_dir: Path) -> Path:
    """Stage ``samples``: ``sample_n`` solutions per problem from the saved small policy via
    ``ponder.search`` (majority, temperature ``sample_temperature``), labelled with
    ``label_steps``; one JSONL row per problem, appended per batch (a rerun continues)."""
    from ..batch import search
    from ..hf.policy import HFPolicy
    from ..methods import SearchConfig
    from ..protocols import SamplingParams

    path = out_dir / "samples.jsonl"
    done_marker = out_dir / "samples.done"
    if done_marker.is_file():
        return path
    total = config.sample_problems_per_level * len(arith.LEVELS)
    batches = math.ceil(total / config.sample_batch)
    finished = 0
    if path.is_file():
        lines = path.read_text().splitlines()
        finished = sum(1 for line in lines if line.strip()) // config.sample_batch
        # keep only whole batches (a killed run may have written part of one)
        path.write_text("".join(line + "\n" for line in lines[: finished * config.sample_batch]))
    policy = HFPolicy(policy_dir, kv_budget=1 << 17)
    bar = _progress(batches, "samples", finished)
    for b in range(finished, batches):
        rng = _rng(config.seed, "samples", b)
        problems = [
            _problems(rng, arith.LEVELS[(b * config.sample_batch + i) % len(arith.LEVELS)], 1)[0]
            for i in range(config.sample_batch)
        ]
        search_config = SearchConfig(
            method="majority",
            n=config.sample_n,
            max_steps=config.sample_max_steps,
            seed=config.seed * 7919 + b,
            sampling=SamplingParams(temperature=config.sample_temperature, max_step_tokens=config.sample_max_step_tokens),
        )
        results = search([p.question for p in problems], policy, None, search_config)
        with open(path, "a", encoding="utf-8") as f:
            for p, r in zip(problems, results):
                row = {
                    "question": p.question,
                    "level": p.level,
                    "answer": p.answer,
                    "samples": [
                        {"steps": c.steps, "labels": arith.label_steps(p.question, [s.strip() for s in c.steps])}
                        for c in r.completions
                    ],
                }
                f.write(json.dumps(row) + "\n")
        bar.update(1)
    bar.close()
    done_marker.write_text("done\n")
    return path


def _prm_examples(samples_path: Path, tokenizer) -> tuple[list, dict]:
    """Every sampled solution as a :func:`prm_example`, and what was kept / dropped."""
    from .builtin import MAX_POSITIONS

    rows = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    examples = []
    too_long = unusable = 0
    for row in rows:
        for s in row["samples"]:
            if not s["steps"]:
                continue
            try:
                example = prm_example(tokenizer, row["question"], s["steps"], s["labels"])
            except ValueError:
                unusable += 1  # an empty step (nothing to score) or one merging with its neighbour
                continue
            # degenerate samples (runaway steps) longer than the models' context are dropped
            if len(example[0]) > MAX_POSITIONS:
                too_long += 1
                continue
            examples.append(example)
    if not examples:
        raise ValueError(f"{samples_path} holds no sampled steps to fit the PRM on")
    stats = {
        "problems": len(rows),
        "solutions": len(examples),
        "dropped_longer_than_context": too_long,
        "dropped_unusable": unusable,
        "steps": sum(len(e[2]) for e in examples),
        "bad_steps": sum(e[3].count(False) for e in examples),
    }
    return examples, stats


@torch.no_grad()
def sharpened_log_ratio_sums(model, reference, examples, alphas: list[float], tokens_per_batch: int, pad: int) -> torch.Tensor:
    """float64 [len(alphas), S]: for every step of every example (in order), the sum over the
    answer's tokens up to the step's end of log softmax(alpha * z)[y] - log softmax(r)[y], z the
    logits of ``model`` and r those of ``reference`` -- the log-ratio of ``model`` at inverse
    temperature alpha against the reference, i.e. q_k / beta of the implicit PRM that copy is.
    ``model`` may be ``reference`` itself (then one forward pass serves both)."""
    out = []
    bar = _progress(len(examples), "prm (scoring the samples)")
    i = 0
    while i < len(examples):
        j = i + 1
        longest = len(examples[i][0])
        while j < len(examples) and max(longest, len(examples[j][0])) * (j - i + 1) <= tokens_per_batch:
            longest = max(longest, len(examples[j][0]))
            j += 1
        input_ids = torch.full((j - i, longest), pad, dtype=torch.long)
        mask = torch.zeros((j - i, longest - 1), dtype=torch.float64)
        rows, cols = [], []
        for r, (ids, answer_start, ends, _) in enumerate(examples[i:j]):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            mask[r, answer_start - 1 : len(ids) - 1] = 1.0
            rows += [r] * len(ends)
            cols += [e - 1 for e in ends]  # position e-1 holds the log-ratio of token e
        target = input_ids[:, 1:, None]
        r_logits = reference(input_ids=input_ids).logits[:, :-1].double()
        base = r_logits.gather(-1, target).squeeze(-1) - r_logits.logsumexp(-1)
        z = r_logits if model is reference else model(input_ids=input_ids).logits[:, :-1].double()
        zy = z.gather(-1, target).squeeze(-1)
        sums = torch.stack([((a * zy - (a * z).logsumexp(-1) - base) * mask).cumsum(-1)[rows, cols] for a in alphas])
        out.append(sums)
        bar.update(j - i)
        i = j
    bar.close()
    return torch.cat(out, dim=1)


def fit_beta(sums: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> tuple[float, float]:
    """The beta in [1e-3, 10] (log grid; the loss is convex in beta) minimising the weighted
    binary cross-entropy of sigmoid(beta * sums) against labels. sums, labels, weights: float64
    [S]. Returns (beta, mean weighted loss)."""
    betas = torch.logspace(-3, 1, 161, dtype=torch.float64)
    q = betas[:, None] * sums[None, :]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(q, labels.expand_as(q), reduction="none")
    loss = (loss * weights).sum(1) / weights.sum()
    k = int(loss.argmin())
    return float(betas[k]), float(loss[k])


def train_prm(config: TrainConfig, out_dir: Path, large_dir: Path, samples_path: Path) -> Path:
    """Stage ``prm``: the implicit PRM (format ``implicit-prm``, reference: the large policy) =
    the large policy trained ``prm_lm_steps`` more LM steps on fresh batches, at the inverse
    temperature alpha; alpha and beta fitted on the samples."""
    from transformers import LlamaForCausalLM

    out = out_dir / "prm"
    if _done(out):
        return out
    tokenizer = build_tokenizer()
    reference = LlamaForCausalLM.from_pretrained(large_dir, dtype=torch.float32).eval()
    model = LlamaForCausalLM.from_pretrained(large_dir, dtype=torch.float32)
    # The trained weights are kept until the PRM is saved, so a run killed while scoring the
    # samples resumes without training again.
    trained = out_dir / ".prm.trained.pt"
    if trained.is_file():
        state = torch.load(trained, weights_only=True)
        model.load_state_dict(state["model"])
        training = state["training"]
        model.eval()
    else:
        training = _train_loop(
            model,
            "prm",
            config.prm_lm_steps,
            config.prm_lm_lr,
            min(config.warmup, config.prm_lm_steps),
            lambda k: policy_batch(tokenizer, config.seed, "prm", k, config.tokens_per_batch),
            _lm_loss,
            out_dir / ".prm.ckpt",
        )
        tmp = trained.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "training": training}, tmp)
        os.replace(tmp, trained)
    examples, data_stats = _prm_examples(samples_path, tokenizer)
    alphas = config.inverse_temperatures()
    sums = sharpened_log_ratio_sums(model, reference, examples, alphas, config.tokens_per_batch, tokenizer.pad_token_id)
    labels = torch.tensor([float(x) for e in examples for x in e[3]], dtype=torch.float64)
    # Class-balanced: a weak policy's samples are mostly wrong steps, and an unweighted fit would
    # favour the prior over telling steps apart.
    bad = float(1.0 - labels.mean())
    weights = torch.where(labels > 0.5, 0.5 / max(1e-3, 1 - bad), 0.5 / max(1e-3, bad))
    fits = [(a, *fit_beta(sums[i], labels, weights)) for i, a in enumerate(alphas)]
    alpha, beta, _ = min(fits, key=lambda f: f[2])

    with torch.no_grad():
        # RMSNorm gain x alpha scales the final hidden state, so every logit: the same model at
        # temperature 1/alpha
        model.model.norm.weight.mul_(alpha)
    # HFPRM reads the format, the reference (relative to the PRM's folder) and beta from here
    model.config.implicit_prm = {"reference": os.path.join("..", large_dir.name), "beta": beta}
    card = {
        "model": "builtin:prm",
        "format": "implicit-prm",
        "reference": "builtin:policy-large",
        "inverse_temperature": alpha,
        "beta": beta,
        "fit": [{"inverse_temperature": a, "beta": b, "balanced_bce": round(loss, 5)} for a, b, loss in fits],
        "parameters": sum(p.numel() for p in model.parameters()),
        "initialised_from": "builtin:policy-large",
        "training": training,
        "data": data_stats,
        "train_config": dataclasses.asdict(config),
        "made_by": "ponder toy train (ponder.toy.train.train_prm)",
    }
    _save(model, tokenizer, out, card)
    trained.unlink()
    return out


def train_all(config: TrainConfig, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Run every stage into ``out_dir`` (resuming finished ones); returns the model folders."""
    config.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    small = train_policy("policy-small", config, out_dir)
    large = train_policy("policy-large", config, out_dir, grow_from=small)
    samples = sample_solutions(config, out_dir, small)
    prm = train_prm(config, out_dir, large, samples)
    return {"policy-small": small, "policy-large": large, "prm": prm}


#: the help of each ``ponder toy train`` option (one per TrainConfig field)
OPTION_HELP = {
    "seed": "random seed of the data, the initialisation and the sampling",
    "threads": "torch CPU threads",
    "tokens_per_batch": "tokens per training batch",
    "small_steps": "training steps of policy-small (from scratch)",
    "small_lr": "peak learning rate of policy-small",
    "large_steps": "further training steps of policy-large after it is grown from policy-small",
    "large_lr": "peak learning rate of policy-large",
    "grow_noise": "noise added when growing policy-small into policy-large (breaks the symmetry of duplicated units)",
    "warmup": "learning-rate warm-up steps of every stage",
    "sample_problems_per_level": "PRM fit data: problems per level that policy-small solves",
    "sample_n": "PRM fit data: solutions sampled per problem",
    "sample_temperature": "PRM fit data: sampling temperature",
    "sample_batch": "PRM fit data: problems per sampling call",
    "sample_max_steps": "PRM fit data: most steps per sampled solution",
    "sample_max_step_tokens": "PRM fit data: most tokens per sampled step",
    "prm_lm_steps": "further language-model steps of the PRM's model from policy-large",
    "prm_lm_lr": "peak learning rate of those PRM steps",
    "prm_inverse_temperatures": "comma-separated inverse temperatures (alpha >= 1) tried for the PRM; beta is fitted for each",
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``ponder toy train``: --out, --install and one option per TrainConfig field."""
    parser = argparse.ArgumentParser(
        prog="ponder toy train",
        description="Retrain the built-in policies and PRM of builtin:arith from a seed (about 50 min on 2 CPU cores). "
        "Rerunning resumes: finished stages are kept.",
    )
    parser.add_argument("--out", default="ponder-toy-models", help="output folder (default: %(default)s)")
    parser.add_argument("--install", action="store_true", help=f"copy the finished models into the package ({MODELS_DIR})")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        default = getattr(defaults, field.name)
        parser.add_argument(
            "--" + field.name.replace("_", "-"), type=type(default), default=default,
            metavar=type(default).__name__.upper(), help=f"{OPTION_HELP[field.name]} (default {default})",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    try:
        paths = train_all(config, args.out)
    except ValueError as exc:
        print(f"ponder toy train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nponder toy train: interrupted; rerun with --out {args.out} to resume (finished stages are kept)",
              file=sys.stderr)
        return 130
    for name, path in paths.items():
        print(f"{name}: {path}")
    if args.install:
        for name, path in paths.items():
            target = MODELS_DIR / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(path, target)
        print(f"installed into {MODELS_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
