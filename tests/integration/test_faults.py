"""Faults (issue 5): a training run killed with SIGKILL resumes without gaps; a failed write leaves no half file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cxr_triage.data import manifest as manifest_mod
from cxr_triage.data.manifest import ingest, write_outputs
from tests.conftest import REPO, SyntheticDataset, smoke_config

EPOCHS = 3


def _train_cmd(config: Path, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "cxr_triage.cli", "train", "--config", str(config), *(["--resume"] if resume else [])]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll until ``path`` exists; fail if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended (rc {proc.returncode}) before writing {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout:.0f} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkilled_training_resumes_without_gaps(smoke_manifest: Path, tmp_path: Path):
    cfg = smoke_config(tmp_path, smoke_manifest, name="killed", extra=[f"trainer.max_epochs={EPOCHS}"])
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(_train_cmd(config), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
        assert proc.poll() is None, "training finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "best.pt").exists()
    done = subprocess.run(
        _train_cmd(config, resume=True), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == list(range(EPOCHS))
    assert (run_dir / "best.pt").stat().st_size > 0


def test_failed_manifest_write_keeps_the_previous_file(
    synthetic_dataset: SyntheticDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "data"
    result = ingest(synthetic_dataset.root, val=0.25, test=0.25, seed=0, workers=1)
    write_outputs(result, synthetic_dataset.root, out, {})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # a second ingest with other settings would write different content: make the rename (the commit) fail
    changed = ingest(synthetic_dataset.root, val=0.4, test=0.2, seed=1, workers=1)

    def broken_replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manifest_mod.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        write_outputs(changed, synthetic_dataset.root, out, {"val": 0.4})
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    assert after == before, "a failed write changed a file a later command would trust"
    pd.read_csv(out / "manifest.csv")  # still a whole, parseable manifest


def test_killed_write_leaves_only_a_hidden_temp(tmp_path: Path):
    """A write killed mid-way (simulated: the process dies before the rename) never produces manifest.csv."""
    target = tmp_path / "out" / "manifest.csv"
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from cxr_triage.data import manifest as m\n"
        "m.os.replace = lambda *a: os._exit(9)\n"  # die between writing the temp file and renaming it
        "m.atomic_write_text(Path(sys.argv[1]), 'path,label\\n' * 100000)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert not target.exists()
    assert all(p.name.startswith(".manifest.csv.tmp") for p in target.parent.iterdir())


def test_failed_export_keeps_the_previous_bundle(
    smoke_run: Path, smoke_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from cxr_triage.runtime.predictor import Predictor
    from cxr_triage.training import export as export_mod

    out = tmp_path / "bundle"
    shutil.copytree(smoke_bundle, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_parity(*args, **kwargs):
        raise export_mod.ExportError("onnxruntime and torch disagree")

    monkeypatch.setattr(export_mod, "check_parity", broken_parity)
    with pytest.raises(export_mod.ExportError):
        export_mod.export_bundle(smoke_run / "best.pt", out, quantize="none")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"], "the half-written bundle was left behind"
    monkeypatch.undo()
    meta = export_mod.export_bundle(smoke_run / "best.pt", out, quantize="none")  # a good export replaces it whole
    assert Predictor(out).meta.onnx_sha256 == meta["onnx_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert out.stat().st_mode & 0o777 == 0o755
