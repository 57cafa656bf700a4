"""The lung segmenter end to end on generated shapes: train-seg -> export-seg (parity, Dice) -> segment (CLI), the
atlas check, and whole-image and lung-view classifiers trained with it (the helpers without training:
tests/unit/test_segment.py)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_triage.core.config import load_config
from cxr_triage.core.lungs import input_mask, lung_attention, lung_stats
from cxr_triage.core.preprocess import PreprocessSpec
from tests.conftest import REPO
from tests.lung_pairs import chest, write_pairs


def write_extra_masked(root: Path, seed: int, n: int = 6) -> Path:
    """A lung-masked, inverted extra set like ../shared/data/extra/rsna-lung-masked: n new Lung Opacity patients."""
    (root / "Lung_Opacity").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = ["file,label,same_patient_as"]
    for i in range(n):
        grey, mask = chest(96, 96, rng)
        Image.fromarray(np.where(mask, 255 - grey, 0).astype(np.uint8)).save(root / "Lung_Opacity" / f"p{i}.jpg")
        rows.append(f"Lung_Opacity/p{i}.jpg,Lung_Opacity,")
    (root / "sources.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def seg_bundle(tmp_path_factory):
    """A seconds-long smoke segmenter trained on generated chests, exported (fp32 and int8 tried)."""
    from cxr_triage.training.export_seg import export_segmenter
    from cxr_triage.training.segmenter import train_segmenter

    tmp = tmp_path_factory.mktemp("seg")
    pairs = write_pairs(tmp / "pairs")
    cfg = load_config(
        REPO / "configs" / "segment.yaml",
        [
            "name=smoke",
            f"out_dir={tmp / 'runs'}",
            f"data.pairs={pairs}",
            "data.num_workers=0",
            "data.batch_size=8",
            "data.oversample={covid-multi: 3}",
            "preprocess.size=64",
            "model.channels=[8,16,32]",
            "trainer.max_epochs=30",
            "trainer.progress_bar=false",
            "optim.lr=0.01",
        ],
    )
    run = train_segmenter(cfg)
    meta = export_segmenter(run / "best.pt", tmp / "bundle")
    return tmp / "bundle", meta, run, pairs


def test_train_and_export(seg_bundle):
    bundle, meta, run, _ = seg_bundle
    assert (run / "best.pt").exists() and (run / "history.csv").exists()
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["format"].startswith("cxr-triage-segmenter")
    assert meta["parity_max_prob_diff"] < 1e-3
    assert meta["weights"].startswith(("int8", "fp32"))
    q = meta["quantization"]
    assert q["kept"] == (q["val_dice_fp32"] - q["val_dice_int8"] <= 0.005)
    held = meta["heldout"]
    assert held["all"]["n"] >= 4 and {"shenzhen", "covid-multi", "nlm"} <= set(held)
    assert held["all"]["dice_mean"] > 0.7  # the shapes are easy: a segmenter that learned nothing scores ~0.3
    on_disk = json.loads((bundle / "model.json").read_text())
    assert on_disk["onnx_sha256"] == meta["onnx_sha256"]
    atlas = np.asarray(on_disk["atlas"])  # where the training masks put lungs: two side blobs, not the middle
    assert atlas.shape == (32, 32) and 0 <= atlas.min() and atlas.max() <= 1
    assert atlas[:, 8:12].mean() > 2 * atlas[:, 15:17].mean()


def test_export_writes_prelu_as_fusable_leaky_relu(seg_bundle):
    """MONAI's one-slope PReLUs are exported as the LeakyReLU they equal (onnxruntime fuses those into the
    convolution): same outputs as the trained network, no PRelu node left in the graph."""
    import onnx

    from cxr_triage.training.export_seg import fusable
    from cxr_triage.training.segmenter import load_segmenter

    bundle, _, run, _ = seg_bundle
    model, _, spec = load_segmenter(run / "best.pt")
    slopes = [float(m.weight.detach()) for m in model.modules() if isinstance(m, torch.nn.PReLU)]
    assert slopes and len(set(slopes)) > 1  # trained slopes, each layer its own
    fused = fusable(model)
    assert not any(isinstance(m, torch.nn.PReLU) for m in fused.modules())
    assert sorted(m.negative_slope for m in fused.modules() if isinstance(m, torch.nn.LeakyReLU)) == sorted(slopes)
    assert any(isinstance(m, torch.nn.PReLU) for m in model.modules())  # the trained network is left as it was
    x = torch.randn(3, 1, spec.size, spec.size)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))
    ops = {n.op_type for n in onnx.load(str(bundle / "model.onnx")).graph.node}
    assert "PRelu" not in ops and "LeakyRelu" in ops


def test_segment_cli(seg_bundle, tmp_path):
    bundle, _, _, pairs = seg_bundle
    imgs = sorted((pairs / "images").iterdir())[:3]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    out = tmp_path / "masks"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr_triage.cli",
            "segment",
            *map(str, imgs),
            str(bad),
            "--out",
            str(out),
            "--model",
            str(bundle),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3, proc.stderr
    rows = list(csv.DictReader(open(out / "segment.csv")))
    assert [r["path"] for r in rows] == [*map(str, imgs), str(bad)]
    assert rows[-1]["error"] and not rows[-1]["mask_path"]
    for img, row in zip(imgs, rows, strict=False):
        mask = np.asarray(Image.open(out / f"{img.stem}.png"))
        assert mask.shape == np.asarray(Image.open(img)).shape  # the input's own size
        assert set(np.unique(mask)) <= {0, 255}
        assert abs(float(row["lung_area_fraction"]) - (mask > 0).mean()) < 1e-3
        assert row["left_found"] == "True" and row["right_found"] == "True"
        assert row["lung_fields"] == "2" and 0.3 < float(row["lung_layout"]) <= 1  # two lungs where the atlas has them
    # a relative path that starts like a spreadsheet formula is written quoted (OWASP), its mask named as usual
    shutil.copy(imgs[0], tmp_path / "=1+2.jpg")
    proc = subprocess.run(
        [sys.executable, "-m", "cxr_triage.cli", "segment", "=1+2.jpg", "--out", "m2", "--model", str(bundle)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    row = next(csv.DictReader(open(tmp_path / "m2" / "segment.csv")))
    assert row["path"] == "'=1+2.jpg" and (tmp_path / "m2" / "=1+2.png").exists()


def test_atlas_in_the_segmenter_bundle_is_checked(seg_bundle, tmp_path):
    from cxr_triage.runtime.engine import BundleError
    from cxr_triage.runtime.segment import LungSegmenter

    bundle = seg_bundle[0]
    assert LungSegmenter(bundle).atlas.shape == (32, 32)
    for bad in ([[2.0, 0.0], [0.0, 0.0]], [1, 2, 3], "x", [[0.0]]):
        copy = tmp_path / f"b{len(str(bad))}"
        shutil.copytree(bundle, copy)
        meta = json.loads((copy / "model.json").read_text())
        (copy / "model.json").write_text(json.dumps(meta | {"atlas": bad}))
        with pytest.raises(BundleError, match="atlas"):
            LungSegmenter(copy)
    meta = json.loads((bundle / "model.json").read_text())
    meta.pop("atlas")
    (tmp_path / "old").mkdir()
    shutil.copy(bundle / "model.onnx", tmp_path / "old" / "model.onnx")
    (tmp_path / "old" / "model.json").write_text(json.dumps(meta))
    assert LungSegmenter(tmp_path / "old").atlas is None  # bundles made before the atlas: no layout check


def test_whole_image_bundle_with_segmenter(smoke_run, seg_bundle, tmp_path):
    """A whole-image classifier carrying a segmenter: lung attention per row, the lung gate, the outline drawn."""
    from dataclasses import replace

    from cxr_triage.runtime.bundle import LungGate
    from cxr_triage.runtime.predict import overlay
    from cxr_triage.runtime.predictor import Predictor
    from cxr_triage.training.export import export_bundle

    meta = export_bundle(smoke_run / "best.pt", tmp_path / "b", quantize="none", segmenter=seg_bundle[0])
    assert meta["segmenter"]["path"] == "lungs" and (tmp_path / "b" / "lungs" / "model.onnx").exists()
    engine = Predictor(tmp_path / "b")
    assert engine.segmenter is not None
    chest_img, _ = chest(110, 100, np.random.default_rng(5))
    blank = np.zeros((100, 100), np.uint8)

    def predict_arrays(images, **kw):
        return [s.prediction for s in engine.score([engine.decode(i) for i in images], **kw)]

    def with_meta(**update):  # the predictor with other thresholds in its (typed) bundle metadata
        engine.bundle = replace(engine.bundle, meta=engine.meta.model_copy(update=update))

    rows = predict_arrays([chest_img, blank], heatmaps=True)
    assert 0.0 <= rows[0].lung_attention <= 1.0
    assert rows[1].decision == "rejected" and rows[1].label is None
    assert any(r.code == "no_lungs" and "no lung fields" in r.text for r in rows[1].reasons)
    assert rows[1].heatmap is None
    assert "lung_layout" not in [r.code for r in rows[0].reasons]
    gate = engine.meta.lung_gate or LungGate()
    with_meta(lung_gate=gate.model_copy(update={"min_layout": 0.999}))  # no chest's lungs overlap the atlas that well
    moved = predict_arrays([chest_img], lang="ko")[0]
    assert moved.decision == "rejected" and moved.reasons[0].code == "lung_layout"
    assert "폐 위치" in moved.reasons[0].text
    # an unusual thumbnail layout rejects, unless two lung fields where a chest's are vouch for a chest X-ray
    with_meta(lung_gate=gate, ood=engine.meta.ood.model_copy(update={"pixel_threshold": 0.0, "threshold": 1e9}))
    layout = engine.segmenter.stats(engine.segmenter.masks([chest_img])[0]).layout
    assert [r.code for r in predict_arrays([chest_img])[0].reasons] == ["unfamiliar_layout"]
    with_meta(lung_gate=gate.model_copy(update={"vouch_layout": layout - 0.01}))
    vouched = predict_arrays([chest_img])[0]
    assert vouched.decision == "uncertain" and vouched.reasons[0].code == "unusual_framing"
    assert vouched.label is not None and "both lungs were found" in vouched.reasons[0].text
    with_meta(lung_gate=gate.model_copy(update={"vouch_layout": layout + 0.01}))  # under the limit: no vouching
    assert predict_arrays([chest_img])[0].decision == "rejected"
    mask = engine.segmenter.masks([chest_img])[0]
    heat = overlay(chest_img, np.ones((4, 4), np.float32), engine.spec, lungs=mask)
    assert heat.shape == (110, 100, 3)
    assert ((heat == (0, 255, 255)).all(axis=2)).sum() > 20  # the lung outline, in cyan


def test_lung_view_classifier_with_extra_set(smoke_manifest, seg_bundle, tmp_path):
    """preprocess.lungs=mask + a lung-masked extra set: trains, exports with its segmenter, refuses to run without."""
    from cxr_triage.runtime.engine import BundleError
    from cxr_triage.runtime.predictor import Predictor
    from cxr_triage.training.export import export_bundle
    from cxr_triage.training.train import train
    from tests.conftest import smoke_config

    extra = write_extra_masked(tmp_path / "extra", seed=7)
    cfg = smoke_config(
        tmp_path / "runs",
        smoke_manifest,
        "lungview",
        [
            "preprocess.lungs=mask",
            f"data.segmenter={seg_bundle[0]}",
            f"data.extra_masked={extra}",
            "augment.holes_p=0.5",
            "augment.lobe_p=0.5",
            "trainer.max_epochs=1",
        ],
    )
    run = train(cfg)
    counts = torch.load(run / "best.pt", weights_only=True)["extra"]["counts"]
    assert counts["train"]["lung_opacity"] >= 6  # the extra images joined the training split only
    out = tmp_path / "bundle"
    meta = export_bundle(run / "best.pt", out, quantize="none")
    assert meta["preprocess"]["lungs"] == "mask" and meta["segmenter"]["sha256"] == seg_bundle[1]["onnx_sha256"]
    img = sorted((seg_bundle[3] / "images").iterdir())[0]
    row = next(s.prediction for s in Predictor(out).predict_files([str(img)]))
    assert row.decision in ("accept", "uncertain", "rejected") and 0 <= row.lung_attention <= 1
    import shutil

    shutil.rmtree(out / "lungs")
    with pytest.raises(BundleError):
        Predictor(out)


def test_lung_guided_whole_image_training_with_composites(smoke_manifest, seg_bundle, tmp_path):
    """seg head + attention penalty + extra masked images composed onto whole images: trains, logs the lung
    attention, and exports a plain network (no segmentation head) that predicts."""
    import pandas as pd
    import torch

    from cxr_triage.runtime.predictor import Predictor
    from cxr_triage.training.export import export_bundle
    from cxr_triage.training.train import train
    from tests.conftest import smoke_config

    extra = write_extra_masked(tmp_path / "extra", seed=8)
    cfg = smoke_config(
        tmp_path / "runs",
        smoke_manifest,
        "guided",
        [
            f"data.segmenter={seg_bundle[0]}",
            f"data.extra_masked={extra}",
            "data.extra_donor_origin=null",
            "model.seg_weight=0.5",
            "model.attention_weight=1.0",
            "trainer.max_epochs=1",
        ],
    )
    run = train(cfg)
    hist = pd.read_csv(run / "history.csv")
    assert 0 <= hist["val_lung_attention"].iloc[-1] <= 1
    payload = torch.load(run / "best.pt", weights_only=True)
    assert payload["extra"]["counts"]["train"]["lung_opacity"] >= 6
    assert not any("seg_head" in k for k in payload["state_dict"])
    out = tmp_path / "bundle"
    export_bundle(run / "best.pt", out, quantize="none")
    img = sorted((seg_bundle[3] / "images").iterdir())[0]
    row = next(s.prediction for s in Predictor(out).predict_files([str(img)]))
    assert row.decision in ("accept", "uncertain", "rejected")


def test_lung_mask_in_input_coordinates_without_the_full_size_mask(seg_bundle):
    """predict reads lung statistics and attention from the segmenter-size mask; it agrees with the full-size path."""
    from cxr_triage.core.lungs import resize_mask
    from cxr_triage.runtime.segment import LungSegmenter

    seg = LungSegmenter(seg_bundle[0])
    rng = np.random.default_rng(11)
    for shape, border in (((300, 240), 0.06), ((97, 131), 0.03), ((512, 512), 0.0)):
        spec = PreprocessSpec(size=160, border=border)
        _, truth = chest(*shape, rng)
        small = resize_mask(truth, (seg.spec.size, seg.spec.size))
        fast = seg.in_input(small, shape, spec)
        slow = input_mask(seg.to_image(small, shape), spec)
        assert fast.shape == slow.shape == (160, 160)
        assert (fast & slow).sum() / (fast | slow).sum() > 0.95
        a, b = lung_stats(small), lung_stats(seg.to_image(small, shape))
        assert abs(a.area_fraction - b.area_fraction) < 0.01 and a.both_found == b.both_found
        for cam in (rng.normal(size=(5, 5)), np.outer(np.hanning(5), np.hanning(5))):  # attention on the mask's grid
            full = lung_attention(cam.astype(np.float32), slow)
            assert abs(seg.attention(cam, small, shape, spec) - full) < 0.01 and 0 < full < 1
    lung_view_spec = PreprocessSpec(size=64, lungs="crop")  # lung views take the full-size path
    assert seg.in_input(small, (512, 512), lung_view_spec).shape == (64, 64)
    cam = np.ones((4, 4), np.float32)
    assert seg.attention(cam, small, (512, 512), lung_view_spec) == pytest.approx(
        seg.in_input(small, (512, 512), lung_view_spec).mean()
    )


def test_seal_swaps_the_segmenter_of_a_whole_image_bundle(smoke_bundle, seg_bundle, tmp_path):
    """`cxr-triage seal BUNDLE --segmenter DIR`: the new segmenter is in, named and sealed; lung views refuse."""
    import shutil

    from cxr_triage.runtime.bundle import BundleError, read_bundle_meta
    from cxr_triage.runtime.predictor import Predictor
    from cxr_triage.runtime.segment import replace_segmenter

    bundle = tmp_path / "b"
    shutil.copytree(smoke_bundle, bundle)
    res = subprocess.run(
        [sys.executable, "-m", "cxr_triage.cli", "seal", str(bundle), "--segmenter", str(seg_bundle[0])],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    meta = read_bundle_meta(bundle)  # seal verified
    assert meta["segmenter"]["sha256"] == seg_bundle[1]["onnx_sha256"]
    assert Predictor(bundle).segmenter is not None
    assert not any(p.name.startswith(".lungs") for p in bundle.iterdir())
    (bundle / "lungs" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError):
        Predictor(bundle)
    view = tmp_path / "view"
    shutil.copytree(smoke_bundle, view)
    meta = json.loads((view / "model.json").read_text())
    meta["preprocess"]["lungs"] = "mask"
    from cxr_triage.runtime.bundle import write_meta

    write_meta(view, meta)
    with pytest.raises(BundleError, match="export it again"):
        replace_segmenter(view, seg_bundle[0])
