"""Chest X-ray DICOM instances for the DICOM node's tests and benchmarks: a shipped sample X-ray wrapped as CR, DX or
Secondary Capture, with made-up patient data (some of which a result may carry, most of which it must not)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "cxr_triage" / "assets" / "samples"
# identifiers a result must carry to be filed in the right study ...
FILED = {"PatientName": "Doe^Jane^Q", "PatientID": "PID-0047113", "AccessionNumber": "ACC-9931"}
# ... and the rest of the header, which no result may copy
PRIVATE = {
    "PatientBirthDate": "19510317",
    "PatientSex": "F",
    "PatientAddress": "12 Elm Street, Springfield",
    "OtherPatientIDs": "OPID-5512",
    "InstitutionName": "St Elsewhere Hospital",
    "ReferringPhysicianName": "House^Gregory",
    "StudyDescription": "CHEST PA ER-BAY-7",
    "StudyID": "STID-0777",
    "StudyDate": "20240229",
    "OperatorsName": "Tech^Tina",
}
PRIVATE_STRINGS = ["19510317", "Elm Street", "OPID-5512", "Elsewhere", "House", "ER-BAY-7", "STID-0777", "20240229"]
FILED_STRINGS = ["Doe", "Jane", "PID-0047113", "ACC-9931"]
MODALITY = {"1.2.840.10008.5.1.4.1.1.1": "CR", "1.2.840.10008.5.1.4.1.1.7": "OT"}


def sample_pixels(name: str = "COVID-1803.jpg") -> np.ndarray:
    """A shipped sample X-ray as uint8 grey pixels."""
    with Image.open(SAMPLES / name) as im:
        return np.asarray(im.convert("L"))


def chest_dicom(
    name: str = "COVID-1803.jpg",
    sop_class: str = DigitalXRayImageStorageForPresentation,
    study_uid: str | None = None,
    truncate_pixels: bool = False,
    **extra: Any,
) -> bytes:
    """A Part-10 file (Explicit VR Little Endian) of a sample X-ray with made-up patient data.

    ``truncate_pixels`` keeps a valid header (a PACS stores it) but cuts the pixel data to a tenth: undecodable.
    """
    pixels = sample_pixels(name)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = MODALITY.get(sop_class, "DX")
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.PatientOrientation = ["L", "F"]
    for key, value in {**FILED, **PRIVATE}.items():
        setattr(ds, key, value)
    if ds.Modality == "OT":
        ds.ConversionType = "WSD"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    data = pixels.tobytes()
    ds.PixelData = data[: len(data) // 10] if truncate_pixels else data
    for key, value in extra.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def sr_items(sr: Dataset) -> dict[str, Dataset]:
    """The SR's top-level content items by concept code value (read with pydicom alone)."""
    return {item.ConceptNameCodeSequence[0].CodeValue: item for item in sr.ContentSequence}


def sr_summary(sr: Dataset) -> dict[str, Any]:
    """What a reader gets out of the SR: label, decision, probabilities, model, notice, referenced source."""
    items = sr_items(sr)
    text = {k: str(v.TextValue) for k, v in items.items() if v.ValueType == "TEXT"}
    return {
        "label": items["121071"].ConceptCodeSequence[0].CodeValue if "121071" in items else "",
        "decision": items["DECISION"].ConceptCodeSequence[0].CodeValue,
        "probabilities": {
            k: float(v.MeasuredValueSequence[0].NumericValue) for k, v in items.items() if v.ValueType == "NUM"
        },
        "advice": text.get("ADVICE", ""),
        "error": text.get("ERROR", ""),
        "model_name": text.get("111001", ""),
        "model_version": text.get("111003", ""),
        "model_sha256": text.get("MODELSHA256", ""),
        "notice": text.get("NOTICE", ""),
        "source": str(items["260753009"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
    }


def write_large_dicom(path: Path, pixel_bytes: int, deflated: bool = False, rgb: bool = False) -> Path:
    """A DX Part-10 file whose pixel data is ``pixel_bytes`` zero bytes (16-bit grey, 4096 columns; ``rgb``: 8-bit
    RGB, 6000 columns), written 1 MB at a time (never whole in memory). ``deflated``: in Deflated Explicit VR Little
    Endian, a deflate bomb (a 64 MB data set is about 64 KB)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "DX"
    if rgb:
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = pixel_bytes // 18000, 6000, 3, "RGB"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PlanarConfiguration = 0
    else:
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = (
            pixel_bytes // 8192,
            4096,
            1,
            "MONOCHROME2",
        )
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    head = DicomBytesIO()
    head.is_implicit_VR, head.is_little_endian = False, True  # Explicit VR Little Endian (deflated: then compressed)
    write_dataset(head, ds)
    element = b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_bytes)
    pack = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS) if deflated else None
    zeros = bytes(1 << 20)
    with path.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta, enforce_standard=True)
        f.write(pack.compress(head.getvalue() + element) if pack else head.getvalue() + element)
        for start in range(0, pixel_bytes, len(zeros)):
            piece = zeros if pixel_bytes - start >= len(zeros) else zeros[: pixel_bytes - start]
            f.write(pack.compress(piece) if pack else piece)
        if pack:
            f.write(pack.flush())
    return path


def sr_bytes(uid: str = "1.2.3.4") -> bytes:
    """A small Part-10 file standing in for a result."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = pydicom.uid.ComprehensiveSRStorage, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.9", "SR"
    ds.PatientName = "Doe^Jane"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
