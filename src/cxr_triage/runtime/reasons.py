"""Why an answer is uncertain or rejected: the gates and the abstention cut-off as findings with their numbers.

``findings`` is the decision rule itself (``engine.decide`` only names its outcome), so the reasons a
prediction gives are always the ones that decided it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# (finding code, key in model.json's "ood" block): unfamiliar network features (Mahalanobis distance),
# an unfamiliar image layout (pixel-PCA residual), colour (radiographs are grey)
GATES: tuple[tuple[str, str], ...] = (
    ("unfamiliar_features", "threshold"),
    ("unfamiliar_layout", "pixel_threshold"),
    ("colour", "colour_threshold"),
)
LOW_CONFIDENCE = "low_confidence"


@dataclass(frozen=True)
class Finding:
    """One reason an answer was not accepted: ``value`` crossed ``limit``."""

    code: str
    value: float
    limit: float


def findings(
    confidence: float, ood: float, meta: dict[str, Any], pixel: float = 0.0, colour: float = 0.0
) -> list[Finding]:
    """Every rejection gate the input fails; if none, the low-confidence finding when below the cut-off.

    An empty list means the answer is accepted.
    """
    gate = meta.get("ood", {})
    failed = [
        Finding(code, float(value), float(gate[key]))
        for value, (code, key) in zip((ood, pixel, colour), GATES, strict=True)
        if gate.get(key) is not None and value > float(gate[key])
    ]
    if failed:
        return failed
    cut = float(meta.get("abstain", {}).get("threshold", 0.0))
    return [Finding(LOW_CONFIDENCE, float(confidence), cut)] if confidence < cut else []


def decision_of(found: list[Finding]) -> str:
    """'rejected' if a gate failed, 'uncertain' below the cut-off, else 'accept'."""
    if any(f.code != LOW_CONFIDENCE for f in found):
        return "rejected"
    return "uncertain" if found else "accept"
