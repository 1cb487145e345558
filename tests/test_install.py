"""Installed like a library and run from the user's own folder, outside the repository.

The package is installed with pip (``pip install --no-deps --target``: the dependencies are the
pinned environment's) into a temporary directory; the console script and ``import cmt_openmm``
then run in another temporary directory with the repository off ``sys.path``, and relative
paths resolve against that folder.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(ROOT)],
                   check=True, cwd=tmp_path_factory.mktemp("pip"), capture_output=True)
    return target


def _run(installed: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed)}  # the installed copy, not the repository
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_import_from_another_folder_uses_the_installed_package(installed, tmp_path):
    result = _run(installed, tmp_path, sys.executable, "-c",
                  "import cmt_openmm, cmt_openmm.training, cmt_openmm.sampling.moves; print(cmt_openmm.__file__)")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(installed)
    assert result.stdout.count("\n") == 1  # nothing but our line on stdout (no third-party banners)
    assert (installed / "cmt_openmm" / "flows" / "spline_kernel.cpp").is_file()  # the spline kernel's source ships


def test_console_script_trains_with_relative_paths_in_the_users_folder(installed, tmp_path):
    run_file = {"system": "toy-double-well", "method": "cmt", "budget": 3000, "max_steps": 2,
                "flow": {"n_layers": 1, "hidden": 8, "n_bins": 4},
                "cmt": {"n_samples": 500, "fit_steps": 2, "batch_size": 250},
                "report": {"n_samples": 200, "n_draws": 2}}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "r.yaml").write_text(yaml.safe_dump(run_file))
    script = installed / "bin" / "cmt-openmm"
    result = _run(installed, tmp_path, sys.executable, str(script), "train", "configs/r.yaml", "--out", "runs/x",
                  "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "x" / "report.json").is_file()
    assert not (ROOT / "runs" / "x").exists()


def test_ci_with_env_runs_in_the_callers_folder(tmp_path):
    result = subprocess.run([str(ROOT / ".ci" / "with-env"), "python", "-c", "import os; print(os.getcwd())"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tmp_path
