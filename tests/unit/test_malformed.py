"""Malformed inputs (issue 5): a corpus generated here, through `cxr-triage predict` and through the API.

Every valid image gets a prediction; every bad one an error row with a one-sentence reason (CLI, exit 3) or a
4xx with a JSON sentence (API), never a traceback or a 5xx, and a decompression bomb does not blow up memory.
"""

from __future__ import annotations

import csv
import io
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from cxr_triage.cli import app

BOMB_SIDE = 30_000

LOCAL = "http://127.0.0.1"  # the service answers loopback host names only (TrustedHostMiddleware)


@dataclass(frozen=True)
class Corpus:
    """The generated corpus: file name -> expected API status (None: cannot be uploaded, e.g. a folder)."""

    root: Path
    valid: dict[str, int]  # ordinary and unusual-but-valid images: all must be predicted
    bad: dict[str, int | None]  # must become error rows / 4xx
    extra_paths: list[str]  # paths predict must be given explicitly (not found by the folder scan)

    def path(self, name: str) -> Path:
        return self.root / name


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A small PNG whose IHDR claims side x side 8-bit grey pixels (the IDAT holds only the first rows)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (side + 1) * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def dicom_bytes(frames: np.ndarray | None) -> bytes:
    """A DX DICOM: no PixelData when ``frames`` is None; several frames when it is 3-D."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    if frames is not None:
        ds.NumberOfFrames = frames.shape[0]
        ds.Rows, ds.Columns = frames.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = frames.astype(np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def exif_rotated_jpeg(grey: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return _encode(Image.fromarray(grey), "JPEG", quality=92, exif=exif.tobytes())


def animated_gif(frames: list[np.ndarray]) -> bytes:
    ims = [Image.fromarray(f) for f in frames]
    return _encode(ims[0], "GIF", save_all=True, append_images=ims[1:], duration=100, loop=0)


def _valid_files(draw: Callable[[str], np.ndarray]) -> dict[str, bytes]:
    g = draw("covid")
    return {
        "valid-covid.png": _encode(Image.fromarray(g), "PNG"),
        "valid-normal.jpg": _encode(Image.fromarray(draw("normal")), "JPEG", quality=92),
        "valid-opacity.png": _encode(Image.fromarray(draw("lung_opacity")), "PNG"),
        "grey16.png": _encode(Image.fromarray(g.astype(np.uint16) * 257), "PNG"),
        "rgba.png": _encode(Image.fromarray(g).convert("RGBA"), "PNG"),
        "palette.png": _encode(Image.fromarray(g).convert("P"), "PNG"),
        "cmyk.jpg": _encode(Image.fromarray(g).convert("CMYK"), "JPEG", quality=92),
        "exif-rotated.jpg": exif_rotated_jpeg(draw("normal")),
    }


def _bad_files(draw: Callable[[str], np.ndarray]) -> dict[str, tuple[bytes, int]]:
    png = _encode(Image.fromarray(draw("covid")), "PNG")
    jpg = _encode(Image.fromarray(draw("normal")), "JPEG", quality=92)
    frames = np.stack([draw("normal") for _ in range(3)])
    return {
        "zero.png": (b"", 415),
        "truncated.png": (png[: len(png) // 2], 422),
        "truncated.jpg": (jpg[: len(jpg) // 2], 422),
        "text.png": (b"patient list exported 2020-05-01\nnot an image\n", 415),
        "one-pixel.png": (_encode(Image.new("L", (1, 1), 128), "PNG"), 422),
        "bomb.png": (bomb_png(), 422),
        "animated.gif": (animated_gif(list(frames)), 415),  # GIF is not an accepted upload type
        "no-pixels.dcm": (dicom_bytes(None), 422),
        "multiframe.dcm": (dicom_bytes(frames), 422),
    }


@pytest.fixture
def corpus(tmp_path: Path, class_image: Callable[..., np.ndarray]) -> Corpus:
    rng = np.random.default_rng(5)

    def draw(cid: str) -> np.ndarray:
        return class_image(cid, 96, 80, rng)

    root = tmp_path / "corpus"
    root.mkdir()
    valid = _valid_files(draw)
    for name, data in valid.items():
        (root / name).write_bytes(data)
    bad: dict[str, int | None] = {}
    for name, (data, status) in _bad_files(draw).items():
        (root / name).write_bytes(data)
        bad[name] = status
    (root / "dir.png").mkdir()
    (root / "dir.png" / "inner.txt").write_text("a folder named like an image\n")
    bad["dir.png"] = bad["missing.png"] = None
    extra = [str(root / "dir.png"), str(root / "missing.png"), str(root / "animated.gif")]
    if os.geteuid() != 0:  # root reads any file, so the permission case only exists for ordinary users
        (root / "no-read.png").write_bytes(valid["valid-covid.png"])
        (root / "no-read.png").chmod(0)
        bad["no-read.png"] = None
    return Corpus(root, {n: 200 for n in valid}, bad, extra)


def web_service() -> tuple[type, Callable]:
    """FastAPI's TestClient and ``create_app``, or a skip without the [serve] extra (the CLI tests run without it)."""
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (the [dev] extra)")
    from fastapi.testclient import TestClient

    from cxr_triage.serve.app import create_app

    return TestClient, create_app


def run_predict(bundle: Path, args: list[str]) -> tuple[int, str, list[dict[str, str]]]:
    res = CliRunner().invoke(app, ["predict", *args, "--model", str(bundle), "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(res.stdout))) if res.exit_code in (0, 3) else []
    return res.exit_code, res.output, rows


def test_predict_cli_over_malformed_corpus(tiny_bundle: Path, corpus: Corpus):
    code, output, rows = run_predict(tiny_bundle, [str(corpus.root), *corpus.extra_paths])
    assert code == 3, output
    assert "Traceback" not in output
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == set(corpus.valid) | set(corpus.bad)
    for name in corpus.valid:
        row = by_name[name]
        assert row["decision"] in ("accept", "uncertain", "rejected"), (name, row)
        assert bool(row["label"]) == (row["decision"] != "rejected"), (name, row)  # rejected: no label
        assert not row["error"]
    for name in corpus.bad:
        row = by_name[name]
        assert row["decision"] == "error" and not row["label"], (name, row)
        reason = row["error"]
        assert reason and "\n" not in reason and "Traceback" not in reason, (name, reason)
        assert len(reason) < 300, (name, reason)


def test_predict_cli_exit_codes(tiny_bundle: Path, corpus: Corpus):
    valid = [str(corpus.path(n)) for n in ("valid-covid.png", "valid-normal.jpg", "valid-opacity.png")]
    code, output, rows = run_predict(tiny_bundle, valid)
    assert code == 0, output
    assert len(rows) == 3 and all(r["decision"] != "error" for r in rows)
    res = CliRunner().invoke(app, ["predict", valid[0], "--model", str(tiny_bundle), "--format", "yaml"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["predict", "--model", str(tiny_bundle)])  # no paths at all
    assert res.exit_code == 2


def test_api_gives_4xx_for_malformed_uploads(tiny_bundle: Path, corpus: Corpus):
    TestClient, create_app = web_service()
    expected = {**corpus.valid, **{n: s for n, s in corpus.bad.items() if s is not None}}
    got: dict[str, int] = {}
    with TestClient(create_app(tiny_bundle), base_url=LOCAL, raise_server_exceptions=False) as client:
        for name in expected:
            files = {"file": (name, corpus.path(name).read_bytes(), "application/octet-stream")}
            resp = client.post("/api/v1/predict", files=files)
            got[name] = resp.status_code
            body = resp.json()
            if resp.status_code >= 400:
                assert isinstance(body.get("error"), str) and "Traceback" not in body["error"], (name, body)
            else:
                assert body["decision"] != "error" and (body["label"] or body["decision"] == "rejected"), (name, body)
    assert got == expected


MEMORY_PROBE = """
import resource, sys
from pathlib import Path
from cxr_triage.runtime.predictor import Predictor
from cxr_triage.runtime.predict import collect_inputs
engine = Predictor(Path(sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = list((s.prediction for s in engine.predict_files(collect_inputs(sys.argv[2:]))))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(rows), sum(r.decision == "error" for r in rows), (after - before) // 1024)
"""


def test_bomb_keeps_memory_bounded(tiny_bundle: Path, corpus: Corpus):
    """Peak RSS grows by < 500 MB over a folder holding a 30000x30000 bomb (fully decoded it would be 900 MB)."""
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tiny_bundle), str(corpus.root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    n_rows, n_errors, extra_mb = (int(v) for v in proc.stdout.split()[-3:])
    assert n_rows >= len(corpus.valid) and n_errors >= 1
    assert extra_mb < 500, f"peak RSS grew by {extra_mb} MB"
