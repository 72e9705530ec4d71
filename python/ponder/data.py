"""Problems: the questions a run answers, with their reference answers and difficulty levels.

``load_problems(source)`` reads them from

* a local ``.jsonl`` file (one JSON object per line), ``.json`` file (a list of objects, or
  ``{"data": [...]}``) or ``.parquet`` file;
* a local directory written by ``datasets.Dataset.save_to_disk`` /
  ``DatasetDict.save_to_disk`` (or any directory of data files ``datasets.load_dataset``
  reads);
* a Hugging Face Hub dataset id such as ``HuggingFaceH4/MATH-500`` (needs the network);
* ``builtin:<name>``: a task registered with ``register_builtin`` (ponder's built-in tasks
  register themselves from ``ponder.toy``, which is imported on the first ``builtin:`` look-up).

Every row becomes a ``Problem``; which row fields hold the question, the answer, the level
and the id is configurable (``problem_field=`` etc., ``--problem-field`` etc. on the CLI).
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = [
    "ID_FIELDS",
    "Problem",
    "builtin_names",
    "detect_id_field",
    "load_problems",
    "parse_level",
    "register_builtin",
]

BUILTIN_PREFIX = "builtin:"
_BUILTIN_PROVIDERS = (
    "ponder.toy",
)  # modules that register built-in tasks when imported
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
#: the fields ``load_problems`` takes a problem's id from when ``id_field`` is None (the
#: default): the first of these that every row has (MATH-500's ``unique_id``, GSM8K-style ``id``, ...)
ID_FIELDS = ("unique_id", "id", "problem_id", "question_id", "task_id", "uid", "idx")


@dataclass
class Problem:
    """One problem: ``id`` (unique within a source), the question text ``problem``, the
    reference final answer ``answer`` (graded with ``ponder.grading.is_equivalent``), an
    optional difficulty ``level`` (e.g. MATH's 1-5), ``meta``: the row's other fields, and
    ``task``: the built-in task that generated it (e.g. ``"arith"``, set by that task's loader;
    ``ponder.toy.task_defaults`` finds the task's search limits by it), None for problems read
    from files or the hub."""

    id: str
    problem: str
    answer: str
    level: int | None = None
    meta: dict = field(default_factory=dict)
    task: str | None = None


# ----------------------------------------------------------------------------- built-ins

BuiltinLoader = Callable[..., Iterable[Any]]
_BUILTINS: dict[str, BuiltinLoader] = {}


def register_builtin(name: str, loader: BuiltinLoader) -> None:
    """Make ``load_problems("builtin:<name>")`` call ``loader(split=..., limit=...)``.

    The loader returns an iterable of ``Problem`` objects or of row mappings (these go
    through the same field mapping as file rows); ``limit`` is a hint (None: all), the result
    is truncated to it anyway. Registering a name again replaces its loader (so that
    reloading a module is harmless). Names may not contain ``:`` or whitespace.
    """
    if not isinstance(name, str) or not name or re.search(r"[:\s]", name):
        raise ValueError(
            f"builtin name must be a non-empty string without ':' or spaces, got {name!r}"
        )
    if not callable(loader):
        raise TypeError(
            f"loader for builtin {name!r} must be callable, got {type(loader).__name__}"
        )
    _BUILTINS[name] = loader


def _import_providers() -> None:
    for module in _BUILTIN_PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if (
                exc.name != module
            ):  # the provider exists but one of its imports is missing
                raise


def builtin_names() -> list[str]:
    """The registered built-in task names, sorted."""
    _import_providers()
    return sorted(_BUILTINS)


# ----------------------------------------------------------------------------- parsing


def parse_level(value: Any) -> int | None:
    """A difficulty level as an int: ``3``, ``"3"``, ``"Level 3"``, ``3.0`` -> 3.

    None, booleans, and text without an integer (``"Level ?"``) give None.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        match = re.search(r"-?\d+", value)
        return int(match.group()) if match else None
    try:  # numpy integers and the like
        return int(value)
    except (TypeError, ValueError):
        return None


def _missing_field(
    source: str, index: int, role: str, name: str, row: Mapping
) -> ValueError:
    option = f"{role}_field"
    flag = "--" + option.replace("_", "-")
    return ValueError(
        f"{source}: row {index} has no field {name!r} for the {role}; available fields: "
        f"{sorted(map(str, row))}. Set {option}=... ({flag} on the command line) to the field "
        f"that holds the {role}."
    )


def _to_problems(
    rows: Iterable[Any],
    source: str,
    *,
    problem_field: str,
    answer_field: str,
    level_field: str,
    id_field: str | None,
    answer_from_solution: bool,
    limit: int | None,
) -> list[Problem]:
    from .grading import extract_answer

    if id_field is None:  # the dataset's own id field, among the rows used
        rows = list(rows)
        id_field = detect_id_field(rows if limit is None else rows[:limit])
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        if limit is not None and len(problems) >= limit:
            break
        if isinstance(row, Problem):
            problem = row
        else:
            if not isinstance(row, Mapping):
                raise ValueError(  # noqa: TRY004 - bad file content, not a bad argument
                    f"{source}: row {index} is a {type(row).__name__}, not an object with fields"
                )
            for role, name in (("problem", problem_field), ("answer", answer_field)):
                if name not in row:
                    raise _missing_field(source, index, role, name, row)
            answer = row[answer_field]
            if answer is None:
                raise ValueError(
                    f"{source}: row {index} has no value (null) in answer field {answer_field!r}"
                )
            answer = answer if isinstance(answer, str) else str(answer)
            if answer_from_solution:
                extracted = extract_answer(answer)
                if extracted is None:
                    raise ValueError(
                        f"{source}: row {index}: answer_from_solution is set but field {answer_field!r} "
                        f"has no \\boxed{{...}} answer: {answer[:200]!r}"
                    )
                answer = extracted
            text = row[problem_field]
            raw_id = row.get(id_field) if id_field is not None else None
            problem = Problem(
                id=str(index) if raw_id is None else str(raw_id),
                problem=text if isinstance(text, str) else str(text),
                answer=answer,
                level=parse_level(row.get(level_field)),
                meta={
                    k: v
                    for k, v in row.items()
                    if k not in (problem_field, answer_field, level_field, id_field)
                },
            )
        if problem.id in seen:
            raise ValueError(
                f"{source}: rows {seen[problem.id]} and {index} have the same id {problem.id!r}; "
                f"ids must be unique (set id_field=... / --id-field to another field, or to one "
                f"that no row has to number rows by position)"
            )
        seen[problem.id] = index
        problems.append(problem)
    return problems


def detect_id_field(rows: Iterable[Any]) -> str | None:
    """The id field of ``rows`` (mappings; ``Problem`` objects carry their own id): the first
    name of ``ID_FIELDS`` that every mapping row has with a non-null value, else None (rows
    are then numbered by position)."""
    mappings = [r for r in rows if isinstance(r, Mapping)]
    if not mappings:
        return None
    for name in ID_FIELDS:
        if all(r.get(name) is not None for r in mappings):
            return name
    return None


# ----------------------------------------------------------------------------- readers


def _read_jsonl(path: str) -> list[Any]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}: line {lineno} is not valid JSON: {exc}"
                ) from exc
    return rows


def _read_json(path: str) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        return data["data"]
    if isinstance(data, list):
        return data
    raise ValueError(
        f'{path}: expected a JSON list of objects or an object with a "data" list, '
        f"got {type(data).__name__}"
        + (f" with keys {sorted(data)[:20]}" if isinstance(data, dict) else "")
    )


def _read_parquet(path: str) -> list[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        import datasets

        return datasets.Dataset.from_parquet(path).to_list()
    return pq.read_table(path).to_pylist()


def _pick_split(dataset_dict: Any, split: str, source: str, *, lenient: bool) -> Any:
    if split in dataset_dict:
        return dataset_dict[split]
    if lenient and len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    raise ValueError(
        f"{source}: no split {split!r}; available splits: {sorted(dataset_dict)} (set split=... / --split)"
    )


def _read_directory(path: str, split: str) -> Any:
    import datasets

    names = set(os.listdir(path))
    if names & {"dataset_info.json", "state.json", "dataset_dict.json"}:
        loaded = datasets.load_from_disk(path)
    else:
        loaded = datasets.load_dataset(path)
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        loaded = _pick_split(loaded, split, path, lenient=True)
    return loaded


def _read_hub(source: str, split: str, config: str | None) -> Any:
    import datasets

    try:
        return datasets.load_dataset(source, config, split=split)
    except ConnectionError as exc:
        raise ConnectionError(
            f"could not load {source!r}: there is no local file or directory of that name, and the "
            f"Hugging Face Hub could not be reached (this machine looks offline: {exc}). Pass a "
            f"local .jsonl/.json/.parquet file or a directory saved with datasets' save_to_disk."
        ) from exc


def _looks_local(source: str) -> bool:
    return (
        source.lower().endswith(_FILE_SUFFIXES)
        or source.startswith(("/", "./", "../", "~", "."))
        or source.count("/") > 1
        or os.sep != "/"
        and os.sep in source
    )


def _dataset_rows(dataset: Any, limit: int | None) -> Iterable[Any]:
    if limit is not None and hasattr(dataset, "select") and hasattr(dataset, "__len__"):
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def load_problems(
    source: str | os.PathLike,
    *,
    split: str = "test",
    problem_field: str = "problem",
    answer_field: str = "answer",
    level_field: str = "level",
    id_field: str | None = None,
    limit: int | None = None,
    answer_from_solution: bool = False,
    config: str | None = None,
) -> list[Problem]:
    """Load problems from a file, a saved dataset, a Hub dataset or a built-in task.

    ``source``: a path to ``.jsonl``/``.json``/``.parquet``, a ``save_to_disk`` directory, a
    Hub dataset id (``datasets.load_dataset(source, config, split=split)``; online only) or
    ``builtin:<name>``. ``split`` selects the split of a Hub dataset, of a saved
    ``DatasetDict`` (a directory with a single split uses it whatever ``split`` says) and is
    passed to built-in loaders; single files have no splits.

    Each row's ``problem_field`` is the question, ``answer_field`` the reference answer (made
    a string; with ``answer_from_solution=True`` the field is a full solution and the answer
    is its last ``\\boxed{}``, as for MATH's ``solution``), ``level_field`` the level
    (optional; ``"Level 3"`` -> 3) and ``id_field`` the id: None (default) takes the dataset's
    own id field, the first of ``ID_FIELDS`` (``unique_id``, ``id``, ...) that every row used has
    (see :func:`detect_id_field`), and numbers the rows by position only when there is none; a
    named field that a row lacks gives that row its position. Every other field goes into
    ``Problem.meta``. ``limit`` keeps the first rows (a built-in task may choose which; see its
    loader).

    Raises FileNotFoundError for a missing local path, ValueError for a row without a
    required field (naming the field, the available fields and the option to set), for
    duplicate ids, an unknown built-in (listing the known ones) or an unsupported file type,
    and ConnectionError (with what to do instead) when a Hub dataset cannot be reached.
    """
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
    ):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    source = os.fspath(source)
    convert = {
        "problem_field": problem_field,
        "answer_field": answer_field,
        "level_field": level_field,
        "id_field": id_field,
        "answer_from_solution": answer_from_solution,
        "limit": limit,
    }

    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in _BUILTINS:
            _import_providers()
        if name not in _BUILTINS:
            known = (
                ", ".join(BUILTIN_PREFIX + n for n in sorted(_BUILTINS))
                or "none registered"
            )
            raise ValueError(f"unknown built-in task {source!r}; known: {known}")
        rows = _BUILTINS[name](split=split, limit=limit)
        return _to_problems(rows, source, **convert)

    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return _to_problems(
            _dataset_rows(_read_directory(path, split), limit), source, **convert
        )
    if os.path.isfile(path):
        lower = path.lower()
        if lower.endswith(".jsonl"):
            rows = _read_jsonl(path)
        elif lower.endswith(".json"):
            rows = _read_json(path)
        elif lower.endswith(".parquet"):
            rows = _read_parquet(path)
        else:
            raise ValueError(
                f"{source}: unsupported file type; use one of {', '.join(_FILE_SUFFIXES)}"
            )
        return _to_problems(rows, source, **convert)
    if _looks_local(source):
        raise FileNotFoundError(f"no such file or directory: {source!r}")
    return _to_problems(
        _dataset_rows(_read_hub(source, split, config), limit), source, **convert
    )
