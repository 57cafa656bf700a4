"""The one preprocessing function: decoding every mode, the square/resize rules, normalisation, errors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cxr_triage.core import limits
from cxr_triage.core.preprocess import ImageReadError, PreprocessSpec, load_grey, normalise, prepare


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def grey(class_image) -> np.ndarray:
    """A 72 x 96 (h x w) grey uint8 image with structure."""
    return class_image("covid", 72, 96, np.random.default_rng(1))


# ---------------------------------------------------------------- decoding every mode


def test_mode_L(grey):
    out = load_grey(encode(Image.fromarray(grey)))
    assert out.dtype == np.uint8 and out.shape == (72, 96)
    assert np.array_equal(out, grey)


def test_mode_16bit_is_scaled_to_full_range():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4001, (70, 90)).astype(np.uint16)
    a[0, 0], a[0, 1] = 100, 4000
    a[a < 100] = 100
    im = Image.fromarray(a)
    data = encode(im)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode.startswith("I")  # really a 16-bit PNG
    out = load_grey(data)
    assert out.dtype == np.uint8 and out.shape == (70, 90)
    expected = np.rint((a.astype(np.float64) - 100) * 255.0 / 3900).astype(np.uint8)
    assert np.array_equal(out, expected)
    assert (out.min(), out.max()) == (0, 255)


def test_mode_RGB_grey_content_is_kept(grey):
    rgb = Image.fromarray(np.stack([grey] * 3, axis=-1))
    assert rgb.mode == "RGB"
    assert np.array_equal(load_grey(encode(rgb)), grey)


def test_mode_RGB_colour_uses_luma():
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    out = load_grey(encode(Image.fromarray(arr)))
    assert out.shape == (64, 64)
    assert abs(int(out[0, 0]) - 76) <= 1 and abs(int(out[0, 63]) - 29) <= 1  # 0.299*255, 0.114*255


def test_mode_RGBA_is_composited_on_black(grey):
    alpha = np.zeros_like(grey)
    alpha[:, 32:64] = 128
    alpha[:, 64:] = 255
    rgba = Image.fromarray(np.dstack([grey, grey, grey, alpha]))
    assert rgba.mode == "RGBA"
    out = load_grey(encode(rgba))
    assert out.shape == grey.shape
    assert (out[:, :32] == 0).all()
    assert np.array_equal(out[:, 64:], grey[:, 64:])
    half = grey[:, 32:64].astype(int) * 128 / 255
    assert np.abs(out[:, 32:64] - half).max() <= 1


def test_mode_palette(grey):
    im = Image.frombytes("P", (96, 72), grey.tobytes())
    im.putpalette([v for i in range(256) for v in (255 - i, 255 - i, 255 - i)])  # an inverted grey palette
    data = encode(im)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "P"
    assert np.array_equal(load_grey(data), 255 - grey)


def test_mode_palette_with_transparency_composited_on_black(grey):
    im = Image.frombytes("P", (96, 72), np.full_like(grey, 7).tobytes())
    im.putpalette([200] * 768)
    im.info["transparency"] = 7
    assert (load_grey(encode(im, transparency=7)) == 0).all()


def test_mode_CMYK_jpeg():
    im = Image.new("CMYK", (80, 64), (0, 0, 0, 0))  # white
    im.paste((0, 0, 0, 255), (40, 0, 80, 64))  # black right half
    data = encode(im, "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "CMYK"
    out = load_grey(data)
    assert out.shape == (64, 80) and out.dtype == np.uint8
    assert out[:, :36].mean() > 250 and out[:, 44:].mean() < 5


def test_mode_1bit():
    bits = np.zeros((64, 72), bool)
    bits[10:40, 20:50] = True
    im = Image.fromarray(bits)
    assert im.mode == "1"
    out = load_grey(encode(im))
    assert out.shape == (64, 72) and out.dtype == np.uint8
    assert np.array_equal(out, bits.astype(np.uint8) * 255)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP"])
def test_other_formats(grey, fmt):
    kw = {"lossless": True} if fmt == "WEBP" else {}
    assert np.array_equal(load_grey(encode(Image.fromarray(grey), fmt, **kw)), grey)


def test_exif_orientation_is_applied():
    h, w = 64, 96
    arr = np.tile(np.linspace(0, 100, w).astype(np.uint8), (h, 1))
    arr[:20, :30] = 255  # a bright block in the top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())
    out = load_grey(data)
    assert out.shape == (w, h)
    cw, ccw = np.rot90(arr, k=-1), np.rot90(arr, k=1)
    err_cw = np.abs(out.astype(int) - cw).mean()
    assert err_cw < 3
    assert err_cw < np.abs(out.astype(int) - ccw).mean() / 10
    assert out[:30, -20:].mean() > 240  # the block is now at the top right


# ---------------------------------------------------------------- preprocess output and the spec


def test_preprocess_shape_dtype_and_values(grey):
    spec = PreprocessSpec(size=64, mean=0.4, std=0.2)
    x = normalise(prepare(grey, spec), spec)
    assert x.shape == (1, 64, 64) and x.dtype == np.float32
    u8 = prepare(grey, spec)
    assert u8.shape == (64, 64) and u8.dtype == np.uint8
    np.testing.assert_allclose(x[0], (u8 / 255.0 - 0.4) / 0.2, rtol=0, atol=1e-5)


def test_preprocess_of_a_square_input_at_size_is_exact():
    arr = np.random.default_rng(0).integers(0, 256, (48, 48), np.uint8)
    spec = PreprocessSpec(size=48, mean=0.5, std=0.25)
    np.testing.assert_allclose(normalise(prepare(arr, spec), spec)[0], (arr / 255.0 - 0.5) / 0.25, rtol=0, atol=1e-5)


def test_normalise_batches():
    batch = np.random.default_rng(0).integers(0, 256, (3, 40, 40), np.uint8)
    x = normalise(batch, PreprocessSpec(size=40))
    assert x.shape == (3, 1, 40, 40) and x.dtype == np.float32
    assert np.array_equal(x[1, 0], normalise(batch[1], PreprocessSpec(size=40))[0])


@pytest.fixture
def wide() -> np.ndarray:
    """64 x 128: left quarter 40, centre half 200, right quarter 120."""
    arr = np.full((64, 128), 200, np.uint8)
    arr[:, :32], arr[:, 96:] = 40, 120
    return arr


def test_resize_stretch_keeps_everything(wide):
    out = prepare(wide, PreprocessSpec(size=64, resize="stretch"))
    assert out.shape == (64, 64)
    assert (out[:, :14] == 40).all() and (out[:, 18:46] == 200).all() and (out[:, 50:] == 120).all()


@pytest.mark.parametrize("tall", [False, True])
def test_resize_pad_adds_black_bars(wide, tall):
    src = wide.T.copy() if tall else wide
    out = prepare(src, PreprocessSpec(size=64, resize="pad"))
    if tall:
        out = out.T
    assert out.shape == (64, 64)
    assert (out[:14] == 0).all() and (out[50:] == 0).all()  # bars where there was no image
    assert (out[18:46] >= 40).all()
    assert (out[18:46, :6] == 40).all() and (out[18:46, 58:] == 120).all()
    assert (out[18:46, 20:44] == 200).all()


def test_resize_crop_takes_the_centre(wide):
    assert (prepare(wide, PreprocessSpec(size=64, resize="crop")) == 200).all()
    assert (prepare(wide.T, PreprocessSpec(size=32, resize="crop")) == 200).all()


def test_square_input_is_the_same_for_all_rules(grey):
    sq = grey[:, :72]
    outs = [prepare(sq, PreprocessSpec(size=64, resize=r)) for r in ("stretch", "pad", "crop")]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_border_is_trimmed():
    arr = np.full((100, 100), 255, np.uint8)
    arr[10:90, 10:90] = 60
    assert (prepare(arr, PreprocessSpec(size=80, border=0.1)) == 60).all()
    assert prepare(arr, PreprocessSpec(size=80)).max() == 255


def test_equalize_spreads_the_histogram():
    rng = np.random.default_rng(0)
    arr = rng.integers(100, 121, (64, 64)).astype(np.uint8)
    plain = prepare(arr, PreprocessSpec(size=64))
    eq = prepare(arr, PreprocessSpec(size=64, equalize=True))
    assert np.array_equal(plain, arr)
    assert int(eq.max()) - int(eq.min()) >= 200
    assert eq.std() > 4 * arr.std()
    order = np.argsort(arr, axis=None, kind="stable")
    assert (np.diff(eq.ravel()[order].astype(int)) >= 0).all()  # brightness order is kept


def test_deterministic(tmp_path, grey):
    path = tmp_path / "a.jpg"
    Image.fromarray(grey).save(path, quality=90)
    spec = PreprocessSpec(size=64, resize="pad", border=0.05, equalize=True)
    again = PreprocessSpec.from_dict(spec.to_dict())
    a, b = normalise(prepare(path, spec), spec), normalise(prepare(path, again), again)
    assert np.array_equal(a, b)


def test_all_input_kinds_agree(tmp_path, grey):
    path = tmp_path / "img.png"
    Image.fromarray(grey).save(path)
    spec = PreprocessSpec(size=64, border=0.05, equalize=True)
    ref = normalise(prepare(path, spec), spec)
    with Image.open(path) as im:
        from_pil = normalise(prepare(im, spec), spec)
    for other in (
        normalise(prepare(str(path), spec), spec),
        normalise(prepare(path.read_bytes(), spec), spec),
        normalise(prepare(bytearray(path.read_bytes()), spec), spec),
        normalise(prepare(grey, spec), spec),
        from_pil,
    ):
        assert np.array_equal(ref, other)


def test_array_inputs():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 50)).astype(np.uint8)
    assert np.array_equal(load_grey(a[..., None]), a)
    assert np.array_equal(load_grey(np.stack([a] * 3, -1)), a)
    assert np.array_equal(load_grey(a.astype(np.float32) / 255.0), a)  # floats are min-max scaled...
    assert (load_grey(np.zeros((40, 50), np.float32)) == 0).all()  # ...and a flat image stays flat
    assert np.array_equal(load_grey(a > 127), (a > 127).astype(np.uint8) * 255)


def test_spec_round_trip():
    spec = PreprocessSpec(size=96, mean=0.45, std=0.3, resize="crop", border=0.05, equalize=True)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert PreprocessSpec.from_dict({}) == PreprocessSpec()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 8}, "size must be >= 32"),
        ({"channels": 3}, "channels: 1"),
        ({"resize": "foo"}, "resize must be 'stretch', 'pad' or 'crop'"),
        ({"border": 0.3}, "border must be in"),
        ({"border": -0.1}, "border must be in"),
        ({"std": 0.0}, "std must be positive"),
    ],
)
def test_bad_spec_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessSpec(**kwargs)
    with pytest.raises(ValueError, match=message):
        PreprocessSpec.from_dict(kwargs)


def test_unknown_spec_keys():
    with pytest.raises(ValueError, match="unknown preprocessing keys") as info:
        PreprocessSpec.from_dict({"size": 64, "sise": 64, "equalise": True})
    assert "'equalise'" in str(info.value) and "'sise'" in str(info.value)
    assert "equalize" in str(info.value)  # lists the known keys


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(ImageReadError, match="no such file") as info:
        load_grey(tmp_path / "nope.png")
    assert "nope.png" in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(ImageReadError, match="is a directory"):
        load_grey(tmp_path)


def test_empty_input(tmp_path):
    with pytest.raises(ImageReadError, match="empty"):
        load_grey(b"")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.jpg: file is empty"):
        load_grey(tmp_path / "empty.jpg")


def test_garbage_bytes():
    with pytest.raises(ImageReadError, match=r"x\.png: not a recognised image \(PNG, JPEG"):
        load_grey(b"this is not an image " * 20, name="x.png")


def test_truncated_png(grey):
    data = encode(Image.fromarray(grey))
    with pytest.raises(ImageReadError, match="corrupt or truncated"):
        load_grey(data[: len(data) // 2], name="half.png")


def test_too_small():
    with pytest.raises(ImageReadError, match="1x1 pixels; at least 32x32"):
        load_grey(encode(Image.new("L", (1, 1))))
    with pytest.raises(ImageReadError, match="40x20 pixels"):
        load_grey(np.zeros((20, 40), np.uint8))


def test_too_many_pixels(monkeypatch, grey):
    monkeypatch.setattr(limits, "MAX_PIXELS", 1000)
    with pytest.raises(ImageReadError, match="over the 1,000-pixel limit; downscale"):
        load_grey(encode(Image.fromarray(grey)))
    with pytest.raises(ImageReadError, match="pixel limit"):
        load_grey(Image.fromarray(grey))


def test_too_many_pixels_is_refused_before_decoding():
    """A header claiming 9000x8000 pixels (over the limit) with no pixel data behind it: refused by size."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 9000, 8000, 8, 0, 0, 0, 0)  # 8-bit grey
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (9000, 8000)  # a valid header...
        with pytest.raises(OSError):
            im.load()  # ...with no pixels behind it: decoding first would say "truncated"
    with pytest.raises(ImageReadError, match="9000x8000 pixels, over the 36,000,000-pixel limit") as info:
        load_grey(data)
    assert info.value.kind == "too_large"
    with pytest.raises(ImageReadError, match="9000x8000 pixels, over the 36,000,000-pixel limit"):
        load_grey(data)


def test_animated_gif():
    frames = [Image.new("L", (64, 64), v) for v in (0, 255)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageReadError, match="2 frames; give a single still image"):
        load_grey(data)


def test_bad_arrays():
    with pytest.raises(ImageReadError, match="2 channels"):
        load_grey(np.zeros((64, 64, 2), np.uint8))
    with pytest.raises(ImageReadError, match="2-D"):
        load_grey(np.zeros((2, 64, 64, 1), np.uint8))
    bad = np.zeros((64, 64), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ImageReadError, match="NaN"):
        load_grey(bad)


def test_image_read_error_is_a_value_error():
    assert issubclass(ImageReadError, ValueError)
