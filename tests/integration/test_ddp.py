"""Multi-process training: the smoke model with 2 DDP processes on the CPU (gloo), launched like a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO, smoke_config


@pytest.mark.slow
def test_ddp_two_cpu_processes(smoke_manifest: Path, tmp_path: Path):
    cfg = smoke_config(
        tmp_path,
        smoke_manifest,
        name="ddp",
        extra=[
            "trainer.strategy=ddp",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            "trainer.max_epochs=1",
        ],
    )
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PL_TORCH_DISTRIBUTED_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cxr_triage.cli", "train", "--config", str(cfg_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size: 2" in proc.stderr or "MEMBER: 2/2" in proc.stderr
    run = tmp_path / "ddp"
    assert (run / "best.pt").exists()
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [0]
