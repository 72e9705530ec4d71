"""OUT/run.json: what defines a run's rows, and --resume refusing a run that differs.

A run that is resumed with another dataset (or other content under the same name), another
slice, other models (name or weights), another search or sampling setting or another ponder
version must be refused with one line naming the setting; settings that do not change what a
row measures (device, batch size, KV pool, adding methods or n) may change. The CLI runs with
the scripted models of test_evaluate.py (milliseconds).
"""

from __future__ import annotations

import json

import pytest

import ponder
from ponder import evaluation as evaluate
from ponder.data import Problem, load_problems
from test_evaluate import PROBLEMS, _base, _dataset, _error_of, _evaluate, _main, fake_models, model_dir


@pytest.fixture
def models(monkeypatch):
    """Scripted models in place of HFPolicy / HFPRM (see test_evaluate.fake_models)."""
    return fake_models(monkeypatch)


def _run_args(tmp_path, *extra):
    return ["run", "--policy", model_dir(tmp_path / "policy"), "--prm", model_dir(tmp_path / "prm"),
            "--dataset", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "out"), "--no-progress",
            "--methods", "greedy,best_of_n", "--n", "2", "--num-iterations", "3", "--max-steps", "6",
            "--max-step-tokens", "40", "--limit", "3", *extra]


@pytest.fixture
def first_run(tmp_path, models, capsys):
    """A finished run in tmp_path/out; returns its run.json."""
    _dataset(tmp_path)
    assert _main(_run_args(tmp_path)) == 0
    capsys.readouterr()
    return json.loads((tmp_path / "out" / "run.json").read_text())


def test_run_json_records_what_defines_the_rows(tmp_path, first_run):
    m = first_run
    assert m["ponder_version"] == ponder.__version__
    d = m["dataset"]
    assert d["source"] == str(tmp_path / "data.jsonl") and d["limit"] == 3 and d["num_problems"] == 3
    assert d["content_hash"] == evaluate.dataset_hash(load_problems(tmp_path / "data.jsonl", limit=3))
    assert m["models"]["policy"]["ref"] == str(tmp_path / "policy")
    assert m["models"]["policy"]["revision"] == evaluate.model_revision(tmp_path / "policy")
    assert m["models"]["prm"]["revision"].startswith("sha256:") and m["models"]["dtype"] == "float32"
    assert m["search"]["sampling"]["temperature"] == 0.8 and m["search"]["max_steps"] == 6
    assert "n" not in m["search"] and "method" not in m["search"]  # these may grow on resume


# each kind of setting that defines the rows, and the name the refusal must give it
MISMATCHES = [
    (["--temperature", "0.5"], "--temperature differs: 0.8 in run.json, 0.5 now"),
    (["--top-p", "0.9"], "--top-p differs"),
    (["--seed", "3"], "--seed differs: 0 in run.json, 3 now"),
    (["--max-step-tokens", "30"], "--max-step-tokens differs"),
    (["--max-steps", "5"], "--max-steps differs"),
    (["--num-iterations", "2"], "--num-iterations differs"),
    (["--beam-width", "1"], "--beam-width differs"),
    (["--agg", "min"], "--agg differs"),
    (["--vote", "majority"], "--vote differs"),
    (["--lookahead", "1"], "--lookahead differs"),
    (["--compat-search-and-learn"], "--compat-search-and-learn differs"),
    (["--limit", "2"], "--limit differs: 3 in run.json, 2 now"),
    (["--split", "train"], "--split differs"),
    (["--answer-field", "answer", "--problem-field", "problem", "--level-field", "lvl"], "--level-field differs"),
    (["--id-field", "problem"], "--id-field differs"),
    (["--prm-format", "rlhflow"], "--prm-format differs: 'math-shepherd' in run.json, 'rlhflow' now"),
    (["--dtype", "bfloat16"], "--dtype differs: 'float32' in run.json, 'bfloat16' now"),
    (["--reference-policy", "none"], None),  # leaving the reference out is not a difference
]


@pytest.mark.parametrize("extra, message", MISMATCHES, ids=[" ".join(e) for e, _ in MISMATCHES])
def test_resume_refuses_another_search_or_dataset_setting(tmp_path, first_run, models, capsys, extra, message):
    argv = _run_args(tmp_path)
    for flag in extra:  # replace an option already given, else add it
        if flag.startswith("--") and flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
    before = (tmp_path / "out" / "results.jsonl").read_text()
    code = _main(argv + extra + ["--resume"])
    if message is None:
        assert code == 0
        return
    assert code == 2
    line = _error_of(capsys)
    assert message in line and "--resume" in line and "another --out" in line
    assert (tmp_path / "out" / "results.jsonl").read_text() == before  # nothing was added


def test_resume_refuses_another_dataset_file(tmp_path, first_run, models, capsys):
    other = _dataset(tmp_path, name="other.jsonl")
    argv = _run_args(tmp_path)
    argv[argv.index("--dataset") + 1] = other
    assert _main(argv + ["--resume"]) == 2
    assert "--dataset differs" in _error_of(capsys)


def test_resume_refuses_changed_dataset_content_under_the_same_name(tmp_path, first_run, models, capsys):
    rows = [{"problem": f"question {i}", "answer": "42", "unique_id": f"p{i}"} for i in range(5)]
    _dataset(tmp_path, rows)  # same file name, same ids, other answers
    assert _main(_run_args(tmp_path, "--resume")) == 2
    line = _error_of(capsys)
    assert "the dataset's content" in line and "sha256:" in line


@pytest.mark.parametrize("flag", ["--policy", "--prm"])
def test_resume_refuses_another_model(tmp_path, first_run, models, capsys, flag):
    argv = _run_args(tmp_path)
    argv[argv.index(flag) + 1] = model_dir(tmp_path / "elsewhere")
    assert _main(argv + ["--resume"]) == 2
    assert f"{flag} differs" in _error_of(capsys)


@pytest.mark.parametrize("flag, name", [("--policy", "policy"), ("--prm", "prm")])
def test_resume_refuses_changed_weights_in_the_same_directory(tmp_path, first_run, models, capsys, flag, name):
    (tmp_path / name / "model.safetensors").write_bytes(b"retrained weights")
    assert _main(_run_args(tmp_path, "--resume")) == 2
    assert f"{flag}'s weights (content hash / hub commit) differs" in _error_of(capsys)


def test_resume_refuses_another_reference_policy(tmp_path, first_run, models, capsys):
    # the first run had no reference policy; a second one adds it, a third changes it
    assert _main(_run_args(tmp_path, "--resume", "--reference-policy", model_dir(tmp_path / "big"))) == 0
    capsys.readouterr()
    assert _main(_run_args(tmp_path, "--resume", "--reference-policy", model_dir(tmp_path / "bigger"))) == 2
    assert "--reference-policy differs" in _error_of(capsys)


def test_resume_refuses_another_ponder_version(tmp_path, first_run, models, capsys, monkeypatch):
    monkeypatch.setattr(ponder, "__version__", "99.0")
    assert _main(_run_args(tmp_path, "--resume")) == 2
    assert "the ponder version differs" in (line := _error_of(capsys)) and "'99.0' now" in line


def test_resume_refuses_another_implicit_prm_beta(tmp_path, models, capsys):
    _dataset(tmp_path)
    implicit = ["--prm-format", "implicit-prm", "--prm-beta", "0.1"]
    assert _main(_run_args(tmp_path, *implicit)) == 0
    assert _main(_run_args(tmp_path, *implicit, "--resume")) == 0
    capsys.readouterr()
    assert _main(_run_args(tmp_path, "--prm-format", "implicit-prm", "--prm-beta", "0.5", "--resume")) == 2
    assert "--prm-beta differs: 0.1 in run.json, 0.5 now" in _error_of(capsys)


def test_resume_refuses_a_limit_where_there_was_none(tmp_path, models, capsys):
    _dataset(tmp_path)
    argv = _run_args(tmp_path)
    del argv[argv.index("--limit") : argv.index("--limit") + 2]
    assert _main(argv) == 0
    capsys.readouterr()
    assert _main(argv + ["--limit", "2", "--resume"]) == 2
    assert "--limit differs: null in run.json, 2 now" in _error_of(capsys)


def test_resume_accepts_what_does_not_change_a_row(tmp_path, first_run, models, capsys):
    """More n, more methods, another batch size, device or KV pool: the same rows, more of them."""
    argv = _run_args(tmp_path, "--resume", "--batch-size", "1", "--kv-budget", "5000", "--device", "cpu")
    argv[argv.index("--n") + 1] = "2,4"
    argv[argv.index("--methods") + 1] = "greedy,best_of_n,majority"
    assert _main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert {(r["method"], r["n"]) for r in rows} == {("greedy", 1), ("best_of_n", 2), ("best_of_n", 4),
                                                     ("majority", 2), ("majority", 4)}
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["execution"]["batch_size"] == 1 and record["models"] == first_run["models"]


def test_resume_of_results_without_run_json_is_refused(tmp_path, first_run, models, capsys):
    (tmp_path / "out" / "run.json").unlink()  # as an older ponder left it
    assert _main(_run_args(tmp_path, "--resume")) == 2
    line = _error_of(capsys)
    assert "no run.json" in line and "cannot be checked" in line


def test_library_resume_refuses_other_problems(tmp_path):
    _evaluate(tmp_path, methods=["majority"], ns=[2])
    changed = [Problem(p.id, p.problem + " (edited)", p.answer, p.level) for p in PROBLEMS]
    with pytest.raises(ValueError, match="the dataset's content"):
        _evaluate(tmp_path, resume=True, methods=["majority"], ns=[2], problems=changed)
    # the same problems resume; a manifest that does not record base_config is refused
    _evaluate(tmp_path, resume=True, methods=["majority"], ns=[2, 4])
    with pytest.raises(ValueError, match="base_config"):
        _evaluate(tmp_path, resume=True, methods=["majority"], ns=[2],
                  manifest=evaluate.run_manifest(PROBLEMS, _base(seed=9)))


def test_manifest_difference_skips_unknown_keys_and_execution():
    old = {"a": {"x": 1, "y": None}, "execution": {"device": "cuda"}}
    assert evaluate.manifest_difference(old, {"a": {"x": 1, "z": 5}, "execution": {"device": "cpu"}}) is None
    assert evaluate.manifest_difference(old, {"a": {"x": 2}}) == "a.x differs: 1 in run.json, 2 now"
    assert evaluate.manifest_difference(old, {"a": {"y": 3}}) == "a.y differs: null in run.json, 3 now"


def test_manifest_difference_sees_a_setting_turned_into_an_object_and_back():
    """A setting null on one side and an object on the other (early_stop off / on) differs; it
    is not a key only one side knows."""
    es = {"threshold": 0.95, "round_size": 2, "futility": None, "futility_score": None}
    off, on = {"search": {"early_stop": None, "seed": 0}}, {"search": {"early_stop": es, "seed": 0}}
    assert evaluate.manifest_difference(off, on) == (
        '--early-stop differs: null in run.json, {"threshold": 0.95, "round_size": 2, "futility": null, '
        '"futility_score": null} now')
    assert evaluate.manifest_difference(on, off).startswith('--early-stop differs: {"threshold": 0.95')
    assert evaluate.manifest_difference(on, {"search": {"early_stop": {**es, "threshold": 0.9}, "seed": 0}}) == (
        "--early-stop differs: 0.95 in run.json, 0.9 now")
    assert evaluate.manifest_difference(on, on) is None and evaluate.manifest_difference(off, off) is None


# ----------------------------------------------------------------------------- problem ids


def test_problem_ids_default_to_the_datasets_id_field(tmp_path):
    for field in ("id", "unique_id", "problem_id"):
        rows = [{"problem": f"q{i}", "answer": "1", field: f"{field}-{i}"} for i in range(3)]
        got = load_problems(_dataset(tmp_path, rows, name=f"{field}.jsonl"))
        assert [p.id for p in got] == [f"{field}-{i}" for i in range(3)], field
        assert field not in got[0].meta
    # a field only some rows have is not an id field: rows are numbered
    rows = [{"problem": "a", "answer": "1", "id": "x"}, {"problem": "b", "answer": "2"}]
    assert [p.id for p in load_problems(_dataset(tmp_path, rows, name="partial.jsonl"))] == ["0", "1"]
    # an explicit --id-field wins
    rows = [{"problem": "a", "answer": "1", "id": "x", "key": "k1"}, {"problem": "b", "answer": "2", "id": "y", "key": "k2"}]
    assert [p.id for p in load_problems(_dataset(tmp_path, rows, name="key.jsonl"), id_field="key")] == ["k1", "k2"]
