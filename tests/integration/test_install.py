"""Install tiers: the base install predicts, a missing extra is one sentence naming it, pyproject builds cleanly."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cxr_triage.core.extras import EXTRAS
from cxr_triage.serve.samples import samples_dir
from tests.conftest import REPO

# run the CLI with some top-level modules made unimportable, as if their extra were not installed
BLOCKED_CLI = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
from cxr_triage.cli import app
try:
    app(sys.argv[2:], prog_name="cxr-triage")
finally:
    leaked = sorted(m for m in BLOCKED if m in sys.modules)
    print("LEAKED", leaked, file=sys.stderr)
"""


def run_without(modules: set[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKED_CLI, ",".join(sorted(modules)), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"COLUMNS": "400", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "src")},
    )


def all_extras() -> set[str]:
    return set().union(*EXTRAS.values())


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def needs(**extra_of: str) -> None:
    """Skip, naming the extra, when one of these modules (module=extra) is not installed here; under CI (which
    installs every extra) do not skip: the test then fails for the missing package."""
    missing = [f"{m} (the [{e}] extra)" for m, e in extra_of.items() if not installed(m)]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"not installed: {', '.join(missing)}")


@pytest.mark.parametrize(
    "extra,hidden,args",
    [
        ("serve", "fastapi", ["serve"]),
        ("serve", "uvicorn", ["serve", "--port", "1"]),
        ("serve", "fastapi", ["token", "new", "--out", "never-written.txt"]),
        ("train", "torch", ["train"]),
        ("train", "torch", ["export", "x.pt", "--out", "b"]),
        ("eval", "pandas", ["ingest", "d", "--out", "o"]),
        ("eval", "matplotlib", ["eda", "m.csv", "--out", "o"]),
        ("eval", "sklearn", ["evaluate", "--model", "m", "--data", "d", "--out", "o"]),
    ],
)
def test_missing_extra_is_one_sentence(extra: str, hidden: str, args: list[str]):
    res = run_without({hidden}, *args)
    assert res.returncode == 2, res.stderr
    message = res.stderr.split("LEAKED")[0].strip()
    assert "Traceback" not in res.stderr and message.count("\n") == 0, message
    assert f"needs the [{extra}] extra" in message and f"pip install 'cxr-triage[{extra}]'" in message
    assert f"`cxr-triage {args[0]}`" in message
    # it names the hidden module, or (in an install without the extra) another of the extra's modules that is missing
    named = re.search(r"no module '([^']+)'", message)
    assert named is not None, message
    also_missing = {m for m in EXTRAS[extra] if not installed(m)} if not os.environ.get("CI") else set()
    assert named.group(1) in {hidden} | also_missing, message


def test_base_install_predicts_without_any_extra(tmp_path: Path):
    """`pip install .` is enough to predict: every extra's modules hidden, predict still runs and never imports them."""
    res = run_without(all_extras(), "predict", str(samples_dir()), "--format", "csv", "--heatmaps", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "LEAKED []" in res.stderr
    assert len(res.stdout.splitlines()) == 1 + 16 and len(list(tmp_path.glob("*.png"))) >= 8


def test_pyproject_tiers_and_licence():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]  # SPDX expression
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    base = " ".join(project["dependencies"]).lower()
    for heavy in ("torch", "fastapi", "uvicorn", "pandas", "matplotlib", "scikit-learn", "lightning"):
        assert heavy not in base, heavy
    extras = project["optional-dependencies"]
    assert any(d.startswith("fastapi") for d in extras["serve"]) and not any("torch" in d for d in extras["serve"])
    assert any(d.startswith("torch") for d in extras["train"]) and "cxr-triage[eval]" in extras["train"]


def test_package_metadata_builds_without_warnings(tmp_path: Path):
    """setuptools builds the metadata from a copy of the tree with no (deprecation) warning."""
    import setuptools

    # pyproject's [build-system] requires setuptools>=77 (the SPDX `project.license`); an older one in this venv
    # rejects it, while pip's isolated build would fetch a new one. Under CI the venv must have it: no skip there.
    major = int(setuptools.__version__.split(".")[0])
    if major < 77 and not os.environ.get("CI"):
        pytest.skip(f"setuptools {setuptools.__version__} is installed; the build needs setuptools>=77")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    code = "from setuptools import build_meta as b; import sys; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    out = tmp_path / "meta"
    out.mkdir()
    res = subprocess.run(
        [sys.executable, "-W", "always", "-c", code, str(out)], capture_output=True, text=True, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert "warning" not in (res.stdout + res.stderr).lower(), res.stderr
    meta = (out / res.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: MIT" in meta and "Version: 0.1.0" in meta
    assert "Provides-Extra: serve" in meta and "Provides-Extra: train" in meta


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_serve_builds_the_light_venv():
    res = subprocess.run(["make", "-n", "serve"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    dry = res.stdout
    assert "-m venv --without-pip .venv-serve" in dry and "install -q --no-compile -e '.[serve]'" in dry
    assert ".venv-serve/bin/cxr-triage serve --host 127.0.0.1 --port 8000" in dry
    assert "torch" not in dry and "[train" not in dry


@pytest.mark.parametrize("ci", ["", "true"])
def test_missing_chromium_is_loud_and_fails_in_ci(ci: str):
    """Without Chromium the browser tests skip with a banner; with CI=true they fail."""
    needs(httpx="dev", playwright="dev", fastapi="serve")  # else test_browser.py skips before it looks for Chromium
    env = {**os.environ, "CXR_TRIAGE_CHROMIUM": "/nonexistent/chromium", "CI": ci, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/integration/test_browser.py"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    if ci:
        assert res.returncode == 1 and "CI must run the browser tests" in res.stdout, res.stdout[-2000:]
    else:
        assert res.returncode == 0, res.stdout[-2000:]
        assert "BROWSER TESTS SKIPPED" in res.stdout and "no chromium binary found" in res.stdout
