"""``ponder run --ray``: an evaluation spread over Ray worker actors (python/ponder/distributed.py).

One local Ray cluster (``ray.init(num_cpus=2)``) serves the whole module. Checked: 2 workers give
the rows of a single-process run with the same seed and batches, the driver alone writes
results.jsonl (a search in the driver process would fail here), a resume completes a cut
run without duplicates; a worker process that dies mid-run is restarted and its job retried,
nothing lost or duplicated; workers sample a remote policy (--policy-url); without ray,
``--ray`` is one line naming the install command.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path

import pytest
import ray

from ponder import SearchConfig, distributed
from ponder import evaluation as evaluate
from ponder.cli import main
from ponder.data import load_problems
from ponder.evaluation import EvalConfig
from ponder.evaluation import run as evaluation_run

# the built-in models, 4 problems, batches of 2: 4 jobs (greedy, beam_search n=4), 8 rows
RUN = ["--limit", "4", "--methods", "greedy,beam_search", "--n", "4", "--reference-policy", "none",
       "--no-progress", "--batch-size", "2"]


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (this module's classes are pickled by value, so
    the workers need not import the tests)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / evaluate.RESULTS_FILE).read_text().splitlines() if line.strip()]


def by_key(rows: list[dict]) -> dict:
    """Rows by key, without the wall time (it differs between runs)."""
    return {evaluate.row_key(r): {k: v for k, v in r.items() if k != "wall_s"} for r in rows}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    assert main(["run", *RUN, "--out", str(out)]) == 0
    rows = rows_of(out)
    assert len(rows) == 8 and len(by_key(rows)) == 8
    return by_key(rows)


@pytest.mark.slow
def test_two_workers_give_the_single_process_rows_and_a_resume_completes(cluster, single, tmp_path, monkeypatch, capsys):
    def no_search_in_the_driver(*a, **k):
        raise AssertionError("the driver searched a batch itself")

    monkeypatch.setattr(evaluation_run, "search_batch", no_search_in_the_driver)  # the workers' processes are not patched
    out = tmp_path / "ray"
    assert main(["run", *RUN, "--out", str(out), "--ray", "--workers", "2"]) == 0
    rows = rows_of(out)
    assert len(rows) == 8
    assert by_key(rows) == single
    execution = json.loads((out / evaluate.MANIFEST_FILE).read_text())["execution"]
    assert execution["workers"] == 2 and execution["cpus_per_worker"] == 1

    # a run killed after 3 rows, mid-write of the 4th: --resume searches the batches with a missing row
    lines = (out / evaluate.RESULTS_FILE).read_text().splitlines(keepends=True)
    (out / evaluate.RESULTS_FILE).write_text("".join(lines[:3]) + lines[3][:20])
    assert main(["run", *RUN, "--out", str(out), "--resume", "--ray", "--workers", "2"]) == 0
    rows = rows_of(out)
    assert len(rows) == 8
    assert by_key(rows) == single
    assert rows[:3] == [json.loads(line) for line in lines[:3]]  # finished rows kept, not rewritten

    capsys.readouterr()


class _DieOnce:
    """A policy whose worker process exits (``os._exit``) when its second search starts, once
    per marker file; the marker records how many rows results.jsonl held at that moment."""

    def __init__(self, policy, marker: str, results: str) -> None:
        self._policy, self._marker, self._results, self._starts = policy, marker, results, 0

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def start(self, root_ids, problems):
        self._starts += 1
        if self._starts == 2 and not os.path.exists(self._marker):
            written = len(Path(self._results).read_text().splitlines()) if os.path.exists(self._results) else 0
            Path(self._marker).write_text(str(written))
            os._exit(1)
        return self._policy.start(root_ids, problems)


@dataclasses.dataclass(frozen=True)
class _DyingLoader(distributed.ModelLoader):
    """The CLI's ModelLoader, its policy wrapped in ``_DieOnce``."""

    marker: str = ""
    results: str = ""

    def __call__(self):
        policy, prm = super().__call__()
        return _DieOnce(policy, self.marker, self.results), prm


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_restarted_and_nothing_is_lost_or_duplicated(cluster, single, tmp_path, monkeypatch,
                                                                                 capsys):
    out, marker = tmp_path / "ray", tmp_path / "died"
    monkeypatch.setattr(distributed, "ModelLoader", functools.partial(
        _DyingLoader, marker=str(marker), results=str(out / evaluate.RESULTS_FILE)))
    assert main(["run", *RUN, "--out", str(out), "--ray", "--workers", "2"]) == 0
    assert marker.exists(), "no worker died"
    written_before_death = int(marker.read_text())
    rows = rows_of(out)
    assert 0 < written_before_death < len(rows) == 8  # it died mid-run, after rows were written
    assert by_key(rows) == single  # nothing lost, nothing duplicated, the same rows
    capsys.readouterr()


@pytest.mark.slow
def test_workers_sample_a_remote_policy(cluster, tmp_path, capsys):
    """--ray with --policy-url: each worker builds its own OpenAIPolicy to the server (the
    scripted one of test_openai_policy.py); the rows are the single-process run's."""
    from ponder.hf.policy import load_tokenizer
    from ponder.toy.builtin import resolve_model
    from test_openai_policy import ScriptedServer

    server = ScriptedServer(load_tokenizer(resolve_model("builtin:policy-small")), "vllm")
    try:
        argv = ["run", "--policy-url", server.url, "--policy", "builtin:policy-small", "--methods", "greedy,majority",
                "--n", "2", "--limit", "4", "--batch-size", "2", "--reference-policy", "none", "--no-progress"]
        assert main([*argv, "--out", str(tmp_path / "single")]) == 0
        sent = len(server.requests)
        assert main([*argv, "--out", str(tmp_path / "ray"), "--ray", "--workers", "2"]) == 0
        assert len(server.requests) == 2 * sent  # the workers asked the server the same questions
        single, on_ray = rows_of(tmp_path / "single"), rows_of(tmp_path / "ray")
        assert len(on_ray) == 8 and by_key(on_ray) == by_key(single)
    finally:
        server.close()
    capsys.readouterr()


def test_ray_missing_is_one_line_naming_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(["run", *RUN, "--out", str(tmp_path / "r"), "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert 'pip install "ponder[ray]"' in err and "--ray" in err
    assert not (tmp_path / "r").exists()  # refused before any work


@pytest.mark.parametrize("flag, value", [("--workers", "0"), ("--gpus-per-worker", "-1"), ("--cpus-per-worker", "0")])
def test_bad_worker_counts_are_refused_in_one_line(tmp_path, capsys, flag, value):
    assert main(["run", *RUN, "--out", str(tmp_path / "r"), "--ray", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err


@pytest.mark.slow
def test_workers_the_cluster_cannot_hold_are_refused_in_one_line(cluster, tmp_path, capsys):
    assert main(["run", *RUN, "--out", str(tmp_path / "r"), "--ray", "--workers", "2", "--gpus-per-worker", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs 2 GPUs" in err and "has 0" in err
    assert not (tmp_path / "r" / evaluate.RESULTS_FILE).exists()


def test_jobs_are_the_single_process_batches():
    problems = load_problems("builtin:arith", limit=5)
    base = SearchConfig(beam_width=4)
    done = {(str(p.id), "", "beam_search", 4) for p in problems[:3]}
    config = EvalConfig(methods=["majority", "best_of_n", "beam_search"], ns=[4], base_config=base, batch_size=2)
    jobs = distributed.plan_jobs(problems, config, done=done, has_prm=True)
    # majority + best_of_n share one search per batch; beam_search's first batch is done, its
    # second is searched whole (problem 2's row is kept, problem 3's written)
    assert [([m for m, _ in j.group], [p.id for p in j.batch]) for j in jobs] == [
        (["majority", "best_of_n"], [problems[0].id, problems[1].id]),
        (["majority", "best_of_n"], [problems[2].id, problems[3].id]),
        (["majority", "best_of_n"], [problems[4].id]),
        (["beam_search"], [problems[2].id, problems[3].id]),
        (["beam_search"], [problems[4].id]),
    ]


def test_jobs_under_early_stop_search_each_vote_alone():
    """With early stopping each vote stops at its own round: no shared samples, as in
    ``run_evaluation`` (``evaluation.run.shares_samples``)."""
    problems = load_problems("builtin:arith", limit=2)
    config = EvalConfig(methods=["majority", "best_of_n"], ns=[4], base_config=SearchConfig(early_stop=0.95), batch_size=2)
    jobs = distributed.plan_jobs(problems, config, done=set(), has_prm=True)
    assert [[m for m, _ in j.group] for j in jobs] == [["majority"], ["best_of_n"]]
    assert all(c.early_stop is not None for j in jobs for c in j.configs.values())
    assert not evaluation_run.shares_samples(config, True)
    assert evaluation_run.shares_samples(dataclasses.replace(config, base_config=SearchConfig()), True)
