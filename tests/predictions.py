"""Predictions made up for the tests of what consumes them (worklist, outbox, worklist page): no model run."""

from __future__ import annotations

from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.runtime.prediction import ModelInfo, Prediction

MODEL = ModelInfo(name="cxr-triage-test", version="9.9.9", sha256="ab" * 32)


def prediction(label: str, decision: str = "accept", p: float = 0.9) -> Prediction:
    """A prediction of ``label`` with probability ``p`` (the rest shared by the other classes)."""
    probs = {f"p_{c}": (p if c == label else (1 - p) / 3) for c in CLASS_IDS}
    return Prediction(path="x.dcm", label=label, confidence=p, **probs, decision=decision, advice="", model=MODEL)
