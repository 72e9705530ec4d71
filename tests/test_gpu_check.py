"""benchmarks/gpu_check.sh cannot rot: its dry run (everything that needs no GPU) runs here.

The dry run parses arguments, runs the preflight and the wheel step (a module that does not
import is unpacked from a carried wheel), checks that the helper scripts answer --help, and
writes gpu_check.json. The helpers that compare results run on CPU data here too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def dry_run(tmp_path, *args, **env):
    """Run the dry run into tmp_path/out with this interpreter; (returncode, output, gpu_check.json or None)."""
    out = tmp_path / "out"
    full_env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work"), **env}
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), *args], capture_output=True, text=True,
                       env=full_env, timeout=300)
    result = out / "gpu_check.json"
    return p.returncode, p.stdout + p.stderr, json.loads(result.read_text()) if result.exists() else None


def fake_wheel(folder: Path, dist: str, module: str) -> Path:
    """A minimal pure-Python wheel holding `module` (a package whose VALUE is 42)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{dist}-0.1.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    return path


@pytest.mark.slow
def test_dry_run_plans_every_step_within_the_budget(tmp_path):
    rc, output, res = dry_run(tmp_path)
    assert rc == 0, output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json", "gpu_check.log"]  # <= 8 files
    assert (tmp_path / "work" / "preflight.json").exists()
    assert res["dry_run"] and res["ok"] and res["budget_s"] <= 480  # an 8-minute slot
    assert [s["step"] for s in res["steps"]] == ["preflight", "wheels", "dry-run"]
    assert res["preflight"]["python"] == sys.executable and res["preflight"]["missing"] == []
    for step in ("build", "tests", "hf", "run", "bench", "sanitizer"):
        assert f"plan: {step} (cap " in output
    assert "-k cuda and not without_usable_cuda" in output and "--tool memcheck" in output and "--device cuda" in output
    # the wheel list: every module of benchmarks/gpu_wheels.txt was looked up
    mods = {m["module"]: m for m in res["wheels"]["modules"]}
    assert {"math_verify", "matplotlib", "safetensors", "tqdm"} <= set(mods)
    assert all(m["status"] == "present" for m in mods.values() if not m["optional"])


@pytest.mark.slow
def test_missing_module_is_unpacked_from_a_carried_wheel(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    fake_wheel(wheels, "ponder_fake_dep", "ponder_fake_dep")
    lst = tmp_path / "list.txt"
    lst.write_text("# a comment\nponder_fake_dep ponder-fake-dep==0.1\nponder_absent_dep ponder-absent-dep optional\n")
    rc, output, res = dry_run(tmp_path, GPU_WHEELS=str(wheels), GPU_SITE=str(site), GPU_WHEEL_LIST=str(lst))
    assert rc == 0, output
    mods = {m["module"]: m for m in res["wheels"]["modules"]}
    assert mods["ponder_fake_dep"]["status"] == "unpacked"
    assert mods["ponder_fake_dep"]["wheel"] == "ponder_fake_dep-0.1-py3-none-any.whl"
    assert mods["ponder_absent_dep"]["status"] == "missing" and res["wheels"]["missing"] == []
    assert (site / "ponder_fake_dep" / "__init__.py").exists()


@pytest.mark.slow
def test_a_missing_required_module_without_a_wheel_fails_the_dry_run(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("ponder_absent_dep ponder-absent-dep==1.0\n")
    rc, output, res = dry_run(tmp_path, GPU_WHEELS=str(tmp_path / "none"), GPU_SITE=str(tmp_path / "site"),
                              GPU_WHEEL_LIST=str(lst))
    assert rc == 1, output
    assert res["wheels"]["missing"] == ["ponder-absent-dep==1.0"]
    assert "gpu_prepare_wheels.sh" in output


@pytest.mark.slow
def test_build_requirements_are_notes_in_a_dry_run(tmp_path):
    """Without nvcc (as on a CI machine) the dry run still passes and notes what the build needs."""
    rc, output, res = dry_run(tmp_path, GPU_CHECK_NVCC="")
    assert rc == 0, output
    pre = res["preflight"]
    assert "nvcc (PATH or /usr/local/cuda/bin)" in pre["build_missing"] and pre["missing"] == []
    assert "the build would need: nvcc (PATH or /usr/local/cuda/bin)" in pre["notes"]


def test_a_python_without_torch_fails_the_preflight(tmp_path):
    bare = tmp_path / "bare-python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")  # no site-packages: no torch
    bare.chmod(0o755)
    rc, output, res = dry_run(tmp_path, PYTHON=str(bare))
    assert rc == 1, output
    assert res["steps"][0]["step"] == "preflight" and res["steps"][0]["status"] == "fail"
    assert "torch" in res["preflight"]["missing"]


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--skip", "nope"], "unknown step 'nope'"),
    (["--budget", "soon"], "--budget needs a number"),
    (["--out"], "--out needs a directory"),
])
def test_bad_arguments_exit_2(tmp_path, args, message):
    p = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and message in p.stderr


def test_help_describes_the_steps():
    p = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0
    for word in ("--dry-run", "compute-sanitizer", "gpu_prepare_wheels.sh", "4.8 TB/s"):
        assert word in p.stdout


@pytest.mark.parametrize("everything", [False, True])
def test_prepare_script_downloads_the_requirements_for_python_3_12(tmp_path, everything):
    """The prepare script's pip command (recorded by a stand-in pip): no deps, CPython 3.12, manylinux
    x86_64; the requirements the H200 image lacks (all of them with GPU_WHEELS_ALL=1)."""
    log = tmp_path / "pip-args"
    fake_pip = tmp_path / "pip"
    fake_pip.write_text(f"#!/bin/sh\necho \"$@\" > {log}\n")
    fake_pip.chmod(0o755)
    env = {**os.environ, "PIP": str(fake_pip), "GPU_WHEELS_ALL": "1" if everything else "0"}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_prepare_wheels.sh"), str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 1 and "no wheels" in p.stderr  # the stand-in fetched nothing
    args = log.read_text().split()
    assert "--no-deps" in args and "--only-binary=:all:" in args and args[args.index("--python-version") + 1] == "3.12"
    assert "manylinux_2_17_x86_64" in args
    lines = [line.split() for line in (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    want = [f[1] for f in lines if everything or "h200" not in f[2:]]
    assert "math-verify==0.9.0" in want and [a for a in args if "==" in a] == want


def test_compare_runs_pairs_rows_and_reports_differences(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_compare_runs as cmp
    finally:
        sys.path.pop(0)
    row = dict(policy="p", method="beam_search", n=4, gold="5", correct=True)
    for name, answers in (("a", ["5", "7"]), ("b", ["5", "6"])):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "results.jsonl", "w") as f:
            for i, ans in enumerate(answers):
                f.write(json.dumps({**row, "problem_id": f"q{i}", "answer": ans}) + "\n")
    assert cmp.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.json")]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert (c["same"], c["total"]) == (1, 2) and c["pairs"][1]["answer_b"] == "6"
    (tmp_path / "b" / "results.jsonl").write_text(json.dumps({**row, "problem_id": "q0", "answer": "5"}) + "\n")
    assert cmp.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1  # q1 is in one run only


@pytest.mark.slow
def test_hf_check_runs_on_cpu(tmp_path):
    """The GPU script's Hugging Face check, run here on the CPU (one family, fp32 + bf16)."""
    out = tmp_path / "hf.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_hf_check.py"), "--device", "cpu", "--quick",
                        "--out", str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    assert res["ok"] and {r["dtype"] for r in res["results"]} == {"float32", "bfloat16"}
    assert all(r["cow_copies"] >= 1 and r["max_abs_err"] <= r["bound"] for r in res["results"])
