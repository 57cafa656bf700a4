"""Why an answer is uncertain or rejected: the gates and the abstention cut-off as findings with their numbers.

``judge`` is the decision rule, the one place a decision is made (the predictor calls it once per image): the
findings (``findings``, ``lung_gate_findings``) and the decision they make (``decision_of``), so the reasons a
prediction gives are always the ones that decided it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cxr_triage.core.lungs import LungStats
from cxr_triage.runtime.bundle import BundleMeta, Gates, LungGate

# (finding code, key in model.json's "ood" block): unfamiliar network features (Mahalanobis distance),
# an unfamiliar image layout (pixel-PCA residual), colour (radiographs are grey)
GATES: tuple[tuple[str, str], ...] = (
    ("unfamiliar_features", "threshold"),
    ("unfamiliar_layout", "pixel_threshold"),
    ("colour", "colour_threshold"),
)
LOW_CONFIDENCE = "low_confidence"
UNUSUAL_FRAMING = "unusual_framing"  # the pixel-layout gate failed, but the lungs vouch for a chest X-ray
# findings that make an answer uncertain, not rejected
UNCERTAIN_CODES = (LOW_CONFIDENCE, "one_lung", "lung_area", UNUSUAL_FRAMING)


@dataclass(frozen=True)
class Finding:
    """One reason an answer was not accepted: ``value`` crossed ``limit``."""

    code: str
    value: float
    limit: float


def judge(
    meta: BundleMeta,
    confidence: float,
    ood: float,
    pixel: float = 0.0,
    colour: float = 0.0,
    lungs: LungStats | None = None,
) -> tuple[str, list[Finding]]:
    """The decision and the findings that made it, with a bundle's thresholds: 'error' (and no findings) when a score
    is not finite; else every failed gate (the lung gate first when the bundle has a segmenter and ``lungs`` holds
    the image's lung statistics) and, if none rejects, the low-confidence finding below the cut-off."""
    if not all(math.isfinite(v) for v in (confidence, ood, pixel, colour)):
        return "error", []  # NaN compares False with every threshold: it must never fall through to 'accept'
    gate = meta.lung_gate or LungGate()
    vouch = lungs is not None and lungs_vouch(lungs, gate)
    found = findings(confidence, ood, meta.ood, meta.abstain.threshold, pixel, colour, lungs_vouch=vouch)
    if lungs is not None:
        found = lung_gate_findings(lungs, gate) + found
    return decision_of(found), found


def findings(
    confidence: float,
    ood: float,
    gates: Gates,
    cut: float = 0.0,
    pixel: float = 0.0,
    colour: float = 0.0,
    lungs_vouch: bool = False,
) -> list[Finding]:
    """Every rejection gate (``gates``: model.json's "ood" block) the input fails; if none, the low-confidence
    finding when ``confidence`` is below ``cut`` (model.json's abstain threshold).

    With ``lungs_vouch`` (``reasons.lungs_vouch``: both lungs found where a chest X-ray's are), a failed
    pixel-layout gate does not reject: it becomes 'unusual_framing', which makes the answer uncertain (collimated,
    rotated or oddly framed films trip that crude thumbnail model). An empty list means the answer is accepted.
    """
    vouched = {"unfamiliar_layout": UNUSUAL_FRAMING} if lungs_vouch else {}
    limits = {key: getattr(gates, key) for _, key in GATES}
    failed = [
        Finding(vouched.get(code, code), float(value), float(limits[key]))
        for value, (code, key) in zip((ood, pixel, colour), GATES, strict=True)
        if limits[key] is not None and value > float(limits[key])
    ]
    if any(f.code not in UNCERTAIN_CODES for f in failed):
        return failed
    return failed + ([Finding(LOW_CONFIDENCE, float(confidence), float(cut))] if confidence < cut else [])


def lungs_vouch(stats: LungStats, gate: LungGate) -> bool:
    """Whether the lung mask vouches for a frontal chest X-ray: the lung gate (``lung_findings``) finds nothing,
    there are two or more lung fields, and their layout reaches ``gate['vouch_layout']`` (None: never)."""
    limit = gate.vouch_layout
    if limit is None or stats.layout is None or stats.fields < 2 or stats.layout < limit:
        return False
    return not lung_gate_findings(stats, gate)


def lung_gate_findings(stats: LungStats, gate: LungGate) -> list[Finding]:
    """``lung_findings`` with the limits of a bundle's ``lung_gate`` block (model.json)."""
    return lung_findings(stats, gate.min_area, gate.max_area, gate.min_layout, gate.min_layout_one_field)


def lung_findings(
    stats: LungStats,
    min_area: float,
    max_area: float,
    min_layout: float | None = None,
    min_layout_one_field: float | None = None,
) -> list[Finding]:
    """The lung gate as findings: no lung field ('no_lungs': rejected); lung fields away from where a chest X-ray's
    lungs are ('lung_layout': rejected; ``stats.layout`` below ``min_layout``, or below ``min_layout_one_field``
    when the mask is one single field); one lung only or an implausible lung area ('one_lung', 'lung_area':
    uncertain)."""
    if stats.area_fraction < min_area or not (stats.left_found or stats.right_found):
        return [Finding("no_lungs", stats.area_fraction, min_area)]
    limit = min_layout_one_field if stats.fields < 2 else min_layout
    if stats.layout is not None and limit is not None and stats.layout < limit:
        return [Finding("lung_layout", stats.layout, limit)]
    if not stats.both_found:
        return [Finding("one_lung", 1.0, 2.0)]
    if stats.area_fraction > max_area:
        return [Finding("lung_area", stats.area_fraction, max_area)]
    return []


def decision_of(found: list[Finding]) -> str:
    """'rejected' if a rejection gate failed (network features, layout, colour, no lungs, lung layout), 'uncertain'
    for low confidence or a doubtful lung field, else 'accept'."""
    if any(f.code not in UNCERTAIN_CODES for f in found):
        return "rejected"
    return "uncertain" if found else "accept"
