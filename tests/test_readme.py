"""The README's Python examples run as written.

Every fenced ```python block of README.md is executed, in order, in one namespace (so a later
block may use names an earlier one defined). A block that needs what a test machine does not
have (a hub download, a GPU, a running server) is preceded by the line
``<!-- not run: REASON -->``; the reason is required, and such blocks are only syntax-checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:<!-- not run: (?P<reason>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks():
    text = README.read_text(encoding="utf-8")
    return [(m.group("code"), m.group("reason")) for m in BLOCK.finditer(text)]


def test_readme_has_python_examples_that_run():
    blocks = _blocks()
    assert blocks, "README.md has no ```python example"
    assert any(reason is None for _, reason in blocks), "every README example is marked not run"


@pytest.mark.slow
def test_readme_python_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "readme"}
    ran = 0
    for i, (code, reason) in enumerate(_blocks()):
        compiled = compile(code, f"README.md python block {i}", "exec")
        if reason is not None:
            assert reason.strip(), f"README python block {i}: '<!-- not run: -->' needs a reason"
            continue
        try:
            exec(compiled, namespace)
        except Exception as err:  # name the block: the traceback alone points into exec
            pytest.fail(f"README python block {i} raised {type(err).__name__}: {err}\n{code}")
        ran += 1
    assert ran >= 1
