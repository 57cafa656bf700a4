"""Shared by the archive-scoring tests (in process and on a local Ray): PNG bytes of an array, and the check that
two result tables agree row for row."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from cxr_triage.core.classes import CLASS_IDS


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def assert_same_rows(rows: list[dict], expected: dict[str, dict]) -> None:
    """Identical rows: same paths once each, labels, decisions, errors; probabilities to 1e-6."""
    assert sorted(r["path"] for r in rows) == sorted(expected)
    for r in rows:
        e = expected[r["path"]]
        assert (r["label"] or "", r["decision"], r["error"] or "") == (
            e["label"] or "",
            e["decision"],
            e["error"] or "",
        ), r["path"]
        if e["decision"] != "error":
            for c in CLASS_IDS:
                assert abs(r[f"p_{c}"] - e[f"p_{c}"]) <= 1e-6
            if e["confidence"] is None:  # rejected: no label, no confidence
                assert r["confidence"] is None
            else:
                assert abs(r["confidence"] - e["confidence"]) <= 1e-6
