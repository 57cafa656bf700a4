"""``cxr-triage --version`` and ``python -m cxr_triage`` end to end: the CLI as a child process on a shipped sample
(the in-process Python API is tested in tests/unit/test_api.py)."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

import cxr_triage
from cxr_triage.cli import app
from cxr_triage.serve.samples import samples_dir
from tests.conftest import REPO


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return out.stdout.strip()


def test_version_and_python_m():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"cxr-triage {cxr_triage.__version__}"
    assert run_python("import runpy, sys; sys.argv = ['x', '--version']; runpy.run_module('cxr_triage')") == (
        f"cxr-triage {cxr_triage.__version__}"
    )
    sample = str(samples_dir() / "Normal-1655.jpg")
    out = subprocess.run(
        [sys.executable, "-m", "cxr_triage", "predict", sample, "--format", "csv"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("path,label,confidence,p_covid")
    assert (
        "Usage: cxr-triage"
        in subprocess.run(
            [sys.executable, "-m", "cxr_triage", "--help"], capture_output=True, text=True, cwd=REPO
        ).stdout
    )
