"""Shared fixtures of the test suite.

Helpers live in ``ponder.testing`` (importable by tests and benchmarks alike):
``ponder.testing.scripted`` (scripted Policy / PRM models), ``ponder.testing.tiny`` (tiny HF
models saved from configs), ``ponder.testing.prm_reference`` (the PRM formats' published
usage), ``ponder.testing.forest`` (Forest builders and snapshots), ``ponder.testing.serve``
(a live ``ponder serve``). A test module never imports another test module.

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

# The Forest helpers, importable as ``from conftest import ...`` by the modules that still do so
# (``ponder.testing.forest`` is their home).
from ponder.testing.forest import (  # noqa: F401
    ACTIVE,
    AGGREGATIONS,
    FINISHED,
    IMPLS,
    INT32_MAX,
    INT64_MAX,
    NO_ANSWER,
    NODE_FIELDS,
    PRUNED,
    VOTES,
    add_roots,
    assert_dtype,
    assert_node_dtypes,
    assert_same,
    assert_unchanged_after_raise,
    build_standard_forest,
    chain,
    children_with_scores,
    csr,
    expand,
    int_input,
    live_ids,
    set_steps,
    snapshot,
    spec_stats,
)
from ponder.testing.serve import SERVE_ARGS, SERVE_KEY, start_serve, stop_serve  # noqa: F401

# ``from conftest import`` (and a few test modules importing another by name) also work under
# --import-mode=importlib.
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
