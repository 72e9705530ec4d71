"""The built-in models (ponder.toy.builtin / ponder.toy.train): the tokenizer, the shipped
checkpoints (offline loading, sizes, well-formed steps, the README's greedy accuracy), the
main job on them, and the training script end to end on a tiny budget."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from ponder import SamplingParams, SearchConfig, search
from ponder.cli import main as cli_main
from ponder.hf.policy import HFPolicy
from ponder.hf.prm import HFPRM, detect_format
from ponder.toy import arith
from ponder.toy.builtin import (
    BUILTIN_MODELS,
    MODELS_DIR,
    build_tokenizer,
    builtin_model_path,
    resolve_model,
)
from ponder.toy.train import TrainConfig, fit_beta, policy_example, prm_example, sharpened_log_ratio_sums, train_all

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The shipped models must load with no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def small():
    return HFPolicy(builtin_model_path("policy-small"))


@pytest.fixture(scope="module")
def prm():
    return HFPRM(builtin_model_path("prm"))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_task_text_and_keeps_digits_single():
    tok = build_tokenizer()
    p = arith.generate_problem(__import__("random").Random(3), 4)
    text = arith.solution_text(p)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    for digit in "0123456789":
        assert tok.encode(digit, add_special_tokens=False) == [tok.convert_tokens_to_ids(digit)]
    # word tokens shorten solutions: fewer tokens than characters
    assert len(ids) < len(text)
    # the step delimiter is one token, so a step ends exactly at it
    assert tok.encode("\n\n", add_special_tokens=False) == [tok.convert_tokens_to_ids("\n\n")]


def test_chat_template_and_prm_format():
    chat = build_tokenizer()
    prompt = chat.apply_chat_template([{"role": "user", "content": "Compute 1 + 2."}], tokenize=False,
                                      add_generation_prompt=True)
    assert prompt == "<s><|user|>Compute 1 + 2.<|end|><|assistant|>"
    assert chat.eos_token == "<|end|>"
    assert chat.encode("é", add_special_tokens=False) == [chat.unk_token_id]
    # the shipped tokenizers are this one, byte for byte in what they do
    for name in BUILTIN_MODELS:
        shipped = transformers.AutoTokenizer.from_pretrained(builtin_model_path(name))
        text = chat.apply_chat_template([{"role": "user", "content": "Compute (17 - 4) * 3."},
                                         {"role": "assistant", "content": "13 * 3\n\n39\n\nThe answer is \\boxed{39}."}],
                                        tokenize=False)
        assert shipped.encode(text, add_special_tokens=False) == chat.encode(text, add_special_tokens=False), name
    # the PRM is an implicit PRM whose config names its reference: format detection needs nothing else
    config = transformers.AutoConfig.from_pretrained(builtin_model_path("prm"))
    assert config.implicit_prm["reference"] == "../policy-large" and config.implicit_prm["beta"] > 0
    assert detect_format(chat, config) == "implicit-prm"


def test_training_examples_match_what_search_feeds():
    tok = build_tokenizer()
    p = arith.generate_problem(__import__("random").Random(1), 3)
    ids, plen = policy_example(tok, p)
    assert tok.decode(ids[:plen]) == tok.apply_chat_template(
        [{"role": "user", "content": p.question}], tokenize=False, add_generation_prompt=True)
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[plen:-1]) == arith.solution_text(p)
    steps = [s + "\n\n" for s in p.solution_steps[:-1]] + [p.solution_steps[-1]]
    labels = [True] * (len(steps) - 1) + [False]
    ids, answer_start, ends, got_labels = prm_example(tok, p.question, steps, labels)
    assert got_labels == labels
    # exactly the tokens HFPRM feeds the implicit PRM: the question part, then each step
    prm = HFPRM(builtin_model_path("prm"), kv_budget=1024)
    assert ids == prm.encode_full(prm.render(p.question, steps))
    assert tok.decode(ids[:answer_start]) == "<s><|user|>" + p.question + "<|end|><|assistant|>"
    for k, end in enumerate(ends):
        assert tok.decode(ids[answer_start : end + 1]) == "\n\n".join(s.strip() for s in steps[: k + 1])


def test_grow_keeps_the_small_models_function():
    """policy-large starts as policy-small grown wider and deeper (ponder.toy.train.grow): the
    same logits before its own training (noise 0), nearly the same with the symmetry-breaking
    noise; a shape it cannot grow into is refused."""
    from transformers import LlamaForCausalLM

    from ponder.toy.builtin import model_config
    from ponder.toy.train import grow

    tok = build_tokenizer()
    torch.manual_seed(0)
    small = LlamaForCausalLM(model_config("policy-small", tok)).eval()
    large = LlamaForCausalLM(model_config("policy-large", tok)).eval()
    ids = torch.tensor([tok.encode("<s><|user|>Compute 4 + 19 + (2 + 7).<|end|><|assistant|>4 + 19 + 9\n\n",
                                   add_special_tokens=False)])
    with torch.no_grad():
        want = small(ids).logits
        grow(small, large, 0.0, torch.Generator().manual_seed(0))
        torch.testing.assert_close(large(ids).logits, want, atol=1e-4, rtol=1e-4)
        grow(small, large, 2e-3, torch.Generator().manual_seed(0))
        got = large(ids).logits
    assert 0 < (got - want).abs().max() < 1.0
    with pytest.raises(ValueError, match="twice the hidden size"):
        grow(small, small, 0.0, torch.Generator())


# ----------------------------------------------------------------------------- shipped models


def test_shipped_models_sizes_and_files():
    total = 0
    params = {}
    for name in BUILTIN_MODELS:
        path = builtin_model_path(name)
        assert resolve_model(f"builtin:{name}") == str(path)
        files = {f.name for f in path.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "DONE.json"} <= files
        total += sum(f.stat().st_size for f in path.glob("*.safetensors"))
        params[name] = json.loads((path / "DONE.json").read_text())["parameters"]
    assert total <= 30 * 2**20, f"shipped weights are {total / 2**20:.1f} MiB"
    assert 0.7e6 <= params["policy-small"] <= 1.5e6
    assert 4.9 <= params["policy-large"] / params["policy-small"] <= 8  # ~5x
    assert params["prm"] > params["policy-small"]
    card = json.loads((MODELS_DIR / "prm" / "DONE.json").read_text())
    assert card["format"] == "implicit-prm" and card["initialised_from"] == "builtin:policy-large"
    assert card["reference"] == "builtin:policy-large"
    assert json.loads((MODELS_DIR / "policy-large" / "DONE.json").read_text())["grown_from"] == "builtin:policy-small"
    assert card["data"]["bad_steps"] > 0 and card["data"]["steps"] > card["data"]["bad_steps"]


def test_unknown_or_missing_builtin_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="builtin:policy-small"):
        builtin_model_path("policy-huge")
    with pytest.raises(FileNotFoundError, match="ponder toy train"):
        builtin_model_path("prm", models_dir=tmp_path)
    assert resolve_model("org/model") == "org/model"


@pytest.mark.slow
def test_shipped_policy_writes_well_formed_steps(small):
    """Greedy solutions of the shipped small policy are made of steps the task understands:
    each is an expression or the answer line, and the solution ends with a boxed answer."""
    problems = arith.load_arith("test")[::50]  # 10 problems, two per level
    results = search([p.problem for p in problems], small, None,
                     SearchConfig(method="majority", n=1, sampling=SamplingParams(temperature=0.0), max_steps=16))
    for p, r in zip(problems, results):
        (c,) = r.completions
        assert c.finished and c.answer is not None, (p.problem, c.text)
        for step in c.steps[:-1]:
            assert step.endswith("\n\n")
            arith.parse_expression(step.strip())  # raises if the step is not an expression
        assert re.fullmatch(r"The answer is \\boxed\{-?\d+\}\.", c.steps[-1].strip()), c.steps[-1]


@pytest.mark.slow
def test_shipped_prm_ranks_the_policys_correct_steps_above_its_wrong_ones(small, prm):
    """The shipped PRM on what it was trained for: steps the small policy samples (held-out
    problems, levels 2-4), labelled exactly. Its scores must rank correct steps above wrong
    ones far better than chance (ROC AUC; it is a real, imperfect PRM: about 0.85 when made)."""
    problems = [p for p in arith.load_arith("test") if p.level in (2, 3, 4)][::10]
    results = search([p.problem for p in problems], small, prm,
                     SearchConfig(method="best_of_n", n=4, max_steps=16, seed=1))
    good, bad = [], []
    for p, r in zip(problems, results):
        for c in r.completions:
            labels = arith.label_steps(p.problem, [s.strip() for s in c.steps])
            assert len(c.step_scores) == len(labels)
            for ok, score in zip(labels, c.step_scores):
                (good if ok else bad).append(score)
    assert len(good) > 20 and len(bad) > 20
    auc = sum((g > b) + 0.5 * (g == b) for g in good for b in bad) / (len(good) * len(bad))
    assert auc >= 0.75, auc


def _readme_greedy_range() -> tuple[int, int, int]:
    match = re.search(r"greedy-slice-accuracy: (\d+)/100 \(accepted range (\d+)-(\d+)\)", README.read_text())
    assert match, "README.md must record the small policy's greedy accuracy on the fixed slice"
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


@pytest.mark.slow
def test_small_policy_greedy_accuracy_matches_readme(small):
    """Regression guard for the shipped files: greedy accuracy of builtin:policy-small on the
    fixed slice (the first 20 problems of each level) is inside the range the README records."""
    recorded, low, high = _readme_greedy_range()
    problems = [p for p in arith.load_arith("test") if int(p.id[-4:]) % 100 < 20]
    assert len(problems) == 100
    results = search([p.problem for p in problems], small, None,
                     SearchConfig(method="majority", n=1, sampling=SamplingParams(temperature=0.0), max_steps=16))
    correct = sum(r.answer is not None and int(r.answer) == int(p.answer) for p, r in zip(problems, results))
    assert low <= correct <= high, f"greedy accuracy {correct}/100, README records {recorded} ({low}-{high})"


# ----------------------------------------------------------------------------- the main job


@pytest.mark.slow
def test_ponder_run_on_shipped_models_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["run", "--limit", "5", "--n", "1,4", "--out", str(out), "--no-progress"]) == 0
    for name in ("results.jsonl", "summary.csv", "summary.md", "scaling.png", "run.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # 5 problems x (greedy + 5 methods x 2 n) for the small policy, greedy for the large one
    assert len(rows) == 5 * 11 + 5
    assert all(r["answer"] is not None for r in rows if r["method"] == "greedy")
    text = capsys.readouterr().out
    assert "builtin:policy-large" in text and str(out / "results.jsonl") in text


# ----------------------------------------------------------------------------- training


TINY = dict(
    tokens_per_batch=256, small_steps=3, large_steps=2, warmup=1, sample_problems_per_level=1, sample_n=2,
    sample_batch=5, sample_max_steps=3, sample_max_step_tokens=12, prm_inverse_temperatures="1,2", threads=1,
    prm_lm_steps=2,
)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.slow
def test_train_all_writes_loadable_models_reproducibly_and_resumes(tmp_path):
    first = train_all(TrainConfig(**TINY), tmp_path / "a")
    assert set(first) == set(BUILTIN_MODELS)
    for name, path in first.items():
        assert (path / "DONE.json").is_file()
        assert {"model.safetensors", "tokenizer.json", "config.json"} <= {f.name for f in path.iterdir()}
    rows = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["samples"]) == 2 for r in rows)
    for r in rows:
        for s in r["samples"]:
            assert s["labels"] == arith.label_steps(r["question"], [x.strip() for x in s["steps"]])
    # the loaders ponder run uses accept them
    HFPolicy(first["policy-small"])
    prm = HFPRM(first["prm"])  # its reference is the policy-large next to it
    card = json.loads((first["prm"] / "DONE.json").read_text())
    assert prm.format == "implicit-prm" and prm.beta == pytest.approx(card["beta"])
    assert card["inverse_temperature"] in (1.0, 2.0) and len(card["fit"]) == 2
    # the PRM's model is policy-large trained further, not a copy of it
    assert card["training"]["steps"] == 2
    prm_w, large_w = _weights(first["prm"]), _weights(first["policy-large"])
    assert prm_w.keys() == large_w.keys()
    assert not torch.equal(prm_w["model.layers.0.mlp.up_proj.weight"], large_w["model.layers.0.mlp.up_proj.weight"])
    prm.start([0], ["Compute 1 + 2."])
    assert 0.0 < prm.score_steps([0], [1], ["3\n\n"])[0] < 1.0
    # same seed, same weights
    second = train_all(TrainConfig(**TINY), tmp_path / "b")
    for name in BUILTIN_MODELS:
        a, b = _weights(first[name]), _weights(second[name])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # a rerun keeps finished stages
    stamp = (first["prm"] / "model.safetensors").stat().st_mtime_ns
    train_all(TrainConfig(**TINY), tmp_path / "a")
    assert (first["prm"] / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_prm_stage_killed_while_scoring_resumes_without_training_again(tmp_path, monkeypatch):
    from ponder.toy import train as toy_train

    real_sums, real_loop = toy_train.sharpened_log_ratio_sums, toy_train._train_loop

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy_train, "sharpened_log_ratio_sums", killed)
    with pytest.raises(KeyboardInterrupt):
        train_all(TrainConfig(**TINY), tmp_path / "c")
    assert (tmp_path / "c" / ".prm.trained.pt").is_file() and not (tmp_path / "c" / "prm").exists()

    def no_training(model, stage, *args, **kwargs):
        assert stage != "prm", "the PRM's LM steps ran again"
        return real_loop(model, stage, *args, **kwargs)

    monkeypatch.setattr(toy_train, "sharpened_log_ratio_sums", real_sums)
    monkeypatch.setattr(toy_train, "_train_loop", no_training)
    resumed = train_all(TrainConfig(**TINY), tmp_path / "c")["prm"]
    assert not (tmp_path / "c" / ".prm.trained.pt").exists()
    monkeypatch.setattr(toy_train, "_train_loop", real_loop)
    straight = train_all(TrainConfig(**TINY), tmp_path / "d")["prm"]
    a, b = _weights(resumed), _weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((resumed / "DONE.json").read_text())
    assert card["training"] == json.loads((straight / "DONE.json").read_text())["training"] | {"seconds": card["training"]["seconds"]}


def test_train_config_is_validated():
    with pytest.raises(ValueError, match="sample_n"):
        train_all(TrainConfig(sample_n=0), "/nonexistent/never-written")
    with pytest.raises(ValueError, match="prm_lm_steps"):
        train_all(TrainConfig(prm_lm_steps=-1), "/nonexistent/never-written")
    for bad in ("", "0.5,2", "two"):
        with pytest.raises(ValueError, match="prm_inverse_temperatures"):
            train_all(TrainConfig(prm_inverse_temperatures=bad), "/nonexistent/never-written")


def test_fit_beta_recovers_the_scale_of_a_logistic_model():
    g = torch.Generator().manual_seed(0)
    sums = torch.randn(20000, generator=g, dtype=torch.float64) * 3
    labels = torch.bernoulli(torch.sigmoid(0.7 * sums), generator=g)
    beta, loss = fit_beta(sums, labels, torch.ones_like(sums))
    assert beta == pytest.approx(0.7, rel=0.1)
    assert loss < fit_beta(sums, labels, torch.ones_like(sums))[1] + 1e-12  # deterministic
    assert loss < torch.nn.functional.binary_cross_entropy_with_logits(0.35 * sums, labels).item()


@pytest.mark.slow
def test_fitted_prm_scores_are_the_fits_sums(tmp_path):
    """What the fit saw is what HFPRM computes: the saved model at inverse temperature alpha,
    scored as an implicit PRM against the reference, gives sigmoid(beta * the fit's sums). The
    model here is policy-small (another model on the same vocabulary, as the trained PRM is)."""
    tok = build_tokenizer()
    large = builtin_model_path("policy-large")
    reference = transformers.LlamaForCausalLM.from_pretrained(large, dtype=torch.float32).eval()
    problems = [arith.generate_problem(__import__("random").Random(k), 2) for k in range(2)]
    steps = [[s + "\n\n" for s in p.solution_steps[:-1]] + [p.solution_steps[-1]] for p in problems]
    steps[1][0] = "7 + 7\n\n"  # any text: the sums must match whatever a step says
    examples = [prm_example(tok, p.question, s, [True] * len(s)) for p, s in zip(problems, steps)]
    itself = sharpened_log_ratio_sums(reference, reference, examples, [1.0, 3.0], 4096, tok.pad_token_id)
    assert torch.all(itself[0].abs() < 1e-9)  # alpha 1: the reference against itself
    assert itself[1].abs().max() > 1e-3
    small = builtin_model_path("policy-small")
    other = transformers.LlamaForCausalLM.from_pretrained(small, dtype=torch.float32).eval()
    sums = sharpened_log_ratio_sums(other, reference, examples, [1.0, 3.0], 4096, tok.pad_token_id)
    # one example per batch gives the same sums as both in one padded batch
    alone = sharpened_log_ratio_sums(other, reference, examples, [1.0, 3.0], 1, tok.pad_token_id)
    assert torch.allclose(sums, alone, atol=1e-6)
    model = transformers.LlamaForCausalLM.from_pretrained(small, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)
    model.config.implicit_prm = {"reference": str(large), "beta": 0.5}
    model.save_pretrained(tmp_path / "prm")
    tok.save_pretrained(tmp_path / "prm")
    prm = HFPRM(tmp_path / "prm", kv_budget=4096)
    got = []
    for r, (p, s) in enumerate(zip(problems, steps)):
        prm.start([1000 * r], [p.question])
        for k, step in enumerate(s):
            got += prm.score_steps([1000 * r + k], [1000 * r + k + 1], [step])
    want = torch.sigmoid(0.5 * sums[1]).tolist()
    assert got == pytest.approx(want, abs=1e-4)
