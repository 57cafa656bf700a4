"""The one input geometry (``core.geometry.SquareMap``): where a spec's square comes from in an image, the square
made from it (``apply``), square-sized arrays put back onto the image (``invert``), one spec's square inside another's
(``crop_of``), and the call sites that use it (``square``, ``input_mask``, ``heat_field``, the segmenter's masks)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image, ImageOps

from cxr_triage.core.geometry import PreprocessSpec, SquareMap, resize_mask, square
from cxr_triage.core.lungs import input_mask
from cxr_triage.core.preprocess import model_square
from cxr_triage.runtime.predict import heat_field
from cxr_triage.runtime.segment import LungSegmenter

SHAPES = [(100, 60), (60, 100), (97, 131), (131, 97), (64, 64), (300, 37)]
RULES = ["stretch", "pad", "crop"]
BORDERS = [0.0, 0.06, 0.2]


def cases() -> list[tuple[PreprocessSpec, tuple[int, int]]]:
    specs = [PreprocessSpec(size=48, resize=r, border=b) for r, b in itertools.product(RULES, BORDERS)]
    return list(itertools.product(specs, SHAPES))


def shown(geo: SquareMap) -> np.ndarray:
    """Bool (h, w): the image pixels the square shows (trimmed and inside the window)."""
    (ty0, ty1, tx0, tx1), (wy0, wy1, wx0, wx1) = geo.trim, geo.window
    out = np.zeros(geo.shape, bool)
    out[max(ty0, wy0) : min(ty1, wy1), max(tx0, wx0) : min(tx1, wx1)] = True
    return out


def segmenter(spec: PreprocessSpec) -> LungSegmenter:
    """A segmenter object with only its spec: enough for its geometry (no session)."""
    seg = object.__new__(LungSegmenter)
    seg.spec = spec
    return seg


@pytest.mark.parametrize(("shape", "rule", "window"), [
    ((100, 60), "crop", (20, 80, 0, 60)),  # portrait: the centre square
    ((60, 100), "crop", (0, 60, 20, 80)),  # landscape
    ((101, 60), "crop", (20, 80, 0, 60)),  # an odd difference: the extra row goes below
    ((100, 60), "pad", (0, 100, -20, 80)),  # portrait: bars left and right
    ((60, 100), "pad", (-20, 80, 0, 100)),  # landscape: bars above and below
    ((60, 101), "pad", (-20, 81, 0, 101)),  # an odd difference: 20 rows of bar above, 21 below
    ((100, 60), "stretch", (0, 100, 0, 60)),
])  # fmt: skip
def test_window_placement(shape, rule, window):
    assert SquareMap(PreprocessSpec(size=64, resize=rule), shape).window == window


def test_trim_and_window_with_a_border():
    geo = SquareMap(PreprocessSpec(size=64, resize="crop", border=0.1), (200, 100))
    assert geo.trim == (20, 180, 10, 90)  # 160 x 80 kept
    assert geo.window == (60, 140, 10, 90)  # its centre 80 x 80
    pad = SquareMap(PreprocessSpec(size=64, resize="pad", border=0.1), (200, 100))
    assert pad.window == (20, 180, -30, 130)  # 160 x 160 around the kept part


@pytest.mark.parametrize("shape", [(100, 60), (60, 100)])
def test_apply_pad_puts_the_image_between_black_bars(shape):
    geo = SquareMap(PreprocessSpec(size=100, resize="pad"), shape)  # size = the padded side: no resampling
    out = geo.apply(np.full(shape, 200, np.uint8))
    expected = np.zeros((100, 100), np.uint8)
    if shape[0] > shape[1]:
        expected[:, 20:80] = 200
    else:
        expected[20:80, :] = 200
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("shape", [(100, 60), (60, 100)])
def test_apply_crop_takes_the_centre_square(shape):
    geo = SquareMap(PreprocessSpec(size=60, resize="crop"), shape)  # size = the short side: no resampling
    img = np.arange(shape[0] * shape[1]).reshape(shape).astype(np.uint8)
    expected = img[20:80, :] if shape[0] > shape[1] else img[:, 20:80]
    np.testing.assert_array_equal(geo.apply(img), expected)


@pytest.mark.parametrize(("spec", "shape"), cases())
def test_constant_field_round_trips(spec, shape):
    geo = SquareMap(spec, shape)
    field = geo.invert(np.full((7, 7), 0.625, np.float32), outside="edge")
    assert field.shape == shape and field.dtype == np.float32
    np.testing.assert_allclose(field, 0.625, atol=1e-6)  # everywhere: the border and cut sides are edge-extended
    if spec.resize != "pad":  # a pad square has black bars, so only stretch and crop squares are constant
        sq = geo.apply(np.full(shape, 173, np.uint8))
        np.testing.assert_array_equal(sq, 173)
        np.testing.assert_allclose(geo.invert(sq.astype(np.float32), outside="edge"), 173, atol=1e-4)
        back = geo.invert(geo.apply(np.ones(shape, bool)))
        np.testing.assert_array_equal(back, shown(geo))  # the mask comes back exactly where the square looked


def test_trimmed_border_is_edge_for_heatmaps_and_zero_for_masks():
    geo = SquareMap(PreprocessSpec(size=64, border=0.1), (100, 80))
    y0, y1, x0, x1 = geo.trim
    assert (y0, y1, x0, x1) == (10, 90, 8, 72)
    ramp = np.add.outer(np.arange(8), 10 * np.arange(8)).astype(np.float32)  # every value different
    heat = geo.invert(ramp, outside="edge")
    np.testing.assert_array_equal(heat[:y0], np.broadcast_to(heat[y0], (y0, 80)))  # top rows repeat the first row
    np.testing.assert_array_equal(heat[y1:], np.broadcast_to(heat[y1 - 1], (100 - y1, 80)))
    np.testing.assert_array_equal(heat[:, :x0], np.broadcast_to(heat[:, [x0]], (100, x0)))
    np.testing.assert_array_equal(heat[:, x1:], np.broadcast_to(heat[:, [x1 - 1]], (100, 80 - x1)))
    assert heat[y0, x0] < heat[y1 - 1, x1 - 1]  # the map itself is placed, not a constant
    mask = geo.invert(np.ones((64, 64), bool))
    assert mask.dtype == bool and mask[y0:y1, x0:x1].all()
    assert np.count_nonzero(mask) == (y1 - y0) * (x1 - x0)  # nothing in the trimmed border


@pytest.mark.parametrize("shape", [(100, 60), (60, 100)])
def test_invert_crop_and_pad_place_the_square(shape):
    portrait = shape[0] > shape[1]
    crop = SquareMap(PreprocessSpec(size=32, resize="crop"), shape).invert(np.ones((32, 32), bool))
    expected = np.zeros(shape, bool)
    expected[(slice(20, 80), slice(None)) if portrait else (slice(None), slice(20, 80))] = True
    np.testing.assert_array_equal(crop, expected)  # the cut-away sides hold no mask
    pad = SquareMap(PreprocessSpec(size=100, resize="pad"), shape)
    small = np.zeros((100, 100), bool)
    small[:50] = True  # the square's upper half
    upper = np.arange(shape[0])[:, None] < 50 - (0 if portrait else 20)  # landscape: 20 rows of bar above
    np.testing.assert_array_equal(pad.invert(small), np.broadcast_to(upper, shape))
    heat = pad.invert(np.where(small, 1.0, 0.0).astype(np.float32), outside="edge")
    assert heat.shape == shape and heat[0].min() == 1 and heat[-1].max() == 0  # the bars are dropped, not squeezed


def test_crop_of_maps_a_trimmed_stretch_into_an_untrimmed_one():
    seg = SquareMap(PreprocessSpec(size=128), (100, 200))
    cls = SquareMap(PreprocessSpec(size=64, border=0.1), (100, 200))
    assert cls.trim == (10, 90, 20, 180)
    assert seg.crop_of(cls, (128, 128)) == (13, 115, 13, 115)
    assert seg.crop_of(SquareMap(PreprocessSpec(size=64), (100, 200)), (128, 128)) == (0, 128, 0, 128)
    for a, b in [({"resize": "pad"}, {}), ({}, {"resize": "crop"}), ({"border": 0.05}, {})]:
        geo_a, geo_b = SquareMap(PreprocessSpec(**a), (100, 200)), SquareMap(PreprocessSpec(**b), (100, 200))
        assert geo_a.crop_of(geo_b, (128, 128)) is None


def test_crop_of_region_resized_is_the_other_square():
    rng = np.random.default_rng(0)
    shape = (150, 110)
    low = np.asarray(Image.fromarray(rng.random((5, 5)).astype(np.float32)).resize(shape[::-1]))
    mask = low > 0.5
    seg, cls = SquareMap(PreprocessSpec(size=128), shape), SquareMap(PreprocessSpec(size=96, border=0.06), shape)
    y0, y1, x0, x1 = seg.crop_of(cls, (128, 128))
    via_box = resize_mask(seg.apply(mask)[y0:y1, x0:x1], (96, 96))
    assert np.mean(via_box == cls.apply(mask)) > 0.98  # the same mask within a pixel of the grids


@pytest.mark.parametrize(("spec", "shape"), cases())
def test_call_sites_use_the_transform(spec, shape):
    rng = np.random.default_rng(sum(shape))
    geo = SquareMap(spec, shape)
    grey = rng.integers(0, 256, shape, dtype=np.uint8)
    mask = rng.random(shape) > 0.5
    small = rng.random((spec.size, spec.size)) > 0.5
    cam = rng.random((5, 5)).astype(np.float32) * 1.4 - 0.2
    np.testing.assert_array_equal(square(grey, spec), geo.apply(grey))
    eq = PreprocessSpec(**{**spec.to_dict(), "equalize": True})
    np.testing.assert_array_equal(square(grey, eq), np.asarray(ImageOps.equalize(Image.fromarray(geo.apply(grey)))))
    np.testing.assert_array_equal(model_square(grey, spec), geo.apply(grey))
    np.testing.assert_array_equal(input_mask(mask, spec), geo.apply(mask))
    np.testing.assert_array_equal(heat_field(*shape, cam, spec), geo.invert(cam, outside="edge").clip(0, 1))
    np.testing.assert_array_equal(segmenter(spec).to_image(small, shape), geo.invert(small))
    cls = SquareMap(PreprocessSpec(size=64, border=0.03), shape)
    assert segmenter(spec)._input_box((spec.size, spec.size), shape, cls.spec) == geo.crop_of(cls, (spec.size,) * 2)


def test_input_box_is_none_for_lung_views():
    seg = segmenter(PreprocessSpec(size=128))
    assert seg._input_box((128, 128), (100, 80), PreprocessSpec(size=64)) == (0, 128, 0, 128)
    assert seg._input_box((128, 128), (100, 80), PreprocessSpec(size=64, lungs="crop")) is None
