"""The tiny test bundle (``tests/tiny_bundle.py``) is a real bundle: sealed, typed, loadable, its class activation
maps exact, and its checked-in graphs the ones its generator writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cxr_triage.runtime.bundle import FILES, MANIFEST, Bundle, verify_seal
from cxr_triage.runtime.predictor import Predictor
from tests import tiny_bundle as tiny


def test_it_has_the_files_of_an_exported_bundle_and_is_sealed(tiny_bundle: Path):
    names = {p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file()}
    assert names == {*FILES, MANIFEST, "lungs/model.onnx", "lungs/model.json"}
    assert set(verify_seal(tiny_bundle)) == names - {MANIFEST}
    bundle = Bundle.load(tiny_bundle)
    assert bundle.meta.segmenter is not None and bundle.meta.lung_gate is not None
    assert bundle.spec.size == tiny.SIZE and sum(p.stat().st_size for p in tiny.DATA.iterdir()) < 200_000


def test_logits_are_the_linear_head_on_pooled_features(tiny_bundle: Path):
    """The contract class activation maps rest on: logits = cam_weight . mean(features) + cam_bias."""
    engine = Predictor(tiny_bundle).engine
    x = np.random.default_rng(0).normal(0, 1, (3, 1, tiny.SIZE, tiny.SIZE)).astype(np.float32)
    logits, feats = engine.forward(x)
    side = tiny.SIZE // tiny.PATCH
    assert logits.shape == (3, 4) and feats.shape == (3, tiny.CHANNELS, side, side)
    ex = engine.extras
    np.testing.assert_allclose(logits, feats.mean(axis=(2, 3)) @ ex["cam_weight"].T + ex["cam_bias"], atol=1e-5)


def test_grey_pictures_pass_the_gates_and_get_heatmaps_and_lungs(tiny_bundle: Path, class_image):
    predictor = Predictor(tiny_bundle)
    rng = np.random.default_rng(1)
    for cid in ("covid", "lung_opacity", "normal", "viral_pneumonia"):
        p = predictor.predict(class_image(cid, 120, 150, rng), heatmap=True)
        assert p.decision == "accept" and p.heatmap.shape == (120, 150, 3) and p.lung_attention is not None
    grey = class_image("covid", 96, 96, rng)
    colour = np.stack([grey, grey // 3, 255 - grey], axis=2).astype(np.uint8)
    assert [r.code for r in predictor.predict(colour).reasons] == ["colour"]
    noise = rng.integers(0, 256, (100, 100), dtype=np.uint8)
    assert predictor.predict(noise).decision == "rejected"


def test_without_lungs_it_is_a_bundle_with_no_segmenter(tmp_path: Path):
    predictor = Predictor(tiny.make_tiny_bundle(tmp_path / "b", lungs=False))
    assert predictor.segmenter is None and not (tmp_path / "b" / "lungs").exists()


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_checked_in_graphs_are_what_the_generator_builds(tmp_path: Path):
    pytest.importorskip("onnx", reason="rebuilding the graphs needs onnx (the [train] extra)")
    tiny.write_graphs(tmp_path)
    x = np.random.default_rng(2).normal(0, 1, (2, 1, tiny.SIZE, tiny.SIZE)).astype(np.float32)
    for path in (tiny.CLASSIFIER, tiny.SEGMENTER):
        old, new = (session(p) for p in (path, tmp_path / path.name))
        for a, b in zip(old.run(None, {"input": x}), new.run(None, {"input": x}), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{path.name} is stale: run `python -m tests.tiny_bundle`")
