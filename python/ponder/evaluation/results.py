"""An evaluation's files: ``results.jsonl`` (one JSON row per (problem, policy, method, n),
appended and fsynced batch by batch; read back on resume, a truncated last line dropped) and
``run.json`` (the run record: what defines the rows, compared on resume).

The formats are fixed: a run written by an earlier ponder resumes with this one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..data import Problem
from ..grading import is_equivalent
from ..methods import SearchConfig
from .config import TREE_METHODS

RESULTS_FILE = "results.jsonl"
MANIFEST_FILE = "run.json"
# keys of the search config that may change between a run and its resume
_RESUMABLE_CHANGES = ("method", "n")


def config_record(config: SearchConfig) -> dict:
    """The ``search`` section of ``run.json``: ``config`` as JSON, without method and n (which
    may change on resume)."""
    record = dataclasses.asdict(config)
    for key in _RESUMABLE_CHANGES:
        record.pop(key, None)
    return json.loads(json.dumps(record))  # tuples -> lists, as read back from disk


# ----------------------------------------------------------------------------- results file


def read_results(path: Path, *, repair: bool = True) -> list[dict]:
    """Read ``results.jsonl`` back: one dict per row, first occurrence of each key kept.

    A last line that is not valid JSON (a run killed mid-write) is dropped; with ``repair``
    the file is then rewritten cleanly (atomically), also when it lacks a final newline or
    held duplicate keys, so that later appends start on a fresh line. A bad line before the
    last one raises ValueError (the file is not one this module wrote).
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.decode("utf-8", errors="replace").split("\n")
    rows: list[dict] = []
    seen: set[tuple] = set()
    dirty = bool(raw) and not raw.endswith(b"\n")
    content = [(i, line) for i, line in enumerate(lines) if line.strip()]
    for pos, (i, line) in enumerate(content):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")  # noqa: TRY004 - caught below
            key = row_key(row)
        except (ValueError, KeyError) as exc:
            if pos == len(content) - 1:
                dirty = True  # truncated by a kill: that row is recomputed
                break
            raise ValueError(f"{path}: line {i + 1} is not a result row ({exc}); fix or remove it") from exc
        if key in seen:
            dirty = True
            continue
        seen.add(key)
        rows.append(row)
    if dirty and repair:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return rows


def row_key(row: dict) -> tuple[str, str, str, int]:
    """The identity of a result row: (problem_id, policy label, method, n); rows written
    without a policy label have label ``""``."""
    return (str(row["problem_id"]), str(row.get("policy", "")), str(row["method"]), int(row["n"]))


def append_rows(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """Raise FileExistsError when ``out_dir`` already holds results and ``resume`` is off."""
    results = Path(out_dir) / RESULTS_FILE
    if not resume and results.exists() and results.stat().st_size > 0:
        raise FileExistsError(
            f"{results} already holds results; pass --resume (resume=True) to complete that run, "
            f"or choose another --out directory"
        )


# ----------------------------------------------------------------------------- run manifest


def dataset_hash(problems: Sequence[Problem]) -> str:
    """``sha256:<hex>`` of what defines the rows of ``problems``: each one's id, question,
    reference answer and level, in order."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([str(p.id), p.problem, p.answer, p.level], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


_FULL_HASH_LIMIT = 256 << 20  # files up to this size are hashed whole
_SAMPLE = 1 << 20


def _file_digest(h, path: str, size: int) -> None:
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
            return
        # a large weight file: its first and last 8 MiB (safetensors' header names every tensor,
        # dtype, shape and offset) and 32 evenly spaced 1 MiB samples
        offsets = [0, size - (8 << 20)] + [i * (size - _SAMPLE) // 31 for i in range(32)]
        for off in offsets:
            f.seek(off)
            h.update(f.read(8 << 20 if off in (0, size - (8 << 20)) else _SAMPLE))


def model_revision(ref: str | os.PathLike | None) -> str | None:
    """What identifies the weights behind a model reference (directory or hub id), or None.

    A local directory: ``sha256:<hex>`` over its files (names, sizes and contents; hidden files
    skipped; files over 256 MiB contribute their size, first and last 8 MiB and 32 evenly spaced
    1 MiB samples). A hub id: ``commit:<sha>`` of its snapshot in the local Hugging Face cache;
    None when it is not cached (not downloaded yet) or huggingface_hub is missing.
    """
    if ref is None:
        return None
    text = os.path.expanduser(os.fspath(ref))
    if os.path.isdir(text):
        h = hashlib.sha256()
        files = []
        for root, dirs, names in os.walk(text):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(root, n) for n in names if not n.startswith(".")]
        for path in sorted(files, key=lambda f: os.path.relpath(f, text)):
            size = os.path.getsize(path)
            h.update(f"{os.path.relpath(path, text)}\0{size}\0".encode())
            _file_digest(h, path, size)
        return "sha256:" + h.hexdigest()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - installed with transformers
        return None
    try:
        found = try_to_load_from_cache(text, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id: nothing cached under it
        return None
    if isinstance(found, str):
        return "commit:" + Path(found).parent.name  # .../snapshots/<commit>/config.json
    return None


# Names of manifest settings in messages (the `ponder run` options that set them).
_SETTING_NAMES = {
    "ponder_version": "the ponder version",
    "dataset.source": "--dataset",
    "dataset.split": "--split",
    "dataset.config": "--dataset-config",
    "dataset.problem_field": "--problem-field",
    "dataset.answer_field": "--answer-field",
    "dataset.level_field": "--level-field",
    "dataset.id_field": "--id-field",
    "dataset.answer_from_solution": "--answer-from-solution",
    "dataset.limit": "--limit",
    "dataset.per_level": "--per-level",
    "dataset.full": "--full",
    "search.early_stop": "--early-stop",
    "search.early_stop.threshold": "--early-stop",
    "dataset.num_problems": "the number of problems",
    "dataset.content_hash": "the dataset's content (hash of ids, questions, answers, levels)",
    "models.dtype": "--dtype",
    "models.policy.ref": "--policy",
    "models.policy.url": "--policy-url",
    "models.policy.revision": "--policy's weights (content hash / hub commit)",
    "models.prm.ref": "--prm",
    "models.prm.revision": "--prm's weights (content hash / hub commit)",
    "models.prm.format": "--prm-format",
    "models.prm.beta": "--prm-beta",
    "models.prm_reference.ref": "--prm-reference",
    "models.prm_reference.revision": "--prm-reference's weights (content hash / hub commit)",
    "models.reference_policy.ref": "--reference-policy",
    "models.reference_policy.revision": "--reference-policy's weights (content hash / hub commit)",
    "search.sampling.temperature": "--temperature",
    "search.sampling.top_p": "--top-p",
    "search.sampling.max_step_tokens": "--max-step-tokens",
    "search.compat_search_and_learn": "--compat-search-and-learn",
}
#: manifest sections recorded for the reader but not compared on resume (they do not change
#: what a row measures: where it ran, how problems were batched)
UNCHECKED_SECTIONS = ("execution",)


def _flatten(record: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _merge(old: dict, new: dict) -> dict:
    """``new`` with the keys only ``old`` has kept (a key missing from ``new`` is unknown there)."""
    out = dict(old)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            out[key] = _merge(old[key], value)
        else:
            out[key] = value
    return out


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    if text.startswith(("sha256:", "commit:")):
        return text[:19]
    return repr(value) if isinstance(value, str) else text


def manifest_difference(old: dict, new: dict) -> str | None:
    """The first setting both manifests have with different values (None is a value), as
    ``"<setting> differs: <old> in run.json, <new> now"`` (settings named by their ``ponder
    run`` option where they have one); None when they agree. Keys one side lacks (not known
    there, e.g. a hub model's commit before its download) and the sections in
    ``UNCHECKED_SECTIONS`` are not compared."""
    a, b = _flatten(old), _flatten(new)
    for key in b:
        if key.split(".", 1)[0] in UNCHECKED_SECTIONS:
            continue
        if key not in a:
            # a setting that is a value on one side and an object on the other (e.g. early_stop
            # off in run.json, on now, or the reverse) differs; a key only one side knows does not
            parts = key.split(".")
            known = [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in a]
            if known:
                key = known[0]
            elif not any(k.startswith(key + ".") for k in a):
                continue
            old_v, new_v = _at(old, key), _at(new, key)
        else:
            if a[key] == b[key]:
                continue
            old_v, new_v = a[key], b[key]
        name = _SETTING_NAMES.get(key)
        if name is None:
            leaf = key.rsplit(".", 1)[-1]
            name = f"--{leaf.replace('_', '-')}" if key.startswith("search.") else key
        return f"{name} differs: {_short(old_v)} in run.json, {_short(new_v)} now"
    return None


def _at(record: dict, key: str) -> Any:
    """The value at a dotted ``key`` of a nested record."""
    for part in key.split("."):
        record = record[part]
    return record


def run_manifest(problems: Sequence[Problem], base_config: SearchConfig, **sections: Any) -> dict:
    """The record of what defines a run's rows, as ``run_evaluation`` writes to ``OUT/run.json``:
    ``ponder_version``, ``dataset`` (``num_problems``, ``content_hash`` of ``problems``, plus
    whatever ``sections["dataset"]`` adds: source, split, field names, slice), ``search`` (the
    base ``SearchConfig`` minus method and n, which may change on resume) and any further
    ``sections`` (``models``: each model's ``ref`` and ``revision`` (:func:`model_revision`),
    ``dtype``; ``execution``: recorded, never compared). Leave out what is not known (yet): a
    missing key is not compared and the value run.json has for it is kept."""
    from .. import __version__

    dataset = {**sections.pop("dataset", {}), "num_problems": len(problems), "content_hash": dataset_hash(problems)}
    return json.loads(json.dumps({
        "ponder_version": __version__,
        "dataset": dataset,
        **{k: v for k, v in sections.items() if k != "execution"},
        "search": config_record(base_config),
        "execution": sections.get("execution", {}),
    }))


def check_manifest(out_dir: Path, manifest: dict, resume: bool) -> dict:
    """Compare ``manifest`` with ``out_dir/run.json`` and write the merged record; returns it.

    With ``resume`` and an existing ``run.json``, the first setting both know with different
    values raises ValueError (one line: which setting, both values, what to do). Without
    ``resume`` an existing ``run.json`` is replaced (``check_out_dir`` has already refused a
    directory holding results). With ``resume``, results but no ``run.json`` (written by an older
    ponder or by hand) raise ValueError: their rows cannot be checked.
    """
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_FILE
    record = manifest
    if resume and path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); choose another --out directory") from None
        if not isinstance(old, dict):
            raise ValueError(f"{path} is not a run record; choose another --out directory")
        diff = manifest_difference(old, manifest)
        if diff is not None:
            raise ValueError(
                f"--resume {out_dir}: its rows come from another run: {diff}; rerun with that run's "
                f"settings or choose another --out directory"
            )
        record = _merge(old, manifest)
    elif resume and (out_dir / RESULTS_FILE).exists() and (out_dir / RESULTS_FILE).stat().st_size > 0:
        raise ValueError(
            f"--resume {out_dir}: it holds results but no {MANIFEST_FILE} (written by an older ponder or by hand), "
            f"so its rows cannot be checked against this run's settings; choose another --out directory"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return record


def result_row(
    problem: Problem, result, method: str, n: int, config: SearchConfig, wall_s: float, policy: str, shared: bool = False
) -> dict:
    """The row of ``results.jsonl`` for one problem's ``SearchResult`` (see ``run_evaluation``)."""
    b = result.budget
    return {
        "problem_id": str(problem.id),
        "policy": policy,
        "method": method,
        "n": n,
        "answer": result.answer,
        "gold": problem.answer,
        "correct": bool(is_equivalent(result.answer, problem.answer)),
        "level": problem.level,
        "policy_tokens": int(b.policy_tokens_generated + b.policy_tokens_prefilled),
        "policy_tokens_generated": int(b.policy_tokens_generated),
        "policy_tokens_prefilled": int(b.policy_tokens_prefilled),
        "prm_tokens": int(b.prm_tokens_scored),
        "flops": float(b.flops_estimate),
        "wall_s": float(wall_s),
        "num_completions": len(result.completions),
        "beam_width": config.beam_width if method in TREE_METHODS else None,
        "seed": config.seed,
        "shared_samples": shared,
        "difficulty": result.difficulty,  # dynamic compute (auto): estimated online, and what it chose
        "chosen": result.chosen,
    }


__all__ = ["MANIFEST_FILE", "RESULTS_FILE", "UNCHECKED_SECTIONS", "append_rows", "check_manifest", "check_out_dir",
           "config_record", "dataset_hash", "manifest_difference", "model_revision", "read_results", "result_row",
           "row_key", "run_manifest"]
