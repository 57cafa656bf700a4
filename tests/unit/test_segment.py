"""The lung helpers on generated chests, without training: the group-aware pair split, clean-up, views, gates and
attention, the extra-set view and lung-hole augmentation. The segmenter trained and exported on generated shapes
(train-seg -> export-seg -> segment, and classifiers that carry it) is tests/integration/test_segment_training.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_triage.core.config import load_config
from cxr_triage.core.lungs import (
    LungStats,
    cleaned,
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
from tests.conftest import REPO
from tests.lung_pairs import chest, write_pairs


def test_split_is_group_aware_and_per_origin(tmp_path):
    df = find_pairs(write_pairs(tmp_path / "p", n=40))
    assert patient_group("CHNCXR_0001_1") == "CHNCXR_0001" and patient_group("x-day5") == "x"
    split = split_pairs(df, 0.2, 0.2, seed=3)
    assert (split.groupby(df["group"]).nunique() == 1).all()  # one patient, one side
    for _, sub in df.assign(split=split).groupby("origin"):
        assert set(sub["split"]) == {"train", "val", "test"}
    assert split.equals(split_pairs(df, 0.2, 0.2, seed=3))


def test_clean_mask_keeps_two_lungs_and_fills_holes():
    m = np.zeros((100, 100), bool)
    m[20:80, 10:40] = m[20:80, 60:90] = True
    m[50:55, 20:25] = False  # a hole
    m[2:4, 2:4] = True  # a speck
    c = cleaned(m)[0]
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
    from cxr_triage.runtime.bundle import Gates, LungGate
    from cxr_triage.runtime.reasons import decision_of, findings, lungs_vouch

    gate = LungGate(min_area=0.03, max_area=0.65, min_layout=0.15, min_layout_one_field=0.45)
    good = LungStats(0.3, True, True, fields=2, layout=0.62)
    assert not lungs_vouch(good, gate)  # no vouch_layout in the bundle: never
    gate = gate.model_copy(update={"vouch_layout": 0.55})
    assert lungs_vouch(good, gate)
    assert not lungs_vouch(LungStats(0.3, True, True, fields=2, layout=0.5), gate)  # layout under the limit
    assert not lungs_vouch(LungStats(0.3, True, True, fields=1, layout=0.7), gate)  # one field
    assert not lungs_vouch(LungStats(0.3, True, False, fields=2, layout=0.7), gate)  # one lung: the lung gate
    assert not lungs_vouch(LungStats(0.8, True, True, fields=2, layout=0.7), gate)  # implausible area
    gates, cut = Gates(threshold=10.0, pixel_threshold=0.5, colour_threshold=0.08), 0.9
    pixel_only = findings(0.99, 5.0, gates, cut, pixel=0.6)
    assert [f.code for f in pixel_only] == ["unfamiliar_layout"] and decision_of(pixel_only) == "rejected"
    vouched = findings(0.99, 5.0, gates, cut, pixel=0.6, lungs_vouch=True)
    assert [f.code for f in vouched] == ["unusual_framing"] and decision_of(vouched) == "uncertain"
    unsure = findings(0.5, 5.0, gates, cut, pixel=0.6, lungs_vouch=True)  # the cut-off is checked too
    assert [f.code for f in unsure] == ["unusual_framing", "low_confidence"] and decision_of(unsure) == "uncertain"
    far = findings(0.99, 50.0, gates, cut, pixel=0.6, lungs_vouch=True)  # unfamiliar features still reject
    assert decision_of(far) == "rejected" and [f.code for f in far] == ["unfamiliar_features", "unusual_framing"]
    assert decision_of(findings(0.99, 5.0, gates, cut, colour=0.3, lungs_vouch=True)) == "rejected"


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


def test_clean_up_matches_scipy():
    """The two largest components (over MIN_LUNG_FRACTION / 4), holes filled as scipy fills them."""
    from scipy import ndimage

    from cxr_triage.core.lungs import MIN_LUNG_FRACTION, cleaned

    rng = np.random.default_rng(4)
    for _ in range(30):
        m = ndimage.binary_opening(rng.random((64, 80)) > 0.5)
        labels, _ = ndimage.label(m)
        sizes = np.bincount(labels.ravel())[1:]
        big = [i + 1 for i in np.argsort(sizes)[::-1][:2] if sizes[i] >= MIN_LUNG_FRACTION / 4 * m.size]
        c, fields = cleaned(m)  # the clean-up's own field count is the labelling of its result
        assert (c == ndimage.binary_fill_holes(np.isin(labels, big))).all() and fields == ndimage.label(c)[1]


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
