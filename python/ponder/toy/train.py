"""``ponder toy train``: (re)train the built-in models of ``builtin:arith`` from a seed.

The data path, one stage per function, each written to ``OUT/<stage>`` and skipped on a rerun
once finished (so an interrupted run resumes; a stage in flight restarts from its last
checkpoint):

1. ``policy-small`` / ``policy-large``: Llama causal LMs (``ponder.toy.models``) trained on
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
3. ``prm``: the large policy fine-tuned as a Math-Shepherd PRM on those samples: the path
   rendered as ``question " " step_1 " ки" "\\n\\n" step_2 " ки" ...`` (exactly what
   ``ponder.HFPRM`` feeds it) and a two-way cross-entropy over the logits of ``"+"`` / ``"-"``
   at every tag.

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
from .models import ARCHITECTURES, MODELS_DIR, STEP_TAG, build_tokenizer, model_config

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
    prm_steps: int = 250
    prm_lr: float = 3e-4

    def validate(self) -> TrainConfig:
        for name in ("threads", "tokens_per_batch", "sample_problems_per_level", "sample_n", "sample_batch",
                     "sample_max_steps", "sample_max_step_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("small_steps", "large_steps", "prm_steps", "warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        return self


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


def prm_example(prm_tokenizer, question: str, steps: list[str], labels: list[bool]) -> tuple[list[int], list[int]]:
    """(token ids of the Math-Shepherd rendering, per-token target: 0 "+" / 1 "-" at each step
    tag, -100 elsewhere). The rendering is ``ponder.prm``'s own, so training and scoring agree."""
    from ..prm import _MathShepherd

    text = _MathShepherd(prm_tokenizer).render(question, steps)
    ids = prm_tokenizer.encode(text)
    tag = prm_tokenizer.convert_tokens_to_ids(STEP_TAG)
    positions = [i for i, t in enumerate(ids) if t == tag]
    if len(positions) != len(labels):
        raise ValueError(f"{len(positions)} step tags for {len(labels)} labels in {text!r}")
    target = [-100] * len(ids)
    for pos, good in zip(positions, labels):
        target[pos] = 0 if good else 1
    return ids, target


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
    tokenizer = build_tokenizer(chat=True)
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
    from ..policy import HFPolicy
    from ..search import SearchConfig, search
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


def _prm_batches(config: TrainConfig, samples_path: Path, tokenizer):
    from .models import MAX_POSITIONS

    rows = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    examples = []
    too_long = with_tag = 0
    for row in rows:
        for s in row["samples"]:
            if any(STEP_TAG.strip() in step for step in s["steps"]):
                with_tag += 1  # the policy wrote the PRM's step tag itself: no clean rendering
                continue
            if s["steps"]:
                example = prm_example(tokenizer, row["question"], s["steps"], s["labels"])
                # degenerate samples (runaway steps) longer than the models' context are dropped
                if len(example[0]) > MAX_POSITIONS:
                    too_long += 1
                    continue
                examples.append(example)
    if not examples:
        raise ValueError(f"{samples_path} holds no sampled steps to train the PRM on")
    pad = tokenizer.pad_token_id

    def batch(k: int):
        # an epoch is a seeded shuffle; a batch takes consecutive examples of similar length
        epoch_size = len(examples)
        rng = _rng(config.seed, "prm", k)
        picked = [examples[rng.randrange(epoch_size)]]
        longest = len(picked[0][0])
        order = sorted(range(epoch_size), key=lambda i: abs(len(examples[i][0]) - longest) + rng.random())
        for i in order:
            ids = examples[i][0]
            if max(longest, len(ids)) * (len(picked) + 1) > config.tokens_per_batch:
                break
            picked.append(examples[i])
            longest = max(longest, len(ids))
        input_ids = torch.full((len(picked), longest), pad, dtype=torch.long)
        target = torch.full((len(picked), longest), -100, dtype=torch.long)
        for j, (ids, tgt) in enumerate(picked):
            input_ids[j, : len(ids)] = torch.tensor(ids)
            target[j, : len(tgt)] = torch.tensor(tgt)
        return input_ids, target

    stats = {
        "problems": len(rows),
        "solutions": len(examples),
        "dropped_longer_than_context": too_long,
        "dropped_with_step_tag": with_tag,
        "steps": sum(sum(1 for t in tgt if t != -100) for _, tgt in examples),
        "bad_steps": sum(sum(1 for t in tgt if t == 1) for _, tgt in examples),
    }
    return batch, stats


def train_prm(config: TrainConfig, out_dir: Path, large_dir: Path, samples_path: Path) -> Path:
    """Stage ``prm``: fine-tune the large policy into a Math-Shepherd PRM on the samples."""
    from transformers import LlamaForCausalLM

    out = out_dir / "prm"
    if _done(out):
        return out
    tokenizer = build_tokenizer(chat=False)
    model = LlamaForCausalLM.from_pretrained(large_dir, dtype=torch.float32)
    columns = torch.tensor([tokenizer.convert_tokens_to_ids("+"), tokenizer.convert_tokens_to_ids("-")])
    batch_fn, data_stats = _prm_batches(config, samples_path, tokenizer)

    # Class-balanced: a weak policy's samples are mostly wrong steps, and an unweighted loss
    # would spend the PRM's capacity on the prior instead of on telling steps apart.
    bad = data_stats["bad_steps"] / max(1, data_stats["steps"])
    weight = torch.tensor([0.5 / max(1e-3, 1 - bad), 0.5 / max(1e-3, bad)])

    def loss_fn(model, input_ids, target):
        mask = target != -100
        hidden = model.model(input_ids=input_ids).last_hidden_state[mask]
        logits = model.lm_head(hidden)[:, columns]
        return torch.nn.functional.cross_entropy(logits, target[mask], weight=weight)

    torch.manual_seed(config.seed * 1000 + 3)
    stats = _train_loop(model, "prm", config.prm_steps, config.prm_lr, config.warmup, batch_fn, loss_fn, out_dir / ".prm.ckpt")
    card = {
        "model": "builtin:prm",
        "format": "math-shepherd",
        "parameters": sum(p.numel() for p in model.parameters()),
        "initialised_from": "builtin:policy-large",
        "data": data_stats,
        "train_config": dataclasses.asdict(config),
        "training": stats,
        "made_by": "ponder toy train (ponder.toy.train.train_prm)",
    }
    _save(model, tokenizer, out, card)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ponder toy train",
        description="Retrain the built-in policies and PRM of builtin:arith from a seed (about 45 min on 2 CPU cores). "
        "Rerunning resumes: finished stages are kept.",
    )
    parser.add_argument("--out", default="ponder-toy-models", help="output folder (default: %(default)s)")
    parser.add_argument("--install", action="store_true", help=f"copy the finished models into the package ({MODELS_DIR})")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument(
            "--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)), default=getattr(defaults, field.name)
        )
    args = parser.parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    try:
        paths = train_all(config, args.out)
    except ValueError as exc:
        print(f"ponder toy train: error: {exc}", file=sys.stderr)
        return 2
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
