"""The lung segmenter end to end on generated shapes: train-seg -> export-seg (parity, Dice) -> segment (CLI),
and the torch-free lung helpers (clean-up, views, gate, attention), the extra-set view and lung-hole augmentation."""

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
from cxr_triage.core.lungs import (
    LungStats,
    clean_mask,
    input_mask,
    lung_attention,
    lung_stats,
    lung_view,
)
from cxr_triage.core.preprocess import PreprocessSpec
from cxr_triage.runtime import i18n
from cxr_triage.training.datasets import RandomLungHoles
from cxr_triage.training.lungcache import masked_extra_view
from cxr_triage.training.segdata import find_pairs, patient_group, split_pairs

REPO = Path(__file__).resolve().parents[1]


def chest(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A generated 'chest': two dark lung ellipses in a bright body on a dark background; (image, mask bool)."""
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    body = ((xx - 0.5) ** 2 / 0.2 + (yy - 0.55) ** 2 / 0.3) < 1
    cy = 0.5 + rng.uniform(-0.05, 0.05)
    lungs = np.zeros((h, w), bool)
    for cx in (0.32, 0.68):
        cx += rng.uniform(-0.03, 0.03)
        lungs |= ((xx - cx) ** 2 / rng.uniform(0.008, 0.014) + (yy - cy) ** 2 / rng.uniform(0.06, 0.09)) < 1
    img = 20 + 150 * body - 90 * lungs + rng.normal(0, 8, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8), lungs


def write_pairs(root: Path, n: int = 28, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["image,mask,origin"]
    for i in range(n):
        h, w = (int(v) for v in rng.integers(80, 121, 2))
        img, mask = chest(h, w, rng)
        stem = f"CHNCXR_{i:04d}_{i % 2}" if i % 3 else f"case{i}-day{i % 4}"
        Image.fromarray(img).save(root / "images" / f"{stem}.jpg", quality=92)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{stem}.png")
        rows.append(f"images/{stem}.jpg,masks/{stem}.png,{'shenzhen' if i % 3 else 'covid-multi'}")
    (root / "sources.csv").write_text("\n".join(rows) + "\n")
    return root


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


def test_split_is_group_aware_and_per_origin(tmp_path):
    df = find_pairs(write_pairs(tmp_path / "p", n=40))
    assert patient_group("CHNCXR_0001_1") == "CHNCXR_0001" and patient_group("x-day5") == "x"
    split = split_pairs(df, 0.2, 0.2, seed=3)
    assert (split.groupby(df["group"]).nunique() == 1).all()  # one patient, one side
    for _, sub in df.assign(split=split).groupby("origin"):
        assert set(sub["split"]) == {"train", "val", "test"}
    assert split.equals(split_pairs(df, 0.2, 0.2, seed=3))


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


def test_clean_mask_keeps_two_lungs_and_fills_holes():
    m = np.zeros((100, 100), bool)
    m[20:80, 10:40] = m[20:80, 60:90] = True
    m[50:55, 20:25] = False  # a hole
    m[2:4, 2:4] = True  # a speck
    c = clean_mask(m)
    assert c[52, 22] and not c[3, 3]
    s = lung_stats(c)
    assert s.both_found and 0.3 < s.area_fraction < 0.4
    one = c.copy()
    one[:, 50:] = False  # the image's right half holds the patient's left lung
    assert lung_stats(one).right_found and not lung_stats(one).left_found


def test_lung_view_and_attention():
    rng = np.random.default_rng(0)
    grey, mask = chest(120, 100, rng)
    view = lung_view(grey, mask, 64, "mask", 0.08)
    inside = input_mask(mask, PreprocessSpec(size=64, lungs="mask"))
    assert view.shape == (64, 64) and (view[~inside] == 0).all() and (view[inside] > 0).mean() > 0.99
    crop = lung_view(grey, mask, 64, "crop", 0.08)
    assert (crop > 0).mean() > 0.9  # the crop keeps what is around the lungs
    assert lung_view(grey, None, 64, "mask", 0.08).max() == 0
    cam = inside.astype(np.float32)
    assert lung_attention(cam, inside) == pytest.approx(1.0)
    assert lung_attention(1 - cam, inside) == pytest.approx(0.0)
    whole = input_mask(mask, PreprocessSpec(size=64))
    assert whole.shape == (64, 64) and 0.1 < whole.mean() < 0.5


def test_lung_gate():
    from cxr_triage.runtime.reasons import decision_of, lung_findings

    def decide(stats: LungStats) -> str:
        return decision_of(lung_findings(stats, 0.05, 0.75))

    assert decide(LungStats(0.01, False, False)) == "rejected"
    assert decide(LungStats(0.2, True, False)) == "uncertain"
    assert lung_findings(LungStats(0.2, True, False), 0.05, 0.75)[0].code == "one_lung"
    assert decide(LungStats(0.9, True, True)) == "uncertain"
    assert decide(LungStats(0.3, True, True)) == "accept"


def test_lungs_vouch_only_for_two_fields_where_a_chest_has_them():
    """The pixel-layout gate rejects unless the lungs vouch; the feature and colour gates always reject."""
    from cxr_triage.runtime.reasons import decision_of, findings, lungs_vouch

    gate = {"min_area": 0.03, "max_area": 0.65, "min_layout": 0.15, "min_layout_one_field": 0.45}
    good = LungStats(0.3, True, True, fields=2, layout=0.62)
    assert not lungs_vouch(good, gate)  # no vouch_layout in the bundle: never
    gate["vouch_layout"] = 0.55
    assert lungs_vouch(good, gate)
    assert not lungs_vouch(LungStats(0.3, True, True, fields=2, layout=0.5), gate)  # layout under the limit
    assert not lungs_vouch(LungStats(0.3, True, True, fields=1, layout=0.7), gate)  # one field
    assert not lungs_vouch(LungStats(0.3, True, False, fields=2, layout=0.7), gate)  # one lung: the lung gate
    assert not lungs_vouch(LungStats(0.8, True, True, fields=2, layout=0.7), gate)  # implausible area
    meta = {"ood": {"threshold": 10.0, "pixel_threshold": 0.5, "colour_threshold": 0.08}, "abstain": {"threshold": 0.9}}
    pixel_only = findings(0.99, 5.0, meta, pixel=0.6)
    assert [f.code for f in pixel_only] == ["unfamiliar_layout"] and decision_of(pixel_only) == "rejected"
    vouched = findings(0.99, 5.0, meta, pixel=0.6, lungs_vouch=True)
    assert [f.code for f in vouched] == ["unusual_framing"] and decision_of(vouched) == "uncertain"
    unsure = findings(0.5, 5.0, meta, pixel=0.6, lungs_vouch=True)  # the cut-off is checked too
    assert [f.code for f in unsure] == ["unusual_framing", "low_confidence"] and decision_of(unsure) == "uncertain"
    far = findings(0.99, 50.0, meta, pixel=0.6, lungs_vouch=True)  # unfamiliar features still reject
    assert decision_of(far) == "rejected" and [f.code for f in far] == ["unfamiliar_features", "unusual_framing"]
    assert decision_of(findings(0.99, 5.0, meta, colour=0.3, lungs_vouch=True)) == "rejected"


def test_lung_layout_gate():
    """Lung fields away from where the atlas has lungs are rejected; a single field needs the higher limit."""
    from cxr_triage.core.lungs import atlas_overlap, lung_atlas
    from cxr_triage.runtime.reasons import decision_of, lung_findings

    rng = np.random.default_rng(4)
    masks = [chest(int(rng.integers(90, 130)), int(rng.integers(90, 130)), rng)[1] for _ in range(12)]
    atlas = lung_atlas(masks)
    usual = chest(100, 100, rng)[1]
    assert lung_stats(usual, atlas).fields == 2 and lung_stats(usual, atlas).layout > 0.7
    shifted = np.zeros((100, 100), bool)
    shifted[70:98, 5:95] = True  # one band along the bottom: a 'lung field' where no lung is
    st = lung_stats(shifted, atlas)
    assert st.fields == 1 and st.layout < 0.3 and st.both_found
    assert atlas_overlap(np.zeros((100, 100), bool), atlas) == 0.0

    def gate(stats: LungStats) -> list[str]:
        return [f.code for f in lung_findings(stats, 0.03, 0.65, 0.15, 0.45)]

    assert gate(st) == ["lung_layout"] and decision_of(lung_findings(st, 0.03, 0.65, 0.15, 0.45)) == "rejected"
    assert gate(LungStats(0.3, True, True, fields=2, layout=0.3)) == []  # two fields: the lower limit
    assert gate(LungStats(0.3, True, True, fields=1, layout=0.3)) == ["lung_layout"]  # one field: the higher
    assert gate(LungStats(0.3, True, True, fields=1, layout=None)) == []  # no atlas: no layout check
    assert gate(LungStats(0.3, True, True, fields=1, layout=0.3))[0] in i18n.REASONS


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


def test_masked_extra_view_inverts_back():
    rng = np.random.default_rng(1)
    grey, mask = chest(120, 120, rng)
    inverted = np.where(mask, 255 - grey, 0).astype(np.uint8)
    view = masked_extra_view(inverted, PreprocessSpec(size=64, lungs="mask"))
    ref = lung_view(grey, mask, 64, "mask", 0.08)
    both = (view > 0) & (ref > 0)
    assert both.mean() > 0.3
    assert np.corrcoef(view[both].astype(float), ref[both].astype(float))[0, 1] > 0.8  # same polarity as the pool


def test_lung_holes_cut_inside_only():
    rng = np.random.default_rng(2)
    grey, mask = chest(96, 96, rng)
    view = torch.from_numpy(lung_view(grey, mask, 96, "mask", 0.08))[None]
    torch.manual_seed(0)
    cut = RandomLungHoles(1.0, 1.0)(view)
    assert (cut[view == 0] == 0).all()
    assert (cut == 0).sum() > (view == 0).sum()
    assert torch.equal(RandomLungHoles(0.0, 0.0)(view), view)


def test_whole_image_bundle_with_segmenter(smoke_run, seg_bundle, tmp_path):
    """A whole-image classifier carrying a segmenter: lung attention per row, the lung gate, the outline drawn."""
    from cxr_triage.runtime.engine import Engine
    from cxr_triage.runtime.predict import overlay, predict_arrays
    from cxr_triage.training.export import export_bundle

    meta = export_bundle(smoke_run / "best.pt", tmp_path / "b", quantize="none", segmenter=seg_bundle[0])
    assert meta["segmenter"]["path"] == "lungs" and (tmp_path / "b" / "lungs" / "model.onnx").exists()
    engine = Engine(tmp_path / "b")
    assert engine.segmenter is not None
    chest_img, _ = chest(110, 100, np.random.default_rng(5))
    blank = np.zeros((100, 100), np.uint8)
    rows = predict_arrays(engine, [chest_img, blank], heatmaps=True)
    assert 0.0 <= rows[0].lung_attention <= 1.0
    assert rows[1].decision == "rejected" and rows[1].label is None
    assert any(r.code == "no_lungs" and "no lung fields" in r.text for r in rows[1].reasons)
    assert rows[1].heatmap is None
    assert "lung_layout" not in [r.code for r in rows[0].reasons]
    gate = engine.meta.get("lung_gate") or {}
    engine.meta["lung_gate"] = {**gate, "min_layout": 0.999}  # no chest's lungs overlap the atlas that well
    moved = predict_arrays(engine, [chest_img], lang="ko")[0]
    assert moved.decision == "rejected" and moved.reasons[0].code == "lung_layout"
    assert "폐 위치" in moved.reasons[0].text
    # an unusual thumbnail layout rejects, unless two lung fields where a chest's are vouch for a chest X-ray
    engine.meta["lung_gate"] = dict(gate)
    engine.meta["ood"] = {**engine.meta["ood"], "pixel_threshold": 0.0, "threshold": 1e9}
    layout = engine.segmenter.stats(engine.segmenter.masks([chest_img])[0]).layout
    assert [r.code for r in predict_arrays(engine, [chest_img])[0].reasons] == ["unfamiliar_layout"]
    engine.meta["lung_gate"] = {**gate, "vouch_layout": layout - 0.01}
    vouched = predict_arrays(engine, [chest_img])[0]
    assert vouched.decision == "uncertain" and vouched.reasons[0].code == "unusual_framing"
    assert vouched.label is not None and "both lungs were found" in vouched.reasons[0].text
    engine.meta["lung_gate"] = {**gate, "vouch_layout": layout + 0.01}  # layout under the limit: no vouching
    assert predict_arrays(engine, [chest_img])[0].decision == "rejected"
    mask = engine.segmenter.masks([chest_img])[0]
    heat = overlay(chest_img, np.ones((4, 4), np.float32), engine.spec, lungs=mask)
    assert heat.shape == (110, 100, 3)
    assert ((heat == (0, 255, 255)).all(axis=2)).sum() > 20  # the lung outline, in cyan


def test_lung_view_classifier_with_extra_set(smoke_manifest, seg_bundle, tmp_path):
    """preprocess.lungs=mask + a lung-masked extra set: trains, exports with its segmenter, refuses to run without."""
    from cxr_triage.runtime.engine import BundleError, Engine
    from cxr_triage.runtime.predict import predict_paths
    from cxr_triage.training.export import export_bundle
    from cxr_triage.training.train import train

    from .conftest import smoke_config

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
    row = next(predict_paths(Engine(out), [str(img)]))
    assert row.decision in ("accept", "uncertain", "rejected") and 0 <= row.lung_attention <= 1
    import shutil

    shutil.rmtree(out / "lungs")
    with pytest.raises(BundleError):
        Engine(out)


def test_fill_holes_matches_scipy():
    from scipy import ndimage

    from cxr_triage.core.lungs import cleaned, fill_holes

    rng = np.random.default_rng(4)
    for _ in range(30):
        m = ndimage.binary_opening(rng.random((64, 80)) > 0.5)
        assert (fill_holes(m) == ndimage.binary_fill_holes(m)).all()
        c, fields = cleaned(m)  # the clean-up's own field count is the labelling of its result
        assert (c == clean_mask(m)).all() and fields == ndimage.label(c)[1]


def test_field_count_when_a_filled_hole_joins_two_fields():
    """Two fields touching only at corners enclose a hole; filling it joins them into one field."""
    from scipy import ndimage

    from cxr_triage.core.lungs import cleaned

    m = np.zeros((12, 12), bool)
    m[2, 2:6] = m[9, 2:6] = m[2:10, 2] = True  # a "C"
    m[3, 6:10] = m[8, 6:10] = m[3:9, 9] = True  # a reversed "C" touching it at two corners only
    assert ndimage.label(m)[1] == 2
    c, fields = cleaned(m)
    assert c[5, 5] and fields == ndimage.label(c)[1] == 1


def test_coarse_grid_and_bilinear_matrix_match_pil():
    from cxr_triage.core.lungs import bilinear_matrix, coarse

    rng = np.random.default_rng(5)
    for shape in ((128, 128), (100, 70)):  # block means, and PIL's box filter with fractional cells
        m = rng.random(shape) > 0.6
        ref = np.asarray(Image.fromarray(m.astype(np.float32)).resize((32, 32), Image.Resampling.BOX))
        np.testing.assert_allclose(coarse(m), ref, atol=1e-6)
    cam = rng.normal(size=(5, 7)).astype(np.float32)
    ref = np.asarray(Image.fromarray(cam).resize((90, 160), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(bilinear_matrix(5, 160) @ cam @ bilinear_matrix(7, 90).T, ref, atol=1e-5)
    mask = rng.random((160, 90)) > 0.5
    pos = np.maximum(ref, 0)
    assert lung_attention(cam, mask) == pytest.approx(pos[mask].sum() / pos.sum(), abs=1e-5)


def test_augment_moves_the_lung_mask_with_the_image():
    """Geometry is shared by image and mask; photometric changes never touch the mask."""
    import torch

    from cxr_triage.core.config import load_config
    from cxr_triage.training.datasets import build_augment

    aug_cfg = load_config(REPO / "configs" / "default.yaml", ["augment.rotate=25", "augment.translate=0.15"])["augment"]
    _, mask = chest(96, 96, np.random.default_rng(2))
    img = torch.from_numpy(mask.astype(np.uint8) * 200 + 20)[None]
    aug = build_augment(aug_cfg, 96)
    moved = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out, m = aug.with_mask(img, torch.from_numpy(mask)[None])
        assert out.dtype == torch.uint8 and m.dtype == torch.bool and m.shape == (1, 96, 96)
        bright = out[0].float() > out[0].float().mean()
        assert (bright == m[0]).float().mean() > 0.9  # the mask still covers the (bright) lungs
        moved += int((m[0].numpy() != mask).mean() > 0.02)
    assert moved >= 6  # and it really moved with them


def test_composite_keeps_the_donor_body_and_takes_the_lung_pattern():
    from cxr_triage.training.lungcache import composite

    rng = np.random.default_rng(3)
    donor, dmask = chest(128, 128, rng)
    view = np.zeros((128, 128), np.uint8)
    view[8:120, 4:60] = np.tile(np.linspace(1, 255, 112)[:, None], (1, 56)).astype(np.uint8)  # brighter downwards
    view[8:120, 68:124] = view[8:120, 4:60]
    out, mask = composite(donor, dmask, view, 0.08)
    assert (out[~mask] == donor[~mask]).all()  # the body outside the lungs is the donor's
    assert mask[dmask].all() and mask.sum() > dmask.sum()
    assert set(np.unique(out[mask & ~(out == donor)])) <= set(np.unique(donor[dmask]))  # the donor's lung levels
    ys, xs = np.nonzero(dmask)
    top, bottom = out[ys.min() + 4, xs], out[ys.max() - 4, xs]
    assert bottom.mean() > top.mean() + 15  # the view's pattern (donor lung levels span about 55-105)
    assert composite(donor, np.zeros_like(dmask), view, 0.08) is None


def test_lung_share_of_class_activation():
    import torch

    from cxr_triage.training.train import Classifier

    feats = torch.zeros(2, 3, 4, 4)
    feats[0, 0, :2] = 1.0  # class 0 evidence in the top half only
    feats[1, 0] = 1.0  # everywhere
    weight = torch.eye(4, 3)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, :16] = 1  # lungs = top half
    share = Classifier.lung_share(feats, weight, torch.tensor([0, 0]), mask)
    assert torch.allclose(share, torch.tensor([1.0, 0.5]), atol=1e-4)


def test_lung_guided_whole_image_training_with_composites(smoke_manifest, seg_bundle, tmp_path):
    """seg head + attention penalty + extra masked images composed onto whole images: trains, logs the lung
    attention, and exports a plain network (no segmentation head) that predicts."""
    import pandas as pd
    import torch

    from cxr_triage.runtime.engine import Engine
    from cxr_triage.runtime.predict import predict_paths
    from cxr_triage.training.export import export_bundle
    from cxr_triage.training.train import train

    from .conftest import smoke_config

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
    row = next(predict_paths(Engine(out), [str(img)]))
    assert row.decision in ("accept", "uncertain", "rejected")


def test_lung_mask_in_input_coordinates_without_the_full_size_mask(seg_bundle):
    """predict reads lung statistics and attention from the segmenter-size mask; it agrees with the full-size path."""
    from cxr_triage.core.lungs import input_mask, lung_stats, resize_mask
    from cxr_triage.core.preprocess import PreprocessSpec
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
    from cxr_triage.runtime.engine import Engine
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
    assert Engine(bundle).segmenter is not None
    assert not any(p.name.startswith(".lungs") for p in bundle.iterdir())
    (bundle / "lungs" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError):
        Engine(bundle)
    view = tmp_path / "view"
    shutil.copytree(smoke_bundle, view)
    meta = json.loads((view / "model.json").read_text())
    meta["preprocess"]["lungs"] = "mask"
    from cxr_triage.runtime.bundle import write_meta

    write_meta(view, meta)
    with pytest.raises(BundleError, match="export it again"):
        replace_segmenter(view, seg_bundle[0])
