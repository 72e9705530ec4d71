"""The ponder command line for a new user: every common mistake is one line naming the cause and
the fix (exit status 2, no traceback), found before any model loads; Ctrl-C says how to resume;
--version, help without subcommands, help texts, defaults (device, KV pool, --limit on
builtin:arith) and the warning for the built-in policy on other problems.

Most cases call ``ponder.cli.main`` with the scripted models of test_evaluate.py in place of
HFPolicy / HFPRM (milliseconds); a few run ``python -m ponder`` in a subprocess to see exactly
what a user sees.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from ponder import cli
from ponder import evaluation as evaluate
from ponder.evaluation import run as evaluation_run
from ponder.toy import train
from test_evaluate import _args, _dataset, _error_of, _main, fake_models, model_dir


@pytest.fixture
def models(monkeypatch):
    """Scripted models in place of HFPolicy / HFPRM (see test_evaluate.fake_models)."""
    return fake_models(monkeypatch)


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _ponder(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ponder", *argv], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=300)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ----------------------------------------------------------------------------- --out


def test_out_that_is_a_file_is_refused_before_any_model_loads(tmp_path, models, capsys):
    (tmp_path / "taken").write_text("x")
    argv = _args(tmp_path, "--methods", "majority", "--n", "2")
    argv[argv.index("--out") + 1] = str(tmp_path / "taken")
    assert _main(argv) == 2
    line = _error_of(capsys)
    assert "--out" in line and "not a directory" in line and models == []


def test_out_that_cannot_be_created_is_refused_before_any_model_loads(tmp_path, models, capsys):
    (tmp_path / "file").write_text("x")
    argv = _args(tmp_path, "--methods", "majority", "--n", "2")
    argv[argv.index("--out") + 1] = str(tmp_path / "file" / "run")  # a parent that is a file
    assert _main(argv) == 2
    line = _error_of(capsys)
    assert "--out" in line and "cannot write there" in line and "writable directory" in line
    assert models == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_is_refused(tmp_path, models, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    argv = _args(tmp_path, "--methods", "majority", "--n", "2")
    argv[argv.index("--out") + 1] = str(ro)
    try:
        assert _main(argv) == 2
    finally:
        ro.chmod(0o700)
    assert "cannot write there" in _error_of(capsys) and models == []


@pytest.mark.slow
def test_bad_out_in_a_subprocess_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    line = _one_line(_ponder("run", "--out", str(tmp_path / "file" / "run")))
    assert line.startswith("ponder run: error: --out") and "writable directory" in line


# ----------------------------------------------------------------------------- --device / --dtype


def test_cuda_without_a_cuda_torch(tmp_path, models, capsys, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _main(_args(tmp_path, "--methods", "majority", "--n", "2", "--device", "cuda")) == 2
    line = _error_of(capsys)
    assert "--device cuda" in line and "without CUDA" in line and "--device cpu" in line
    assert models == [] and not (tmp_path / "out").exists()


def test_cuda_torch_without_a_gpu(tmp_path, models, capsys, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _main(_args(tmp_path, "--methods", "majority", "--n", "2", "--device", "cuda:0")) == 2
    line = _error_of(capsys)
    assert "no CUDA GPU" in line and "nvidia-smi" in line and models == []


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "banana"])
def test_unknown_device(tmp_path, models, capsys, device):
    assert _main(_args(tmp_path, "--methods", "majority", "--n", "2", "--device", device)) == 2
    line = _error_of(capsys)
    assert f"--device {device!r} is not a device" in line and "cpu, cuda" in line and models == []


@pytest.mark.slow
def test_unknown_device_in_a_subprocess_is_one_line(tmp_path):
    line = _one_line(_ponder("run", "--device", "gpu", "--out", str(tmp_path / "o")))
    assert "--device 'gpu' is not a device" in line


def test_unknown_dtype(tmp_path, models, capsys):
    assert _main(_args(tmp_path, "--methods", "majority", "--n", "2", "--dtype", "float99")) == 2
    assert "--dtype 'float99' is not a torch dtype" in _error_of(capsys) and models == []


def test_device_defaults_to_cuda_when_torch_sees_a_gpu(tmp_path, models, capsys, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _main(_args(tmp_path, "--methods", "majority", "--n", "2")) == 0
    assert ("policy", "org/policy", "cuda") in models
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())
    assert manifest["execution"]["device"] == "cuda" and manifest["models"]["dtype"] == "bfloat16"


def test_device_defaults_to_cpu_without_a_gpu(tmp_path, models, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _main(_args(tmp_path, "--methods", "majority", "--n", "2")) == 0
    assert ("policy", "org/policy", "cpu") in models
    assert json.loads((tmp_path / "out" / "run.json").read_text())["models"]["dtype"] == "float32"


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("flag", ["--policy", "--prm", "--prm-reference", "--reference-policy"])
def test_a_directory_that_is_not_a_model_names_the_option_and_what_is_missing(tmp_path, models, capsys, flag):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    argv = _args(tmp_path, "--methods", "best_of_n", "--n", "2")
    if flag in argv:
        argv[argv.index(flag) + 1] = str(empty)
    else:
        argv += [flag, str(empty)]
    assert _main(argv) == 2
    line = _error_of(capsys)
    assert f"{flag} {empty}" in line and "not a Hugging Face model directory" in line
    assert "config.json" in line and "weights" in line and "tokenizer" in line and models == []


def test_a_model_directory_without_weights_says_so(tmp_path, models, capsys):
    half = tmp_path / "half"
    model_dir(half)
    (half / "model.safetensors").unlink()
    argv = _args(tmp_path, "--methods", "majority", "--n", "2")
    argv[argv.index("--policy") + 1] = str(half)
    assert _main(argv) == 2
    line = _error_of(capsys)
    assert "--policy" in line and "no weights" in line and "config.json" not in line.split("no weights")[1]


@pytest.mark.slow
def test_not_a_model_in_a_subprocess_is_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    line = _one_line(_ponder("run", "--policy", str(tmp_path / "m"), "--out", str(tmp_path / "o")))
    assert "--policy" in line and "config.json" in line


@pytest.mark.parametrize("flag", ["--policy", "--prm", "--reference-policy"])
def test_a_hub_id_while_offline_names_the_model(tmp_path, models, capsys, monkeypatch, flag):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = _args(tmp_path, "--methods", "best_of_n", "--n", "2")
    ref = "ponder-tests/never-downloaded-model"
    if flag in argv:
        argv[argv.index(flag) + 1] = ref
    else:
        argv += [flag, ref]
    # the other hub ids of _args must not be what fails: make them local
    for other in ("--policy", "--prm"):
        if other != flag:
            argv[argv.index(other) + 1] = model_dir(tmp_path / other.strip("-"))
    assert _main(argv) == 2
    line = _error_of(capsys)
    assert f"{flag} {ref}" in line and "HF_HUB_OFFLINE" in line and "download" in line and models == []


def test_a_download_that_fails_names_the_model(tmp_path, capsys, monkeypatch):
    def offline(*_a, **_k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them")

    monkeypatch.setattr(cli, "_build_policy", offline)
    assert _main(_args(tmp_path, "--methods", "majority", "--n", "2")) == 2
    line = _error_of(capsys)
    assert "--policy org/policy" in line and "could not download" in line and "local directory" in line


def test_a_model_that_fails_to_load_is_one_line(tmp_path, capsys, monkeypatch):
    def broken(*_a, **_k):
        raise ValueError("Unrecognized model in /x. Should have a `model_type` key in its config.json")

    monkeypatch.setattr(cli, "_build_prm", broken)
    monkeypatch.setattr(cli, "_build_policy", lambda *a, **k: object())
    assert _main(_args(tmp_path, "--methods", "best_of_n", "--n", "2")) == 2
    line = _error_of(capsys)
    assert "--prm org/prm: could not load the model" in line and "model_type" in line


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_says_how_to_resume_and_the_resume_completes(tmp_path, models, capsys, monkeypatch):
    argv = _args(tmp_path, "--methods", "greedy,majority", "--n", "2", "--batch-size", "2")
    real = evaluation_run.search_batch
    calls = []

    def interrupted_after_one_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluation_run, "search_batch", interrupted_after_one_batch)
    assert _main(argv) == 130
    err = capsys.readouterr().err
    out_dir = tmp_path / "out"
    assert f"interrupted; rerun with --resume --out {out_dir}" in err and "Traceback" not in err
    kept = (out_dir / "results.jsonl").read_text().splitlines()
    assert len(kept) == 2  # the first batch: greedy on 2 problems
    monkeypatch.setattr(evaluation_run, "search_batch", real)
    assert _main(argv + ["--resume"]) == 0
    rows = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len({evaluate.row_key(r) for r in rows}) == 2 * 5  # 5 problems x (greedy, majority)
    assert {(r["method"], r["n"]) for r in rows} == {("greedy", 1), ("majority", 2)}


def test_ctrl_c_before_the_output_directory_is_known(monkeypatch, capsys):
    def interrupt(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_info", interrupt)
    assert cli.main(["info"]) == 130
    assert "ponder info: interrupted" in capsys.readouterr().err


# ----------------------------------------------------------------------------- commands and help


def test_version(capsys):
    from ponder import __version__

    assert _main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ponder {__version__}"


@pytest.mark.parametrize("command", ["bench", "toy"])
def test_a_command_without_subcommand_prints_its_help(capsys, command):
    assert _main([command]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ponder {command}") and ("core" if command == "bench" else "train") in out


RST = re.compile(r"`|:(func|class|meth|data|mod|attr):")  # RST literals, roles, interpreted text


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["bench", "--help"], ["toy", "--help"],
                                  ["toy", "train", "--help"], ["bench", "core", "--help"], ["info", "--help"]])
def test_help_texts_have_no_rst_markup(capsys, argv):
    assert _main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ponder")
    assert not RST.search(out), RST.search(out)


def test_every_toy_train_option_has_help():
    actions = [a for a in train.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) >= 20
    for action in actions:
        assert action.help and len(action.help) > 10, action.option_strings


# ----------------------------------------------------------------------------- defaults


def test_kv_pool_is_sized_from_the_workload_with_a_cap(tmp_path, monkeypatch, capsys):
    budgets = []

    def policy(path, device, dtype, kv_budget=None):
        budgets.append(kv_budget)
        from test_evaluate import scripted_policy

        return scripted_policy()

    monkeypatch.setattr(cli, "_build_policy", policy)
    data = _dataset(tmp_path)  # 5 problems, each question under 20 characters
    base = ["run", "--policy", "org/p", "--dataset", data, "--methods", "majority", "--no-progress",
            "--max-steps", "6", "--max-step-tokens", "40"]
    assert _main(base + ["--n", "2", "--out", str(tmp_path / "a"), "--limit", "3"]) == 0
    longest = max(len(f"question {i}") for i in range(3)) + 64 + 6 * 40
    assert budgets[-1] == 3 * 2 * longest  # problems per batch x n x longest path
    assert _main(base + ["--n", "64", "--out", str(tmp_path / "b"), "--max-steps", "64"]) == 0
    assert budgets[-1] == cli.KV_POOL_CAP
    assert _main(base + ["--n", "2", "--out", str(tmp_path / "c"), "--kv-budget", "999"]) == 0
    assert budgets[-1] == 999


def test_limit_on_builtin_arith_spreads_over_the_levels(tmp_path, models, capsys):
    argv = ["run", "--limit", "5", "--methods", "majority", "--n", "1", "--reference-policy", "none",
            "--out", str(tmp_path / "o"), "--no-progress"]
    assert _main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["level"] for r in rows) == [1, 2, 3, 4, 5]


def test_builtin_policy_on_other_problems_warns_once(tmp_path, models, capsys):
    data = _dataset(tmp_path, [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(3)], name="q.jsonl")
    argv = ["run", "--dataset", data, "--methods", "majority", "--n", "1", "--out", str(tmp_path / "o"), "--no-progress",
            "--max-steps", "6", "--max-step-tokens", "40"]
    assert _main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "builtin:policy-small" in warnings[0] and "Compute <expression>." in warnings[0] and "3 of 3" in warnings[0]


def test_builtin_policy_on_builtin_arith_does_not_warn(tmp_path, models, capsys):
    argv = ["run", "--limit", "2", "--methods", "majority", "--n", "1", "--out", str(tmp_path / "o"), "--no-progress"]
    assert _main(argv) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.slow
def test_no_progress_silences_model_loading_bars(tmp_path):
    argv = ["run", "--limit", "1", "--methods", "greedy", "--reference-policy", "none", "--device", "cpu"]
    quiet = subprocess.run([sys.executable, "-m", "ponder", *argv, "--no-progress", "--out", str(tmp_path / "q")],
                           capture_output=True, text=True, env=ENV, timeout=600)
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading" not in quiet.stderr and "it/s" not in quiet.stderr and "%|" not in quiet.stderr
    loud = subprocess.run([sys.executable, "-m", "ponder", *argv, "--out", str(tmp_path / "l")],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert loud.returncode == 0, loud.stderr
    assert "%|" in loud.stderr  # the bars --no-progress removes (loading and the evaluation's own)


@pytest.mark.slow
def test_python_api_takes_builtin_model_names():
    import ponder

    policy = ponder.HFPolicy("builtin:policy-small", device="cpu")
    prm = ponder.HFPRM("builtin:prm", device="cpu")
    assert prm.format == "implicit-prm" and prm.ref_model is not None
    results = ponder.search(["Compute 2 + 3."], policy, prm, ponder.SearchConfig(method="best_of_n", n=2, seed=0))
    completions = results[0].completions
    assert len(completions) == 2 and all(c.step_scores for c in completions)
    assert results[0].answer in {c.answer for c in completions}


# ----------------------------------------------------------------------------- particle filtering / REBASE options


def test_pf_and_rebase_options_reach_the_search_configs(tmp_path, models, capsys, monkeypatch):
    """--pf-* / --rebase-temperature set the SearchConfig fields of those names: in run.json's
    search section and in the configs the batches are searched with."""
    seen = []
    real = evaluation_run.search_batch

    def recording(batch, policy, prm, config, methods):
        seen.append(config)
        return real(batch, policy, prm, config, methods)

    monkeypatch.setattr(evaluation_run, "search_batch", recording)
    argv = _args(tmp_path, "--methods", "particle_filtering,rebase", "--n", "4", "--limit", "2",
                 "--pf-temperature", "0.5", "--pf-weights", "raw", "--pf-resampling", "systematic",
                 "--pf-ess-threshold", "0.25", "--rebase-temperature", "0.3")
    assert _main(argv) == 0
    expected = {"pf_temperature": 0.5, "pf_weights": "raw", "pf_resampling": "systematic", "pf_ess_threshold": 0.25,
                "rebase_temperature": 0.3}
    search = json.loads((tmp_path / "out" / "run.json").read_text())["search"]
    assert {k: search[k] for k in expected} == expected
    assert sorted({c.method for c in seen}) == ["particle_filtering", "rebase"]
    for config in seen:
        assert {k: getattr(config, k) for k in expected} == expected
    # the defaults are SearchConfig's
    from ponder import SearchConfig

    defaults = SearchConfig()
    args = cli.build_run_parser().parse_args([])
    assert {k: getattr(args, k) for k in expected} == {k: getattr(defaults, k) for k in expected}


@pytest.mark.parametrize("flag, value, message", [
    ("--pf-temperature", "0", "--pf-temperature must be a finite number > 0; got 0.0"),
    ("--pf-temperature", "nan", "--pf-temperature must be a finite number > 0"),
    ("--rebase-temperature", "-1", "--rebase-temperature must be a finite number > 0; got -1.0"),
    ("--pf-weights", "cubic", "--pf-weights must be one of logit, softmax, raw; got 'cubic'"),
    ("--pf-resampling", "stratified", "--pf-resampling must be one of multinomial, systematic; got 'stratified'"),
    ("--pf-ess-threshold", "1.5", "--pf-ess-threshold must be a number in [0, 1]; got 1.5"),
    ("--pf-finished", "drop", "--pf-finished must be one of resample, keep; got 'drop'"),
    ("--rebase-allocation", "round", "--rebase-allocation must be one of ceil, proportional; got 'round'"),
])
def test_bad_pf_and_rebase_options_are_one_line(tmp_path, models, capsys, flag, value, message):
    assert _main(_args(tmp_path, "--methods", "particle_filtering,rebase", "--n", "4", flag, value)) == 2
    assert message in _error_of(capsys)
    assert models == [] and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_pf_option_in_a_subprocess_is_one_line(tmp_path):
    line = _one_line(_ponder("run", "--methods", "particle_filtering", "--pf-ess-threshold", "-0.5",
                             "--out", str(tmp_path / "o")))
    assert line == "ponder run: error: --pf-ess-threshold must be a number in [0, 1]; got -0.5"
    assert not (tmp_path / "o").exists()


def test_early_stop_options_reach_the_sampling_votes(tmp_path, models, capsys, monkeypatch):
    """--early-stop / --round-size / --futility / --futility-score make SearchConfig.early_stop of
    majority and the best-of-N votes (each searched alone: they stop at their own rounds), not
    of the tree methods; run.json and every row record it."""
    from ponder.methods.stopping import EarlyStop

    seen = []
    real = evaluation_run.search_batch

    def recording(batch, policy, prm, config, methods):
        seen.append((config, list(methods)))
        return real(batch, policy, prm, config, methods)

    monkeypatch.setattr(evaluation_run, "search_batch", recording)
    argv = _args(tmp_path, "--methods", "majority,best_of_n,dvts", "--n", "8", "--limit", "2", "--early-stop", "0.9",
                 "--round-size", "2", "--futility", "0.25", "--futility-score", "0.1")
    assert _main(argv) == 0
    assert "early stop of the sampling votes at 0.9 in rounds of 2, futility 0.25 below PRM score 0.1" in capsys.readouterr().err
    rule = EarlyStop(0.9, 2, 0.25, 0.1)
    by_method = {methods[0]: config for config, methods in seen}
    assert all(len(methods) == 1 for _, methods in seen)  # no shared sampling under early stop
    assert by_method["majority"].early_stop == rule and by_method["best_of_n"].early_stop == rule
    assert by_method["dvts"].early_stop is None
    search = json.loads((tmp_path / "out" / "run.json").read_text())["search"]
    assert search["early_stop"] == {"threshold": 0.9, "round_size": 2, "futility": 0.25, "futility_score": 0.1}
    rows = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    for row in rows:
        if row["method"] in ("majority", "best_of_n"):
            assert row["chosen"]["futility_score"] == 0.1 and row["num_completions"] <= 8
            assert row["chosen"]["stopped_by"] in ("settled", "futility", None)
    # the round size defaults to EarlyStop's
    assert cli._early_stop(cli.build_run_parser().parse_args(["--early-stop", "0.95"])) == EarlyStop(0.95)


@pytest.mark.parametrize("argv, message", [
    (["--futility", "0.2"], "--futility sets how early stopping works: add --early-stop P (e.g. --early-stop 0.95)"),
    (["--round-size", "2"], "--round-size sets how early stopping works: add --early-stop P"),
    (["--early-stop", "0.5"], "--early-stop must be a probability in (0.5, 1] (e.g. 0.95); got 0.5"),
    (["--early-stop", "nan"], "--early-stop must be a probability in (0.5, 1]"),
    (["--early-stop", "0.95", "--futility", "1"], "--futility must be a probability in (0, 1) (e.g. 0.25); got 1.0"),
    (["--early-stop", "0.95", "--futility-score", "0.1"], "--futility-score gates the futility rule: add --futility EPS"),
    (["--early-stop", "0.95", "--futility", "0.2", "--futility-score", "2"],
     "--futility-score must be None or a number in (0, 1]; got 2.0"),
    (["--early-stop", "0.95", "--round-size", "0"], "--round-size must be an integer >= 1; got 0"),
])
def test_bad_early_stop_options_are_one_line(tmp_path, models, capsys, argv, message):
    assert _main(_args(tmp_path, "--methods", "majority", "--n", "4", *argv)) == 2
    assert message in _error_of(capsys)
    assert models == [] and not (tmp_path / "out").exists()


def test_gated_majority_needs_a_prm():
    from ponder import SearchConfig
    from ponder.evaluation import EvalConfig
    from ponder.methods.stopping import EarlyStop

    gated = EvalConfig(["majority"], [4], SearchConfig(early_stop=EarlyStop(0.95, 4, 0.2, 0.1)))
    assert gated.needs_prm
    with pytest.raises(ValueError, match="majority's early stop with early_stop.futility_score reads PRM scores"):
        gated.validate(has_prm=False)
    plain = EvalConfig(["majority"], [4], SearchConfig(early_stop=EarlyStop(0.95, 4, 0.2)))
    assert not plain.needs_prm and plain.validate(has_prm=False) is plain


def test_help_documents_the_pf_and_rebase_options(capsys):
    assert _main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--pf-temperature", "--pf-weights", "--pf-resampling", "--pf-ess-threshold", "--rebase-temperature",
                   "multinomial or systematic", "softmax", "particle_filtering, rebase"):
        assert option in out, option


# ----------------------------------------------------------------------------- search limits of the built-in task


def _search_of(out) -> dict:
    return json.loads((out / "run.json").read_text())["search"]


def test_builtin_arith_problems_get_their_tasks_limits_and_other_problems_the_generic_ones(tmp_path, models, capsys):
    """The limits follow what the problems are (Problem.task, set by the built-in loader), not
    the --dataset string: builtin:arith's problems get 16 iterations / 16 steps / 96 tokens, the
    same questions read from a file get SearchConfig's defaults; options given win."""
    from ponder.data import load_problems

    common = ["--methods", "majority", "--n", "1", "--reference-policy", "none", "--no-progress"]
    assert _main(["run", "--limit", "3", "--out", str(tmp_path / "a"), *common]) == 0
    a = _search_of(tmp_path / "a")
    assert (a["num_iterations"], a["max_steps"], a["sampling"]["max_step_tokens"]) == (16, 16, 96)
    rows = [{"problem": p.problem, "answer": p.answer, "level": p.level, "id": p.id}
            for p in load_problems("builtin:arith", limit=3)]
    data = _dataset(tmp_path, rows, name="arith_copy.jsonl")
    assert _main(["run", "--dataset", data, "--out", str(tmp_path / "b"), *common]) == 0
    b = _search_of(tmp_path / "b")
    assert (b["num_iterations"], b["max_steps"], b["sampling"]["max_step_tokens"]) == (40, 64, 256)
    assert _main(["run", "--limit", "3", "--out", str(tmp_path / "c"), "--max-steps", "20", *common]) == 0
    c = _search_of(tmp_path / "c")
    assert (c["num_iterations"], c["max_steps"], c["sampling"]["max_step_tokens"]) == (16, 20, 96)


def test_search_option_mistakes_name_the_option(tmp_path, models, capsys):
    """EvalConfig.validate / SearchConfig.validate messages, with their fields as `ponder run` options."""
    for extra, message in [
        (["--max-steps", "2"], "--max-steps (2) must be >= --num-iterations (3)"),
        (["--beam-width", "0"], "--beam-width must be an integer >= 1; got 0"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1; got 0"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--max-step-tokens", "0"], "--max-step-tokens must be >= 1"),
        (["--lookahead", "-1"], "--lookahead must be an integer >= 0; got -1"),
    ]:
        assert _main(_args(tmp_path, "--methods", "beam_search", "--n", "4", *extra)) == 2
        assert message in _error_of(capsys), extra
    assert models == [] and not (tmp_path / "out").exists()


def test_bench_core_without_a_source_checkout(monkeypatch, tmp_path, capsys):
    """An installed ponder has no benchmarks/: `ponder bench core --help` says where the benchmark
    is (exit 0), `ponder bench core` refuses in one line (exit 2)."""
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "ponder" / "cli.py"))
    assert _main(["bench", "core", "--help"]) == 0
    assert "source checkout" in capsys.readouterr().out
    assert _main(["bench", "core"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bench_core.py" in err
