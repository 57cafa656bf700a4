"""evaluate on a checkpoint: exported to a bundle with torch first, then evaluated.

Every other evaluation test runs on the tiny bundle, without torch, in tests/unit/test_evaluate.py. This one stays here
because it needs what only training gives: a real checkpoint (smoke_run's best.pt) and training's exporter, which
imports torch, to turn it into a bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_triage.data.manifest import ingest, write_outputs
from cxr_triage.evaluation.evaluate import evaluate
from tests.conftest import make_dataset


@pytest.mark.slow
def test_checkpoint_is_exported_then_evaluated(smoke_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from cxr_triage.training.export import export_bundle

    ckpt = smoke_run / "best.pt"
    monkeypatch.chdir(tmp_path)  # the checkpoint's relative cache_dir lands here, not in the repo
    ds = make_dataset(tmp_path / "ds", n_per_class=6, seed=5)
    write_outputs(ingest(ds.root, val=0.3, test=0.2, seed=0, workers=1), ds.root, tmp_path / "data", {})
    m = evaluate(
        ckpt,
        tmp_path / "data" / "manifest.csv",
        split="all",
        out_dir=tmp_path / "out",
        bootstrap=20,
        gallery=1,
        ood=False,
        export=export_bundle,
    )
    assert m["model"] == str(ckpt) and m["bundle"]["name"].startswith("cxr-triage-")
    assert m["images"] == m["n"] + m["errors"] and (tmp_path / "out" / "report.html").exists()
