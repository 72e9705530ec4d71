"""ponder.evaluation and `ponder run`: result rows, resume after a kill, summary, plot, CLI validation.

The models are the scripted ones of ``ponder.testing.scripted`` (steps and scores are deterministic hashes
of the path text; one token per character), so every run here takes milliseconds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from ponder import SearchConfig, cli
from ponder import evaluation as evaluate
from ponder.data import Problem
from ponder.evaluation import EvalConfig
from ponder.evaluation import run as evaluation_run
from ponder.protocols import SamplingParams
from ponder.testing.scripted import ScriptedPolicy, ScriptedPRM, TablePolicy, TablePRM


class Fresh:
    """A scripted model that, like HFPolicy / HFPRM, can serve one search after another: the
    scripted models of ``ponder.testing.scripted`` serve one forest each (node ids restart at 0 in every
    ``search`` call), so a ``start`` of ids already seen begins a new one. ``sample_calls`` / ``tokens_*`` add up."""

    def __init__(self, make):
        self.make, self.inner, self.sample_calls = make, None, []

    def start(self, root_ids, problems):
        # The engine starts searches as they are admitted; a new search call restarts ids at 0.
        if self.inner is None or any(r in self.inner.paths for r in root_ids):
            self.inner = self.make()
            self.inner.sample_calls = self.sample_calls
        return self.inner.start(root_ids, problems)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def scripted_policy():
    return Fresh(ScriptedPolicy)


def scripted_prm():
    return Fresh(ScriptedPRM)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # --device's default
REQUIRED = {"problem_id", "method", "n", "answer", "gold", "correct", "level", "policy_tokens", "prm_tokens", "wall_s"}

PROBLEMS = [
    Problem(id=f"p{i}", problem=f"question {i}", answer=str(i % 4), level=1 + i % 2) for i in range(5)
]
METHODS = ["greedy", "majority", "best_of_n", "beam_search", "dvts"]
NS = [2, 4]


def _base(**kw) -> SearchConfig:
    base = {"beam_width": 2, "num_iterations": 3, "max_steps": 6, "sampling": SamplingParams(max_step_tokens=40)}
    base.update(kw)
    return SearchConfig(**base)


def _evaluate(out_dir, resume=False, policy=None, prm=None, **kw):
    config = EvalConfig(methods=kw.pop("methods", METHODS), ns=kw.pop("ns", NS), base_config=kw.pop("base_config", _base()),
                        batch_size=kw.pop("batch_size", 2))
    return evaluate.run_evaluation(kw.pop("problems", PROBLEMS), policy or scripted_policy(), prm or scripted_prm(),
                                   config, out_dir=out_dir, resume=resume, progress=False, **kw)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _keys(rows) -> list[tuple]:
    return [evaluate.row_key(r) for r in rows]


def _expected_keys() -> set[tuple]:
    return {(p.id, "", m, n) for m, n in evaluate.plan(METHODS, NS) for p in PROBLEMS}


# ----------------------------------------------------------------------------- rows


def test_rows_written_per_problem_method_n(tmp_path):
    rows = _evaluate(tmp_path)
    # greedy runs once (n=1); every other method at every n
    assert evaluate.plan(METHODS, NS)[0] == ("greedy", 1)
    assert len(evaluate.plan(METHODS, NS)) == 1 + 4 * 2
    assert set(_keys(rows)) == _expected_keys() and len(rows) == len(_expected_keys())
    on_disk = [json.loads(line) for line in _lines(tmp_path / "results.jsonl")]
    # on disk in the order batches finished (shared-sample methods interleave), returned in plan order
    assert sorted(on_disk, key=evaluate.row_key) == sorted(rows, key=evaluate.row_key)
    for row in rows:
        assert REQUIRED <= set(row)
        assert isinstance(row["correct"], bool)
        assert row["policy_tokens"] == row["policy_tokens_generated"] + row["policy_tokens_prefilled"] > 0
        assert row["wall_s"] >= 0
        if row["method"] in ("greedy", "majority"):
            assert row["prm_tokens"] == 0
        else:
            assert row["prm_tokens"] > 0
    gold = {p.id: p for p in PROBLEMS}
    for row in rows:
        assert row["gold"] == gold[row["problem_id"]].answer
        assert row["level"] == gold[row["problem_id"]].level
        assert row["correct"] == (row["answer"] is not None and float(row["answer"]) == float(row["gold"]))
    assert any(r["correct"] for r in rows) and not all(r["correct"] for r in rows)
    assert json.loads((tmp_path / "run.json").read_text())["search"]["beam_width"] == 2


def test_sampling_methods_share_samples_with_the_same_answers_as_separate_runs(tmp_path):
    """majority / best_of_n / weighted_best_of_n at one n vote over one set of samples; each
    answer and policy budget equals that method's own search."""
    methods = ["majority", "best_of_n", "weighted_best_of_n"]
    shared = _evaluate(tmp_path / "shared", methods=methods)
    assert all(r["shared_samples"] for r in shared)
    keep = ("answer", "correct", "policy_tokens", "policy_tokens_generated", "num_completions")
    for m in methods:
        alone = _evaluate(tmp_path / m, methods=[m])
        assert not any(r["shared_samples"] for r in alone)
        mine = {evaluate.row_key(r): r for r in shared if r["method"] == m}
        assert len(mine) == len(alone) == len(PROBLEMS) * len(NS)
        for r in alone:
            got = mine[evaluate.row_key(r)]
            assert {k: got[k] for k in keep} == {k: r[k] for k in keep}
            assert got["prm_tokens"] == r["prm_tokens"]  # majority: 0 in both
    # the three share one sampling pass: policy sample calls as for one method
    policy = scripted_policy()
    _evaluate(tmp_path / "count", methods=methods, ns=[4], policy=policy)
    one = scripted_policy()
    _evaluate(tmp_path / "count1", methods=["majority"], ns=[4], policy=one)
    assert len(policy.sample_calls) == len(one.sample_calls)


class SmallCache(Fresh):
    """A scripted policy whose KV cache holds at most ``limit`` live searches' roots at once: a
    ``start`` that would exceed it raises ``KVCacheFull`` and keeps nothing (as HFPolicy)."""

    def __init__(self, limit):
        super().__init__(ScriptedPolicy)
        self.limit, self.starts, self.released, self.live = limit, [], [], set()

    def start(self, root_ids, problems):
        from ponder.hf.kv import KVCacheFull

        self.starts.append(len(problems))
        fresh = self.inner is None or any(r in self.inner.paths for r in root_ids)
        if fresh:
            self.live = set()  # a new search call: node ids restart
        if len(self.live) + len(problems) > self.limit:
            raise KVCacheFull("append needs 9 new blocks but only 0 are free")
        prompts = super().start(root_ids, problems) if fresh else self.inner.start(root_ids, problems)
        self.live.update(root_ids)
        return prompts

    def release(self, node_ids):
        self.released.extend(node_ids)
        self.live.difference_update(node_ids)
        return self.inner.release(node_ids)


def test_a_batch_larger_than_the_kv_cache_is_admitted_as_it_frees(tmp_path):
    policy = SmallCache(limit=2)
    rows = _evaluate(tmp_path, policy=policy, methods=["majority", "best_of_n"], ns=[2], batch_size=5)
    assert len(rows) == 2 * len(PROBLEMS)
    # the engine tried the whole batch, then admitted searches as roots were released
    assert policy.starts[0] == 5 and not policy.live
    assert sum(1 for s in policy.starts if s <= 2) >= 3
    assert set(range(len(PROBLEMS))) <= set(policy.released)
    # same answers as with a cache that holds everything
    roomy = _evaluate(tmp_path / "roomy", policy=SmallCache(limit=100), methods=["majority", "best_of_n"], ns=[2], batch_size=5)
    assert [r["answer"] for r in rows] == [r["answer"] for r in roomy]
    with pytest.raises(Exception, match="--kv-budget"):
        _evaluate(tmp_path / "none", policy=SmallCache(limit=0), methods=["majority"], ns=[2])


def test_rows_of_two_policies_are_kept_apart(tmp_path):
    a = _evaluate(tmp_path, methods=["greedy", "majority"], ns=[2], policy_label="small")
    b = _evaluate(tmp_path, resume=True, methods=["greedy"], ns=[2], policy_label="large")
    assert len(a) == 2 * len(PROBLEMS) and len(b) == len(PROBLEMS)
    summary = evaluate.summarize(a + b)
    assert [(e["policy"], e["method"], e["n"]) for e in summary] == [
        ("small", "greedy", 1), ("small", "majority", 2), ("large", "greedy", 1)]
    table = evaluate.markdown_table(summary)
    assert table.startswith("| policy | method |") and "| large | greedy | 1 |" in table
    assert evaluate.plot_scaling(summary, tmp_path).is_file()


def test_greedy_is_temperature_zero_majority_of_one():
    config = evaluate.method_config(_base(), "greedy", 16)
    assert (config.method, config.n, config.sampling.temperature) == ("majority", 1, 0.0)
    assert evaluate.method_config(_base(vote="best"), "best_of_n", 4).vote is None
    assert evaluate.method_config(_base(vote="best"), "dvts", 4).vote == "best"
    # Below the beam width the tree is n wide; above it n must be a multiple of the width.
    assert evaluate.method_config(_base(beam_width=4), "beam_search", 2).beam_width == 2
    assert evaluate.method_config(_base(beam_width=4), "dvts", 1).beam_width == 1
    assert evaluate.method_config(_base(beam_width=4), "dvts", 8).beam_width == 4
    with pytest.raises(ValueError, match="divisible"):
        evaluate.method_config(_base(beam_width=4), "beam_search", 6)
    with pytest.raises(ValueError, match="unknown method"):
        evaluate.plan(["nope"], [1])


def test_prm_free_methods_run_without_prm(tmp_path):
    rows = evaluate.run_evaluation(PROBLEMS, scripted_policy(), None, EvalConfig(["greedy", "majority"], [4], _base()),
                                   out_dir=tmp_path, resume=False, progress=False)
    assert len(rows) == 2 * len(PROBLEMS)
    with pytest.raises(ValueError, match="method dvts needs a PRM: pass prm;"):
        evaluate.run_evaluation(PROBLEMS, scripted_policy(), None, EvalConfig(["dvts"], [4], _base()),
                                out_dir=tmp_path / "x", resume=False, progress=False)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- resume


def test_refuses_existing_results_without_resume(tmp_path):
    _evaluate(tmp_path)
    before = (tmp_path / "results.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        _evaluate(tmp_path)
    assert (tmp_path / "results.jsonl").read_bytes() == before


def test_resume_after_kill_completes_without_duplicates(tmp_path):
    full = _evaluate(tmp_path)
    path = tmp_path / "results.jsonl"
    lines = _lines(path)
    keep = 13
    # a kill in the middle of writing row 14: half a JSON line, no newline
    path.write_text("\n".join(lines[:keep]) + "\n" + lines[keep][: len(lines[keep]) // 2])

    policy = scripted_policy()
    resumed = _evaluate(tmp_path, resume=True, policy=policy)
    on_disk = [json.loads(line) for line in _lines(path)]  # every line parses: the half line is gone
    assert len(on_disk) == len(full)
    assert sorted(_keys(on_disk)) == sorted(_keys(full))
    assert on_disk[:keep] == [json.loads(line) for line in lines[:keep]]  # finished rows untouched
    assert set(_keys(resumed)) == _expected_keys() and len(resumed) == len(full)
    # the scripted models are deterministic per problem: the recomputed rows agree
    strip = lambda rows: sorted((evaluate.row_key(r), r["answer"], r["correct"]) for r in rows)
    assert strip(resumed) == strip(full)
    assert policy.sample_calls  # the missing rows were searched

    # resuming a finished run searches nothing and writes nothing
    before = path.read_bytes()
    idle = scripted_policy()
    again = _evaluate(tmp_path, resume=True, policy=idle)
    assert idle.sample_calls == [] and path.read_bytes() == before
    assert sorted(_keys(again)) == sorted(_keys(full))


def test_resume_drops_duplicates_and_adds_new_n(tmp_path):
    _evaluate(tmp_path, methods=["majority"], ns=[2])
    path = tmp_path / "results.jsonl"
    lines = _lines(path)
    path.write_text("\n".join(lines + lines[:2]))  # duplicated rows, no final newline
    rows = _evaluate(tmp_path, resume=True, methods=["majority"], ns=[2, 4])
    on_disk = _keys(json.loads(line) for line in _lines(path))
    assert len(on_disk) == len(set(on_disk)) == 2 * len(PROBLEMS)
    assert len(rows) == 2 * len(PROBLEMS)


def test_resume_rejects_a_different_search_config(tmp_path):
    _evaluate(tmp_path, methods=["majority"], ns=[2])
    with pytest.raises(ValueError, match="--seed differs: 0 in run.json, 7 now"):
        _evaluate(tmp_path, resume=True, methods=["majority"], ns=[2], base_config=_base(seed=7))


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "results.jsonl"
    row = json.dumps({"problem_id": "a", "method": "majority", "n": 1})
    path.write_text(f"{row}\nnot json\n{row}\n")
    with pytest.raises(ValueError, match="line 2"):
        evaluate.read_results(path)


# ----------------------------------------------------------------------------- summary


def _row(pid, method, n, correct, policy_tokens, prm_tokens, level, wall_s=1.0):
    return {"problem_id": pid, "method": method, "n": n, "correct": correct, "policy_tokens": policy_tokens,
                "prm_tokens": prm_tokens, "level": level, "wall_s": wall_s}


def test_summary_by_hand():
    rows = [
        _row("a", "majority", 4, True, 100, 0, 1),
        _row("b", "majority", 4, False, 200, 0, 2),
        _row("c", "majority", 4, True, 300, 0, 2, wall_s=4.0),
        _row("a", "dvts", 4, True, 50, 40, 1),
        _row("b", "dvts", 4, True, 70, 60, 2),
        _row("a", "greedy", 1, False, 10, 0, 1),
        _row("a", "majority", 1, False, 20, 0, 1),
    ]
    summary = evaluate.summarize(rows)
    assert [(s["method"], s["n"]) for s in summary] == [("greedy", 1), ("majority", 1), ("majority", 4), ("dvts", 4)]
    maj = summary[2]
    assert maj["count"] == 3 and maj["correct"] == 2
    assert maj["accuracy"] == pytest.approx(2 / 3)
    assert maj["mean_policy_tokens"] == pytest.approx(200.0)
    assert maj["mean_prm_tokens"] == 0
    assert maj["mean_wall_s"] == pytest.approx(2.0)
    assert maj["levels"] == {1: (1.0, 1), 2: (0.5, 2)}
    assert maj["acc_level_1"] == 1.0 and maj["acc_level_2"] == 0.5
    dvts = summary[3]
    assert (dvts["accuracy"], dvts["mean_policy_tokens"], dvts["mean_prm_tokens"], dvts["mean_tokens"]) == (1.0, 60.0, 50.0, 110.0)
    greedy = summary[0]
    assert greedy["levels"] == {1: (0.0, 1)} and greedy["acc_level_2"] is None
    # without levels: no level entries
    assert "levels" not in evaluate.summarize([_row("a", "majority", 1, True, 1, 0, None)])[0]


def test_end_to_end_numbers_by_hand(tmp_path):
    """Greedy over a table policy: the answer, correctness and token counts are known exactly."""
    problems = [Problem("x", "P1", "3", 1), Problem("y", "P22", "5", 2)]
    table = {"P1": [[("\\boxed{3}", True, False)]], "P22": [[("so \\boxed{4}", True, False)]]}
    rows = evaluate.run_evaluation(problems, TablePolicy(table), TablePRM({}), EvalConfig(["greedy"], [1], _base()),
                                   out_dir=tmp_path, resume=False, progress=False)
    assert [(r["problem_id"], r["answer"], r["correct"]) for r in rows] == [("x", "3", True), ("y", "4", False)]
    assert [r["policy_tokens_prefilled"] for r in rows] == [2, 3]  # len("P1"), len("P22")
    assert [r["policy_tokens_generated"] for r in rows] == [9, 12]
    (s,) = evaluate.summarize(rows)
    assert (s["accuracy"], s["mean_policy_tokens"], s["levels"]) == (0.5, (11 + 15) / 2, {1: (1.0, 1), 2: (0.0, 1)})


def test_summary_files_and_plot(tmp_path):
    rows = _evaluate(tmp_path)
    summary = evaluate.write_summary(rows, tmp_path)
    png = evaluate.plot_scaling(summary, tmp_path)
    for name in ("summary.csv", "summary.md", "scaling.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert png == tmp_path / "scaling.png"
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(summary) == 9
    assert {"method", "n", "accuracy", "mean_policy_tokens", "mean_prm_tokens", "acc_level_1", "acc_level_2"} <= set(table[0])
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0].startswith("| method | n |") and "L1 acc" in md[0] and len(md) == 2 + 9


# ----------------------------------------------------------------------------- CLI


def _dataset(tmp_path, rows=None, name="data.jsonl") -> str:
    rows = rows if rows is not None else [
        {"problem": p.problem, "answer": p.answer, "level": f"Level {p.level}", "unique_id": p.id} for p in PROBLEMS
    ]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def models(monkeypatch):
    """Scripted models in place of HFPolicy / HFPRM; records the paths asked for."""
    return fake_models(monkeypatch)


def fake_models(monkeypatch) -> list:
    """Put scripted models in place of the CLI's HFPolicy / HFPRM builders; returns the list of
    (kind, path, device or format) they are asked for."""
    asked = []

    def policy(path, device, dtype, kv_budget=None):
        asked.append(("policy", path, device))
        return scripted_policy()

    def prm(path, fmt, device, dtype, kv_budget=None, reference=None, beta=None):
        asked.append(("prm", path, fmt))
        if reference is not None or beta is not None:
            asked.append(("prm-reference", reference, beta))
        prm = scripted_prm()
        # what HFPRM reports after loading: the format (auto: as if detected) and beta
        prm.format = "math-shepherd" if fmt == "auto" else fmt
        prm.beta = beta if beta is not None or fmt != "implicit-prm" else 0.001
        return prm

    monkeypatch.setattr(cli, "_build_policy", policy)
    monkeypatch.setattr(cli, "_build_prm", prm)
    return asked


def model_dir(path: Path, weights: bytes = b"weights") -> str:
    """A directory that passes the CLI's is-it-a-model check (config, weights, tokenizer files;
    the scripted models of the ``models`` fixture never read them); files already there stay."""
    path.mkdir(parents=True, exist_ok=True)
    for name, content in (("config.json", b"{}"), ("model.safetensors", weights), ("tokenizer.json", b"{}")):
        if not (path / name).exists():  # an existing directory keeps its files
            (path / name).write_bytes(content)
    return str(path)


def _main(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse
        return int(exc.code)


def _error_of(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("ponder run: error: ")
    return err[0]


def _args(tmp_path, *extra, dataset=None):
    return ["run", "--policy", "org/policy", "--prm", "org/prm", "--dataset", dataset or _dataset(tmp_path),
            "--out", str(tmp_path / "out"), "--no-progress", "--num-iterations", "3", "--max-steps", "6",
            "--max-step-tokens", "40", *extra]


def test_cli_runs_an_evaluation(tmp_path, models, capsys):
    argv = _args(tmp_path, "--methods", "greedy,majority,dvts", "--n", "2,4", "--beam-width", "2", "--limit", "3")
    assert _main(argv) == 0
    out = capsys.readouterr().out
    assert "| method | n |" in out and "| dvts | 4 |" in out and "scaling.png" in out
    rows = [json.loads(line) for line in _lines(tmp_path / "out" / "results.jsonl")]
    assert len(rows) == 3 * (1 + 2 + 2)
    assert {r["level"] for r in rows} == {1, 2}
    assert ("policy", "org/policy", DEVICE) in models and ("prm", "org/prm", "auto") in models
    # again without --resume: refused before any work; with --resume: nothing to do, no duplicates
    models.clear()
    assert _main(argv) == 2
    assert "--resume" in _error_of(capsys) and models == []
    assert _main(argv + ["--resume"]) == 0
    assert len(_lines(tmp_path / "out" / "results.jsonl")) == len(rows)


def test_cli_prm_free_methods_need_no_prm(tmp_path, models, capsys):
    argv = ["run", "--policy", "org/policy", "--dataset", _dataset(tmp_path), "--methods", "greedy,majority",
            "--n", "2", "--out", str(tmp_path / "o"), "--no-progress", "--max-step-tokens", "40"]
    assert _main(argv) == 0
    assert [kind for kind, *_ in models] == ["policy"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "majority,magic", "--n", "4"], "unknown method 'magic'"),
        (["--methods", "beam_search", "--n", "4,6", "--beam-width", "4"], "multiple of it"),
        (["--methods", "dvts", "--n", "2,6", "--beam-width", "4"], "n=6"),
        (["--methods", "majority", "--n", "0"], "--n must list integers >= 1"),
        (["--methods", "majority", "--n", "four"], "comma-separated integers"),
        (["--methods", "majority", "--n", "4", "--full", "--limit", "3"], "--full"),
        (["--methods", "majority", "--n", "4", "--per-level", "0"], "--per-level must be >= 1"),
    ],
)
def test_cli_rejects_bad_search_options(tmp_path, models, capsys, extra, message):
    assert _main(_args(tmp_path, *extra)) == 2
    assert message in _error_of(capsys)
    assert models == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--policy", "--prm", "--prm-reference"])
@pytest.mark.parametrize("ref", ["no-such-model", "./missing/model", "/no/such/dir/model"])
def test_cli_rejects_missing_model_path(tmp_path, models, capsys, flag, ref):
    argv = _args(tmp_path, "--methods", "dvts", "--n", "4")
    if flag in argv:
        argv[argv.index(flag) + 1] = ref
    else:
        argv += [flag, ref]
    assert _main(argv) == 2
    line = _error_of(capsys)
    assert flag in line and ref in line and "no such local path" in line
    assert models == []


def test_cli_local_model_dir_is_accepted(tmp_path, models, capsys):
    model_dir(tmp_path / "model")
    argv = _args(tmp_path, "--methods", "majority", "--n", "2")
    argv[argv.index("--policy") + 1] = str(tmp_path / "model")
    assert _main(argv) == 0


def test_cli_passes_an_implicit_prms_reference_and_beta(tmp_path, models, capsys):
    model_dir(tmp_path / "ref")
    argv = _args(tmp_path, "--methods", "best_of_n", "--n", "2", "--prm-format", "implicit-prm",
                 "--prm-reference", str(tmp_path / "ref"), "--prm-beta", "0.05")
    assert _main(argv) == 0
    assert ("prm-reference", str(tmp_path / "ref"), 0.05) in models
    assert [m for m in models if m[0] == "prm"][0][2] == "implicit-prm"


def test_cli_rejects_dataset_without_answer_field(tmp_path, models, capsys):
    data = _dataset(tmp_path, [{"problem": "1+1?", "solution": "\\boxed{2}"}], name="bad.jsonl")
    assert _main(_args(tmp_path, "--methods", "majority", "--n", "2", dataset=data)) == 2
    line = _error_of(capsys)
    assert "'answer'" in line and "--answer-field" in line and models == []
    # the right field name makes it work
    assert _main(_args(tmp_path, "--methods", "majority", "--n", "2", "--answer-field", "solution",
                       "--answer-from-solution", dataset=data)) == 0


def test_cli_rejects_prm_method_without_prm_and_missing_dataset(tmp_path, models, capsys):
    assert _main(["run", "--policy", "org/p", "--prm", "", "--dataset", _dataset(tmp_path), "--methods", "beam_search",
                  "--n", "4"]) == 2
    assert "method beam_search needs a PRM: pass --prm PATH" in _error_of(capsys)
    assert _main(["run", "--policy", "org/p", "--dataset", str(tmp_path / "none.jsonl"), "--methods", "majority",
                  "--n", "4", "--out", str(tmp_path / "o")]) == 2
    assert "none.jsonl" in _error_of(capsys)
    assert _main(["run", "--policy", "org/p", "--prm", "builtin:nope", "--out", str(tmp_path / "o2")]) == 2
    line = _error_of(capsys)
    assert "builtin:nope" in line and "builtin:prm" in line


def test_cli_defaults_are_the_builtin_models_and_task(tmp_path, models, capsys):
    """Every option has a default: the shipped models on a per-level slice of builtin:arith,
    every method at n=1,4,16, and the larger shipped policy's greedy accuracy next to them."""
    from ponder.toy.builtin import builtin_model_path

    out = tmp_path / "o"
    assert _main(["run", "--out", str(out), "--no-progress", "--num-iterations", "3", "--max-steps", "6",
                  "--max-step-tokens", "40"]) == 0
    assert ("policy", str(builtin_model_path("policy-small")), DEVICE) in models
    assert ("prm", str(builtin_model_path("prm")), "auto") in models
    assert ("policy", str(builtin_model_path("policy-large")), DEVICE) in models
    rows = [json.loads(line) for line in _lines(out / "results.jsonl")]
    per_level = cli.DEFAULT_PER_LEVEL
    small = [r for r in rows if r["policy"] == "builtin:policy-small"]
    large = [r for r in rows if r["policy"] == "builtin:policy-large"]
    assert len(small) == 5 * per_level * (1 + 5 * 3)  # greedy once, five methods at three n
    assert {(r["method"], r["n"]) for r in large} == {("greedy", 1)} and len(large) == 5 * per_level
    assert sorted({r["level"] for r in rows}) == [1, 2, 3, 4, 5]
    text = capsys.readouterr().out
    assert "| policy | method |" in text and "builtin:policy-large | greedy | 1 |" in text
    assert "On your own models" in text and str(out / "scaling.png") in text


def test_cli_help_documents_the_options(capsys):
    assert _main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--policy", "--prm", "--dataset", "--split", "--problem-field", "--answer-field", "--level-field",
                   "--id-field", "--methods", "--n", "--beam-width", "--num-iterations", "--lookahead", "--agg",
                   "--temperature", "--top-p", "--max-step-tokens", "--seed", "--limit", "--out", "--resume",
                   "--device", "--batch-size", "--prm-format", "--prm-reference", "--prm-beta", "implicit-prm",
                   "control-plane benchmark"):
        assert option in out, option


# ----------------------------------------------------------------------------- progress


def test_progress_advances_per_finished_problem_within_a_batch(tmp_path, monkeypatch):
    """One batch of all 5 problems: the bar moves by one problem at a time, and the first
    problems count before the batch's last policy call (when the engine releases their trees)."""
    calls, updates = [0], []

    class Bar:
        def update(self, k):
            updates.append((k, calls[0]))

        def close(self):
            pass

    class Counting(Fresh):
        def sample_steps(self, *a, **k):
            calls[0] += 1
            return self.inner.sample_steps(*a, **k)

    monkeypatch.setattr(evaluation_run, "progress_bar", lambda total, initial, desc, enabled: Bar())
    evaluate.run_evaluation(PROBLEMS, Counting(ScriptedPolicy), scripted_prm(), EvalConfig(["majority"], [4], _base(), 5),
                            out_dir=tmp_path, resume=False, progress=True)
    steps = [k for k, _ in updates if k]
    assert steps == [1] * len(PROBLEMS) and sum(k for k, _ in updates) == len(PROBLEMS)
    assert updates[0][1] < calls[0]  # a problem counted while others were still being sampled


# ----------------------------------------------------------------------------- EvalConfig / DatasetSpec


@pytest.mark.parametrize("kw, message", [
    ({"methods": []}, "methods is empty"),
    ({"methods": ["majority", "magic"]}, "unknown method 'magic' in methods; choose from greedy, majority"),
    ({"ns": [2, 0]}, "ns must list integers >= 1; got [2, 0]"),
    ({"ns": []}, "ns must list integers >= 1; got []"),
    ({"ns": [True]}, "ns must list integers >= 1"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1; got 0"),
    ({"methods": ["dvts"], "ns": [2, 6], "base_config": _base(beam_width=4)},
     "dvts needs every n above beam_width 4 to be a multiple of it (below it the tree is n wide); n=6 is not: "
     "change ns or beam_width"),
    ({"base_config": _base(max_steps=2)}, "max_steps (2) must be >= num_iterations (3)"),
    ({"base_config": _base(sampling=SamplingParams(temperature=-1.0))}, "temperature must be >= 0"),
    ({"base_config": _base(pf_temperature=0.0)}, "pf_temperature must be a finite number > 0"),
])
def test_eval_config_validate_is_one_line_naming_the_field(kw, message):
    config = EvalConfig(**{"methods": METHODS, "ns": NS, "base_config": _base(), **kw})
    with pytest.raises(ValueError) as info:
        config.validate()
    text = str(info.value)
    assert message in text and "\n" not in text and "`" not in text


def test_eval_config_names_fields_in_the_callers_words():
    config = EvalConfig(["beam_search"], [6], _base(beam_width=4))
    with pytest.raises(ValueError, match=r"n above --beam-width 4 .* n=6 is not: change --n or --beam-width$"):
        config.validate(names={"ns": "--n", "beam_width": "--beam-width", "n": "--never"})
    with pytest.raises(ValueError, match="^--max-steps \\(2\\) must be >= --num-iterations \\(3\\)"):
        EvalConfig(["dvts"], [2], _base(max_steps=2)).validate(names={"max_steps": "--max-steps",
                                                                      "num_iterations": "--num-iterations"})


def test_eval_config_pairs_configs_and_prm():
    config = EvalConfig(["greedy", "majority", "dvts", "majority"], [4, 2], _base(beam_width=4)).validate()
    assert config.pairs() == [("greedy", 1), ("majority", 4), ("majority", 2), ("dvts", 4), ("dvts", 2)]
    assert config.configs()[("dvts", 2)].beam_width == 2 and config.configs()[("greedy", 1)].method == "majority"
    assert config.needs_prm and not EvalConfig(["greedy", "majority"], [4]).needs_prm
    EvalConfig(["greedy", "majority"], [4], _base()).validate(has_prm=False)
    with pytest.raises(ValueError, match="method dvts needs a PRM"):
        config.validate(has_prm=False)


def test_dataset_spec_validate_load_and_record(tmp_path):
    from ponder.evaluation import DatasetSpec

    for kw, message in [({"source": " "}, "source must not be empty"), ({"limit": 0}, "limit must be >= 1; got 0"),
                        ({"per_level": -1}, "per_level must be >= 1"),
                        ({"full": True, "limit": 3}, "full evaluates the whole dataset; drop limit / per_level")]:
        with pytest.raises(ValueError, match=message):
            DatasetSpec(**{"source": "builtin:arith", **kw}).validate()
    names = {"limit": "--limit", "per_level": "--per-level", "full": "--full"}
    with pytest.raises(ValueError, match="^--full evaluates the whole dataset; drop --limit / --per-level"):
        DatasetSpec("builtin:arith", full=True, per_level=2).validate(names=names)
    # builtin:arith: its task's default slice (the first 6 of each level), unless --full / --limit / --per-level
    from ponder.toy import arith

    assert len(DatasetSpec("builtin:arith").load()) == 5 * arith.DEFAULT_PER_LEVEL
    assert len(DatasetSpec("builtin:arith", full=True).load()) == 500
    assert len(DatasetSpec("builtin:arith", limit=7).load()) == 7
    assert len(DatasetSpec("builtin:arith", per_level=2).load()) == 10
    # a file: all of it (no task, no default slice); per_level slices it
    data = _dataset(tmp_path)
    assert [p.id for p in DatasetSpec(data).load()] == [p.id for p in PROBLEMS]
    assert [p.level for p in DatasetSpec(data, per_level=1).load()] == [1, 2]
    assert DatasetSpec(data, limit=2).record() == {
        "source": data, "split": "test", "config": None, "problem_field": "problem", "answer_field": "answer",
        "level_field": "level", "id_field": None, "answer_from_solution": False, "limit": 2, "per_level": None,
        "full": False}
