"""The build: what the extension reports about itself, CUDA detection, no libtorch, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import ponder
from ponder import _core


def test_build_info_reports_what_was_compiled():
    info = ponder.build_info()
    assert info["version"] == ponder.__version__
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["sanitizers"], list)
    if info["cuda"]:
        # Explicit architectures (never `native`): at least Ampere and Hopper.
        arches = [a.split("-")[0] for a in info["cuda_architectures"]]
        assert "80" in arches and "90" in arches
        assert info["cuda_version"]
    else:
        assert info["cuda_architectures"] == []


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="only meaningful where nvcc is on PATH")
def test_cuda_sources_compiled_when_nvcc_is_present():
    assert ponder.build_info()["cuda"], "PONDER_CUDA=AUTO found nvcc but built CPU-only"


def test_cuda_available_matches_status():
    status = _core.cuda_status()
    assert set(status) == {"device_count", "kernels_run", "reason"}
    assert ponder.cuda_available() == (ponder.build_info()["cuda"] and status["kernels_run"])
    if not status["kernels_run"]:
        assert status["reason"], "a CUDA failure must say why"


def test_extension_does_not_link_or_import_torch():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, ponder; print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "False"
    if shutil.which("ldd"):
        ldd = subprocess.run(["ldd", _core.__file__], capture_output=True, text=True).stdout
        # Only the names and paths: the load addresses are random hex and can read "...c10...".
        libs = [tok for line in ldd.splitlines() for tok in line.split() if not tok.startswith("(0x")]
        assert libs, ldd
        assert not [lib for lib in libs if "torch" in lib or "c10" in lib], ldd


def test_cli_info_prints_build_info():
    out = subprocess.run([sys.executable, "-m", "ponder", "info"], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["version"] == ponder.__version__
    assert info["cuda_available"] == ponder.cuda_available()


def test_only_the_binding_files_know_python():
    """csrc/bindings/ marshals; the core (and the kernels' dispatch) never includes pybind11 or
    Python, and the kernel bindings leave validate -> check -> dispatch to kernels/dispatch.h."""
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    for path in csrc.rglob("*"):
        if path.suffix in (".h", ".cpp", ".cu") and path.parent.name != "bindings":
            text = path.read_text()
            assert "pybind11" not in text and "Python.h" not in text, path
    kernels = (csrc / "bindings" / "kernels.cpp").read_text()
    assert kernels.count("kern::run_") == 4
    assert "validate_" not in kernels and "check_" not in kernels.replace("check_indices", "")
    assert {p.name for p in (csrc / "bindings").glob("*.cpp")} == {
        "module.cpp", "tree.cpp", "kv.cpp", "kernels.cpp", "numpy_args.cpp", "dlpack_args.cpp"}
