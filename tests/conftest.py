"""Shared fixtures of the test suite.

Helpers live in ``ponder.testing`` (importable by tests and benchmarks alike):
``ponder.testing.scripted`` (scripted Policy / PRM models), ``ponder.testing.tiny`` (tiny HF
models saved from configs), ``ponder.testing.prm_reference`` (the PRM formats' published
usage), ``ponder.testing.forest`` (Forest builders and snapshots), ``ponder.testing.serve``
(a live ``ponder serve``). Test modules take their models from there; the CLI tests share
test_evaluate's CLI fixtures and test_distributed test_openai_policy's ``ScriptedServer``.

Fixtures here: ``impl`` (every Forest test runs against both implementations: the
reference twin ``ponder.twins.Forest`` and the compiled ``ponder._core.Forest``), ``dirs``
(the tiny HF checkpoints, built once per session) and ``serve_server`` (one live
``ponder serve`` for the session).

Running the tests::

    python -m pytest                      # everything (what CI and the README run)
    python -m pytest -m "not slow"        # the fast loop: no end-to-end runs on the shipped
                                          # models, long searches, subprocess CLIs, benchmark
                                          # --quick runs or live servers
    python -m pytest -m slow              # only those

``slow`` marks a test whose run takes seconds to minutes (see ``markers`` in pyproject.toml).
"""

from __future__ import annotations

import os
import sys

import pytest

from ponder.testing.forest import IMPLS
from ponder.testing.serve import start_serve, stop_serve

# Test modules importing another by name (test_cli imports test_evaluate's CLI fixtures) also
# work under --import-mode=importlib.
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=list(IMPLS), ids=list(IMPLS))
def impl(request):
    """The Forest class under test: the reference twin or the compiled core."""
    return IMPLS[request.param]


@pytest.fixture(scope="session")
def dirs(tmp_path_factory):
    """``ponder.testing.tiny.save_test_models``: every tiny policy / PRM checkpoint the HF tests
    read (name -> directory, plus ``native_modules``), built once per session. Read-only."""
    from ponder.testing.tiny import save_test_models

    return save_test_models(tmp_path_factory.mktemp)


@pytest.fixture(scope="session")
def serve_server(tmp_path_factory):
    """One live ``ponder serve`` (built-in models, ``SERVE_ARGS``) for the whole session."""
    for mod in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
        pytest.importorskip(mod)
    server = start_serve(log_dir=str(tmp_path_factory.mktemp("serve")))
    yield server
    stop_serve(server)
