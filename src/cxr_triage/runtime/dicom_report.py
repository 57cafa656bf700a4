"""DICOM results for one prediction: a Comprehensive SR and a Secondary Capture of the heatmap (highdicom).

Both go into the source image's study, each in a new series, and reference the source image. Only the identifiers
that file them in the right study are copied from the source (``FILED_FROM_SOURCE``); every other patient or study
attribute DICOM requires is present and empty. ``content_from_row`` is the one place that maps a prediction to
the report's content.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid

from cxr_triage import __version__
from cxr_triage.core.classes import CLASS_IDS, DISPLAY_NAMES

MANUFACTURER = "cxr-triage"
RESEARCH_ONLY = (
    "Research use only: decision support for research and education; not a medical device, not for diagnosis."
)
CAPTION = "NOT FOR DIAGNOSIS - research use only"
SCHEME = "99CXRT"  # a private coding scheme (the "99" prefix marks it as local, per DICOM PS3.16)
FILED_FROM_SOURCE = ("SpecificCharacterSet", "PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber")
SOURCE_REFERENCE = ("SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
EMPTY_TYPE2 = ("PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
DECISION_MEANINGS = {
    "accept": "Accepted",
    "uncertain": "Uncertain: a radiologist should read this image",
    "rejected": "Rejected: does not look like a chest X-ray",
    "error": "Error: the image could not be processed",
}
PROBABILITY_CODES = {
    "covid": "PCOVID",
    "lung_opacity": "PLUNGOPACITY",
    "normal": "PNORMAL",
    "viral_pneumonia": "PVIRAL",
}


class ReportError(ValueError):
    """The source instance lacks what a result needs to be filed (a study and instance UID)."""


def concept(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, SCHEME, meaning)


REPORT_TITLE = concept("TRIAGE", "Chest X-ray AI triage result")
DECISION = concept("DECISION", "Triage decision")
ADVICE = concept("ADVICE", "Advice")
ERROR = concept("ERROR", "Processing error")
MODEL_SHA256 = concept("MODELSHA256", "Model bundle sha256")
NOTICE = concept("NOTICE", "Notice")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")


@dataclass(frozen=True)
class ReportContent:
    """What an SR says: the prediction and the model that made it."""

    decision: str
    label: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)
    advice: str = ""
    error: str = ""
    model_name: str = ""
    model_version: str = ""
    model_sha256: str = ""


def content_from_row(row: dict[str, Any], model: dict[str, str]) -> ReportContent:
    """Map a predict row (label, p_<class>, decision, advice, error) and ``Engine.info`` to the report's content."""
    probs = {c: float(row[f"p_{c}"]) for c in CLASS_IDS if row.get(f"p_{c}") not in (None, "")}
    return ReportContent(
        decision=str(row["decision"]),
        label=str(row.get("label") or ""),
        probabilities=probs,
        advice=str(row.get("advice") or ""),
        error=str(row.get("error") or ""),
        model_name=model.get("name", ""),
        model_version=model.get("version", ""),
        model_sha256=model.get("sha256", ""),
    )


def filing_dataset(source: Dataset) -> Dataset:
    """The source's identifiers needed to file a result in its study, plus its own references; nothing else."""
    missing = [k for k in ("StudyInstanceUID", *SOURCE_REFERENCE) if not source.get(k)]
    if missing:
        raise ReportError(f"the instance lacks {', '.join(missing)}; a result cannot be filed without them")
    out = Dataset()
    for keyword in (*FILED_FROM_SOURCE, *SOURCE_REFERENCE):
        if keyword in source:
            setattr(out, keyword, source[keyword].value)
    for keyword in ("PatientName", "PatientID", "AccessionNumber", *EMPTY_TYPE2):
        if keyword not in out:
            setattr(out, keyword, "")
    return out


def derived_uid(source: Dataset, *parts: str) -> UID:
    """A UID derived from the source instance (and ``parts``): re-sending an image re-creates the same result."""
    return generate_uid(entropy_srcs=[str(source.SOPInstanceUID), *parts])


def sr_content(content: ReportContent, source: Dataset) -> hd.sr.ContainerContentItem:
    """The SR content tree: the finding, probabilities, decision, advice, model and the source image."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items: list[hd.sr.ContentItem] = []
    if content.label:
        label = concept(content.label, DISPLAY_NAMES.get(content.label, content.label))
        items.append(hd.sr.CodeContentItem(codes.DCM.Finding, label, contains))
    for cid, p in content.probabilities.items():
        name = concept(PROBABILITY_CODES[cid], f"Probability of {DISPLAY_NAMES[cid]}")
        items.append(hd.sr.NumContentItem(name, round(p, 6), NO_UNITS, relationship_type=contains))
    decision = concept(content.decision, DECISION_MEANINGS.get(content.decision, content.decision))
    items.append(hd.sr.CodeContentItem(DECISION, decision, contains))
    for name, text in ((ADVICE, content.advice), (ERROR, content.error)):
        if text:
            items.append(hd.sr.TextContentItem(name, text, contains))
    for name, text in (
        (codes.DCM.AlgorithmName, content.model_name or MANUFACTURER),
        (codes.DCM.AlgorithmVersion, content.model_version or __version__),
        (MODEL_SHA256, content.model_sha256 or "unknown"),
        (NOTICE, RESEARCH_ONLY),
    ):
        items.append(hd.sr.TextContentItem(name, text, contains))
    items.append(
        hd.sr.ImageContentItem(codes.SCT.Source, source.SOPClassUID, source.SOPInstanceUID, relationship_type=contains)
    )
    root = hd.sr.ContainerContentItem(REPORT_TITLE, template_id=None)
    root.ContentSequence = hd.sr.ContentSequence(items)
    return root


def _unnamed(filing: Dataset) -> Dataset:
    """``filing`` without the patient's name: highdicom's name check would write an odd name into a warning."""
    out = copy.deepcopy(filing)
    out.PatientName = ""
    return out


def _file_under(result: Dataset, filing: Dataset) -> None:
    """Put the source's filing identifiers (``FILED_FROM_SOURCE``) on a built result, as received."""
    for keyword in FILED_FROM_SOURCE:
        if keyword in filing:
            setattr(result, keyword, filing[keyword].value)


def build_sr(source: Dataset, content: ReportContent, instance_number: int = 1) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR in the source's study (new series) that references the source image."""
    filing = filing_dataset(source)
    sr = hd.sr.ComprehensiveSR(
        evidence=[_unnamed(filing)],
        content=sr_content(content, filing),
        series_instance_uid=generate_uid(entropy_srcs=[str(filing.StudyInstanceUID), "cxr-triage-sr"]),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(filing, "sr", content.model_sha256),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="cxr-triage result (research use only)",
    )
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "cxr-triage local codes"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    _file_under(sr, filing)
    return sr


def burn_caption(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """The image with a black band below it holding ``lines`` in white (burned into the pixels, sized to fit)."""
    h, w = rgb.shape[:2]
    size = max(10, min(w // 24, 24))
    while size > 8 and max(ImageFont.load_default(size=size).getlength(t) for t in lines) > w - size:
        size -= 1
    font = ImageFont.load_default(size=size)
    step = size + size // 2
    canvas = Image.new("RGB", (w, h + step * len(lines) + size // 2), (0, 0, 0))
    canvas.paste(Image.fromarray(np.ascontiguousarray(rgb[..., :3])), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((size // 2, h + size // 2 + i * step), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def caption_lines(content: ReportContent) -> list[str]:
    """The burned-in caption: the notice, then the result in a few words."""
    if content.label and content.decision in ("accept", "uncertain"):
        p = content.probabilities.get(content.label, 0.0)
        result = f"{DISPLAY_NAMES.get(content.label, content.label)} {p:.0%} ({content.decision})"
    else:
        result = DECISION_MEANINGS.get(content.decision, content.decision)
    return [CAPTION, f"cxr-triage {content.model_version}: {result}"]


def build_sc(source: Dataset, rgb: np.ndarray, content: ReportContent, instance_number: int = 1) -> hd.sc.SCImage:
    """A Secondary Capture (RGB) of ``rgb`` with the caption burned in, in the source's study, new series."""
    filing = filing_dataset(source)
    pixels = burn_caption(rgb, caption_lines(content))
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=filing.StudyInstanceUID,
        series_instance_uid=generate_uid(entropy_srcs=[str(filing.StudyInstanceUID), "cxr-triage-sc"]),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derived_uid(filing, "sc", content.model_sha256),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
        series_description="cxr-triage heatmap (not for diagnosis)",
    )
    _file_under(sc, filing)
    sc.BodyPartExamined = "CHEST"  # not a paired structure, so no Laterality
    sc.PatientOrientation = ""  # unknown here (Type 2): the overlay is drawn in the source's pixel orientation
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = filing.SOPClassUID, filing.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    sc.DerivationDescription = "class activation map of the cxr-triage model over the source image"
    sc.BurnedInAnnotation = "NO"  # the caption names no patient
    sc.ImageComments = RESEARCH_ONLY
    return sc
