"""ponder.data: loading problems from files, saved datasets, the Hub and built-in tasks."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ponder import data
from ponder.data import (
    Problem,
    builtin_names,
    load_problems,
    parse_level,
    register_builtin,
)

ROWS = [
    {
        "problem": "What is 1+1?",
        "answer": "2",
        "level": "Level 1",
        "unique_id": "a/1.json",
        "subject": "Arith",
    },
    {
        "problem": "Half of 1?",
        "answer": "\\frac{1}{2}",
        "level": "Level 3",
        "unique_id": "b/2.json",
        "subject": "Alg",
    },
    {
        "problem": "Solve x+1=4.",
        "answer": "3",
        "level": "Level 5",
        "unique_id": "c/3.json",
        "subject": "Alg",
    },
]
EXPECTED = [
    Problem("a/1.json", "What is 1+1?", "2", 1, {"subject": "Arith"}),
    Problem("b/2.json", "Half of 1?", "\\frac{1}{2}", 3, {"subject": "Alg"}),
    Problem("c/3.json", "Solve x+1=4.", "3", 5, {"subject": "Alg"}),
]


def write_jsonl(path, rows, blank_lines=False):
    lines = [json.dumps(r) for r in rows]
    if blank_lines:
        lines = ["", *lines[:1], "   ", *lines[1:], ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def builtins(monkeypatch):
    """An empty, private built-in registry for one test."""
    monkeypatch.setattr(data, "_BUILTINS", {})
    return data._BUILTINS


# ----------------------------------------------------------------------------- formats


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", ROWS, blank_lines=True)
    assert load_problems(path) == EXPECTED
    assert load_problems(str(path)) == EXPECTED


def test_jsonl_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_problems(path)


def test_json_list_and_data_key(tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(ROWS), encoding="utf-8")
    assert load_problems(as_list) == EXPECTED
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": ROWS, "version": 1}), encoding="utf-8")
    assert load_problems(wrapped) == EXPECTED


def test_json_bad_shape(tmp_path):
    path = tmp_path / "dict.json"
    path.write_text(json.dumps({"rows": ROWS}), encoding="utf-8")
    with pytest.raises(
        ValueError,
        match=r"JSON list of objects or an object with a \"data\" list.*rows",
    ):
        load_problems(path)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("3", encoding="utf-8")
    with pytest.raises(ValueError, match="got int"):
        load_problems(scalar)
    not_objects = tmp_path / "ints.json"
    not_objects.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="row 0 is a int, not an object"):
        load_problems(not_objects)


def test_parquet_pyarrow(tmp_path):
    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_problems(path) == EXPECTED


def test_parquet_written_by_datasets(tmp_path):
    path = tmp_path / "math.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert load_problems(path, limit=2) == EXPECTED[:2]


def test_parquet_without_pyarrow_uses_datasets(tmp_path, monkeypatch):
    import builtins as py_builtins

    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    real_import = py_builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name == "pyarrow.parquet":
            raise ImportError("no pyarrow here")
        return real_import(name, *args, **kwargs)

    used = []
    real_from_parquet = datasets.Dataset.from_parquet

    def spy(*args, **kwargs):
        used.append(args)
        return real_from_parquet(*args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "from_parquet", spy)
    monkeypatch.setattr(py_builtins, "__import__", no_pyarrow)
    assert load_problems(path) == EXPECTED
    assert used == [(str(path),)]


def test_save_to_disk_dataset(tmp_path):
    target = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(target))
    assert load_problems(target) == EXPECTED
    assert (
        load_problems(target, split="whatever") == EXPECTED
    )  # a single Dataset has no splits
    assert load_problems(target, limit=1) == EXPECTED[:1]


def test_save_to_disk_dataset_dict(tmp_path):
    target = tmp_path / "saved_dict"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:1]),
            "test": datasets.Dataset.from_list(ROWS[1:]),
        }
    ).save_to_disk(str(target))
    assert load_problems(target) == EXPECTED[1:]  # split="test" by default
    assert load_problems(target, split="train") == EXPECTED[:1]
    with pytest.raises(
        ValueError,
        match=r"no split 'validation'; available splits: \['test', 'train'\]",
    ):
        load_problems(target, split="validation")


def test_directory_of_data_files(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    write_jsonl(folder / "part.jsonl", ROWS)
    # datasets names the only split "train"; a single split is used whatever split says
    assert load_problems(folder) == EXPECTED


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "math.csv"
    path.write_text("problem,answer\n1+1,2\n", encoding="utf-8")
    with pytest.raises(
        ValueError,
        match=r"unsupported file type; use one of \.jsonl, \.json, \.parquet",
    ):
        load_problems(path)


# ----------------------------------------------------------------------------- fields


def test_field_remapping_and_meta(tmp_path):
    rows = [
        {"question": "Q0", "final": 7, "difficulty": 2, "idx": 10, "source": "x"},
        {
            "question": "Q1",
            "final": 2.5,
            "difficulty": "hard",
            "idx": 11,
            "source": "y",
        },
    ]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    got = load_problems(
        path,
        problem_field="question",
        answer_field="final",
        level_field="difficulty",
        id_field="idx",
    )
    assert got == [
        Problem("10", "Q0", "7", 2, {"source": "x"}),
        Problem("11", "Q1", "2.5", None, {"source": "y"}),
    ]
    assert all(isinstance(p.answer, str) and isinstance(p.id, str) for p in got)


def test_missing_ids_and_levels_default(tmp_path):
    rows = [
        {"problem": "A", "answer": "1"},
        {"problem": "B", "answer": "2", "unique_id": None},
    ]
    got = load_problems(write_jsonl(tmp_path / "p.jsonl", rows))
    # no field is an id in every row: rows are numbered, and a partial id field stays in meta
    assert got == [Problem("0", "A", "1"), Problem("1", "B", "2", meta={"unique_id": None})]
    assert got[0].level is None and got[0].meta == {}


def test_answer_from_solution(tmp_path):
    rows = [
        {
            "problem": "P",
            "solution": "We get $\\boxed{\\frac{1}{2}}$.",
            "level": "Level 2",
            "type": "Algebra",
        },
        {
            "problem": "Q",
            "solution": "First \\boxed{1}, no: \\boxed{\\{1,2\\}}",
            "level": "Level 4",
            "type": "Sets",
        },
    ]
    path = write_jsonl(tmp_path / "math_train.jsonl", rows)
    got = load_problems(path, answer_field="solution", answer_from_solution=True)
    assert [(p.id, p.answer, p.level, p.meta) for p in got] == [
        ("0", "\\frac{1}{2}", 2, {"type": "Algebra"}),
        ("1", "\\{1,2\\}", 4, {"type": "Sets"}),
    ]
    no_box = write_jsonl(
        tmp_path / "no_box.jsonl", [{"problem": "P", "solution": "it is 3"}]
    )
    with pytest.raises(
        ValueError,
        match=r"row 0: answer_from_solution is set but field 'solution' has no \\boxed",
    ):
        load_problems(no_box, answer_field="solution", answer_from_solution=True)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("Level 3", 3),
        ("level 5", 5),
        ("3", 3),
        (4, 4),
        (2.0, 2),
        (2.5, None),
        ("Level ?", None),
        ("", None),
        (None, None),
        (True, None),
    ],
)
def test_parse_level(value, expected):
    assert parse_level(value) == expected


def test_parse_level_numpy():
    import numpy as np

    assert parse_level(np.int64(4)) == 4


def test_limit(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    assert load_problems(path, limit=0) == []
    assert load_problems(path, limit=2) == EXPECTED[:2]
    assert load_problems(path, limit=100) == EXPECTED
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="limit must be None or an int >= 0"):
            load_problems(path, limit=bad)


def test_limit_stops_before_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], {"problem": "no answer"}])
    assert load_problems(path, limit=1) == EXPECTED[:1]


# ----------------------------------------------------------------------------- errors


def test_missing_answer_field_message(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"problem": "P", "solution": "S", "level": 1}]
    )
    with pytest.raises(ValueError) as info:
        load_problems(path)
    message = str(info.value)
    assert "row 0 has no field 'answer' for the answer" in message
    assert "available fields: ['level', 'problem', 'solution']" in message
    assert "answer_field=..." in message and "--answer-field" in message


def test_missing_problem_field_message(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "P", "answer": "1"}])
    with pytest.raises(
        ValueError,
        match=r"no field 'problem' for the problem; available fields: \['answer', 'question'\]",
    ):
        load_problems(path)
    with pytest.raises(ValueError, match="--problem-field"):
        load_problems(path)


def test_missing_field_in_a_later_row(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], {"problem": "P", "ans": "1"}])
    with pytest.raises(
        ValueError, match=r"row 1 has no field 'answer'.*\['ans', 'problem'\]"
    ):
        load_problems(path)


def test_null_answer(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "P", "answer": None}])
    with pytest.raises(
        ValueError, match=r"row 0 has no value \(null\) in answer field 'answer'"
    ):
        load_problems(path)


def test_duplicate_ids(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [ROWS[0], dict(ROWS[1], unique_id="a/1.json")]
    )
    with pytest.raises(
        ValueError, match=r"rows 0 and 1 have the same id 'a/1.json'.*--id-field"
    ):
        load_problems(path)
    # numbering rows by position instead
    assert [p.id for p in load_problems(path, id_field="no_such_field")] == ["0", "1"]


@pytest.mark.parametrize(
    "name", ["missing.jsonl", "missing.parquet", "./missing", "sub/dir/missing"]
)
def test_missing_file(tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_problems(name)
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / name)


# ----------------------------------------------------------------------------- hub


def test_hub_offline_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'HuggingFaceH4/MATH-500' on the Hub (LocalEntryNotFoundError)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError) as info:
        load_problems("HuggingFaceH4/MATH-500")
    message = str(info.value)
    assert "'HuggingFaceH4/MATH-500'" in message
    assert "offline" in message and "local .jsonl/.json/.parquet file" in message
    assert isinstance(info.value.__cause__, ConnectionError)


def test_hub_dataset_loaded_through_datasets(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_problems("HuggingFaceH4/MATH-500") == EXPECTED
    assert (
        load_problems("openai/gsm8k", config="main", split="train", limit=2)
        == EXPECTED[:2]
    )
    assert calls == [
        ("HuggingFaceH4/MATH-500", None, "test"),
        ("openai/gsm8k", "main", "train"),
    ]


# ----------------------------------------------------------------------------- built-ins


def test_builtin_registry(builtins):
    seen = []

    def arith(split, limit):
        seen.append((split, limit))
        return [
            Problem(f"arith-{i}", f"{i}+{i}", str(2 * i), level=1) for i in range(5)
        ]

    register_builtin("arith", arith)
    assert builtin_names() == ["arith"]
    got = load_problems("builtin:arith", limit=3, split="train")
    assert [p.id for p in got] == [
        "arith-0",
        "arith-1",
        "arith-2",
    ]  # truncated even if the loader ignores limit
    assert got[2] == Problem("arith-2", "2+2", "4", 1)
    assert seen == [("train", 3)]


def test_builtin_rows_use_the_field_mapping(builtins):
    register_builtin(
        "rows", lambda split, limit: iter([{"q": "1+2", "a": 3, "level": "Level 2"}])
    )
    got = load_problems("builtin:rows", problem_field="q", answer_field="a")
    assert got == [Problem("0", "1+2", "3", 2)]


def test_builtin_reregistration_replaces(builtins):
    register_builtin("t", lambda split, limit: [Problem("1", "p", "1")])
    register_builtin("t", lambda split, limit: [Problem("2", "p", "2")])
    assert load_problems("builtin:t") == [Problem("2", "p", "2")]


def test_unknown_builtin_lists_known(builtins):
    register_builtin("arith", lambda split, limit: [])
    register_builtin("chain", lambda split, limit: [])
    with pytest.raises(
        ValueError,
        match=r"unknown built-in task 'builtin:nope'; known: builtin:arith, builtin:chain",
    ):
        load_problems("builtin:nope")


def test_unknown_builtin_with_none_registered(builtins):
    with pytest.raises(
        ValueError, match="unknown built-in task 'builtin:x'; known: none registered"
    ):
        load_problems("builtin:x")


def test_register_builtin_validation(builtins):
    for bad in ["", "a:b", "has space", None]:
        with pytest.raises(ValueError, match="builtin name"):
            register_builtin(bad, lambda split, limit: [])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        register_builtin("ok", "not a function")  # type: ignore[arg-type]
    assert builtins == {}


# ----------------------------------------------------------------------------- built-in task of a problem


def test_builtin_problems_carry_their_task_and_its_defaults(tmp_path, monkeypatch):
    """``Problem.task`` says which built-in task generated a problem; ``ponder.toy.task_defaults``
    finds that task's search limits from it: by what the problems are, not by a dataset name."""
    from ponder.calibrate import fresh_arith
    from ponder.toy import TaskDefaults, arith, load_arith, task_defaults

    # ponder.toy registers builtin:arith once, when first imported (maybe inside a test's private registry)
    monkeypatch.setitem(data._BUILTINS, "arith", load_arith)

    test = load_problems("builtin:arith", limit=4)
    train = load_problems("builtin:arith", split="train", limit=4)
    fresh = fresh_arith(1)
    assert {p.task for p in test + train + fresh} == {arith.TASK}
    expected = TaskDefaults(**arith.SEARCH_LIMITS, per_level=arith.DEFAULT_PER_LEVEL)
    assert task_defaults(test) == task_defaults(train) == task_defaults(fresh) == expected
    assert (expected.num_iterations, expected.max_steps, expected.max_step_tokens) == (16, 16, 96)
    # the same questions read from a file are not the built-in task's problems (task None)
    path = tmp_path / "copy.jsonl"
    path.write_text("".join(json.dumps({"problem": p.problem, "answer": p.answer, "level": p.level}) + "\n"
                            for p in test))
    copy = load_problems(path)
    assert [p.problem for p in copy] == [p.problem for p in test] and {p.task for p in copy} == {None}
    assert task_defaults(copy) is None
    assert task_defaults(test + copy) is None  # mixed: no one task
    assert task_defaults([]) is None
    assert Problem("a", "q", "1").task is None
