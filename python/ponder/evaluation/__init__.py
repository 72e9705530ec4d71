"""Evaluate search methods over a dataset: accuracy as a function of test-time compute.

    config = EvalConfig(methods=["greedy", "majority", "dvts"], ns=[1, 4, 16],
                        base_config=SearchConfig(beam_width=4))
    rows = run_evaluation(problems, policy, prm, config, out_dir=Path("runs/x"), resume=False)
    summary = write_summary(rows, Path("runs/x"))
    plot_scaling(summary, Path("runs/x"))

* ``config``: what runs (``EvalConfig``, ``DatasetSpec``) and their one ``validate()``;
* ``run``: ``run_evaluation`` (batches, progress, the checks before any search);
* ``results``: ``results.jsonl`` (append, read back, resume) and the run record ``run.json``;
* ``report``: the summary, its CSV / Markdown table and the scaling plot.

Every (problem, method, n) is one JSON row of ``out_dir/results.jsonl``, appended (flushed
and fsynced) as each batch of problems finishes, so a killed run loses at most the batch in
flight: ``resume=True`` reads the file back (dropping a truncated last line), skips the
finished keys and completes the rest. ``greedy`` is a pseudo-method: majority voting over one
completion sampled at temperature 0 (run once, as n=1, whatever ``ns`` says).
"""

from __future__ import annotations

from .config import (
    EVAL_METHODS,
    GREEDY,
    PRM_FREE_METHODS,
    TREE_METHODS,
    DatasetSpec,
    EvalConfig,
    method_config,
    plan,
    rename_fields,
)
from .report import markdown_table, plot_scaling, summarize, write_summary
from .results import (
    MANIFEST_FILE,
    RESULTS_FILE,
    UNCHECKED_SECTIONS,
    check_manifest,
    check_out_dir,
    config_record,
    dataset_hash,
    manifest_difference,
    model_revision,
    read_results,
    row_key,
    run_manifest,
)
from .run import run_evaluation

__all__ = [
    "EVAL_METHODS",
    "GREEDY",
    "MANIFEST_FILE",
    "PRM_FREE_METHODS",
    "RESULTS_FILE",
    "TREE_METHODS",
    "UNCHECKED_SECTIONS",
    "DatasetSpec",
    "EvalConfig",
    "check_manifest",
    "check_out_dir",
    "config_record",
    "dataset_hash",
    "manifest_difference",
    "markdown_table",
    "method_config",
    "model_revision",
    "plan",
    "plot_scaling",
    "read_results",
    "rename_fields",
    "row_key",
    "run_evaluation",
    "run_manifest",
    "summarize",
    "write_summary",
]
