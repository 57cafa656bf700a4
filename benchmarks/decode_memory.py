"""Peak memory of decoding the largest image each reader accepts (issue 13): what the pixel limits cost.

Usage: python benchmarks/decode_memory.py [--side 6000]

Each case: one process writes the image to a temporary file (a smooth gradient, so PNGs stay small); a fresh process
imports the decoder, notes ru_maxrss, decodes the file with `load_grey` and notes ru_maxrss again. Cases: 16-bit grey
PNG, RGBA PNG, float32 TIFF, 16-bit MONOCHROME1 DICOM with rescale and window (subsampled before the LUTs above
limits.DICOM_LUT_PIXELS), and a JPEG twice the side (4x the pixel limit: decoded at half scale). Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = ("png16", "rgba", "tiff_float", "dicom16", "jpeg_2x")

PROBE = r"""
import io, json, resource, sys, time
import numpy as np
from PIL import Image

kind, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]


def grad(dtype, top):
    y = np.linspace(0, top, n, dtype=np.float32)
    return (y[:, None] * 0.5 + y[None, :] * 0.5).astype(dtype)


def save(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


if kind == "png16":
    data = save(grad(np.uint16, 65535), "PNG")
elif kind == "rgba":
    g = grad(np.uint8, 255)
    data = save(np.dstack([g, g, g, g]), "PNG")
elif kind == "tiff_float":
    data = save(grad(np.float32, 1.0), "TIFF")
elif kind == "jpeg_2x":
    n *= 2
    data = save(grad(np.uint8, 255), "JPEG")
else:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows = ds.Columns = n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1.5, -100, 2000, 3000
    ds.PixelData = grad(np.uint16, 4095).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
open(path, "wb").write(data)
"""

DECODE = r"""
import json, resource, sys, time
from cxr_triage.core.decode import load_grey

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
grey = load_grey(sys.argv[1])
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"out": list(grey.shape), "before_mb": before, "peak_mb": peak, "wall_s": wall}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=6000)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    print("| image | file | decoded to | RSS before decoding | peak RSS | decode time |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in CASES:
            path = Path(tmp) / kind
            subprocess.run([sys.executable, "-c", PROBE, kind, str(args.side), str(path)], env=env, check=True)
            out = subprocess.run([sys.executable, "-c", DECODE, str(path)], env=env, capture_output=True, text=True)
            if out.returncode:
                print(f"| {kind} | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            side = args.side * (2 if kind == "jpeg_2x" else 1)
            print(
                f"| {kind} {side}x{side} | {path.stat().st_size / 2**20:.1f} MB | {r['out'][1]}x{r['out'][0]} | "
                f"{r['before_mb']:.0f} MB | {r['peak_mb']:.0f} MB | {r['wall_s']:.1f} s |"
            )


if __name__ == "__main__":
    main()
