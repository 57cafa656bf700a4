"""DICOM results for one prediction: a Comprehensive SR and a Secondary Capture of the heatmap (highdicom).

Both go into the source image's study, each in a new series, and reference the source image. Only the identifiers
that file them in the right study are copied from the source (``FILED_FROM_SOURCE``), cut to their VR's maximum
length; every other patient or study attribute DICOM requires is present and empty. The picture shows the source's
pixels, so it says ``BurnedInAnnotation = YES`` unless the source says NO. ``content_of`` is the one place that
maps a ``Prediction`` to the report's content.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import MAX_VALUE_LEN

from cxr_triage._version import __version__
from cxr_triage.core.classes import CLASS_IDS, DISPLAY_NAMES
from cxr_triage.runtime.prediction import Prediction

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
PN_MAX = 64  # characters in a person name's component group (PS3.5 6.2); dciodvfy applies it to the whole value
UID_MAX = MAX_VALUE_LEN["UI"]
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


def content_of(pred: Prediction) -> ReportContent:
    """Map a prediction (label, probabilities, decision, advice, error, and the model that made it) to the report's
    content."""
    probs = {c: p for c in CLASS_IDS if (p := getattr(pred, f"p_{c}")) is not None}
    return ReportContent(
        decision=pred.decision,
        label=pred.label or "",
        probabilities=probs,
        advice=pred.advice,
        error=pred.error or "",
        model_name=pred.model.name,
        model_version=pred.model.version,
        model_sha256=pred.model.sha256,
    )


def clipped(elem: DataElement) -> Any:
    """A text value cut to its VR's maximum length (each value of a multi-valued one). A person name keeps only its
    first (alphabetic) component group, cut to 64 characters, so the whole value fits where validators such as
    dciodvfy measure it. Codes (CS) and UIDs (UI) are returned as they are: cutting them would change what they
    name."""
    if elem.VR == "PN":
        return "" if elem.value is None else str(elem.value).split("=")[0][:PN_MAX]
    limit = MAX_VALUE_LEN.get(elem.VR)
    if limit is None or elem.VR in ("CS", "UI") or elem.value is None:
        return elem.value
    if isinstance(elem.value, MultiValue):
        return [v[:limit] if isinstance(v, str) else v for v in elem.value]
    return elem.value[:limit] if isinstance(elem.value, str) else elem.value


def burned_in_annotation(source: Dataset) -> str:
    """YES unless the source says NO: a picture of the source's pixels shows whatever text is burned into them."""
    return "NO" if str(source.get("BurnedInAnnotation", "")).strip() == "NO" else "YES"


def filing_dataset(source: Dataset) -> Dataset:
    """The source's identifiers needed to file a result in its study (cut to their VR's length), plus its own
    references; nothing else."""
    missing = [k for k in ("StudyInstanceUID", *SOURCE_REFERENCE) if not source.get(k)]
    if missing:
        raise ReportError(f"the instance lacks {', '.join(missing)}; a result cannot be filed without them")
    too_long = [k for k in ("StudyInstanceUID", *SOURCE_REFERENCE) if len(str(source[k].value)) > UID_MAX]
    if too_long:  # cutting a UID would file the result under another study or image
        raise ReportError(f"the instance's {', '.join(too_long)} is longer than a UID may be ({UID_MAX} characters)")
    out = Dataset()
    for keyword in (*FILED_FROM_SOURCE, *SOURCE_REFERENCE):
        if keyword in source:
            setattr(out, keyword, clipped(source[keyword]))
    for keyword in ("PatientName", "PatientID", "AccessionNumber", *EMPTY_TYPE2):
        if keyword not in out:
            setattr(out, keyword, "")
    return out


def derived_uid(source: Dataset, *parts: str) -> UID:
    """A UID derived from the source instance (its study, series and SOP Instance UID) and ``parts``: re-sending
    an image re-creates the same result; another image under the same SOP Instance UID does not."""
    uids = [str(source.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    return generate_uid(entropy_srcs=[*uids, *parts])


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


def build_sr(source: Dataset, content: ReportContent, instance_number: int = 1, key: str = "") -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR in the source's study (new series) that references the source image; ``key`` (the
    source's content) goes into its UID."""
    filing = filing_dataset(source)
    sr = hd.sr.ComprehensiveSR(
        evidence=[_unnamed(filing)],
        content=sr_content(content, filing),
        series_instance_uid=generate_uid(entropy_srcs=[str(filing.StudyInstanceUID), "cxr-triage-sr"]),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(filing, "sr", content.model_sha256, key),
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


def build_sc(
    source: Dataset, rgb: np.ndarray, content: ReportContent, instance_number: int = 1, key: str = ""
) -> hd.sc.SCImage:
    """A Secondary Capture (RGB) of ``rgb`` with the caption burned in, in the source's study, new series; ``key``
    as for ``build_sr``."""
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
        sop_instance_uid=derived_uid(filing, "sc", content.model_sha256, key),
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
    sc.BurnedInAnnotation = burned_in_annotation(source)  # the caption names no patient; the source's pixels may
    sc.ImageComments = RESEARCH_ONLY
    return sc
