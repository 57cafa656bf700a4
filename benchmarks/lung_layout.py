"""The lung gate's layout check (issue 11): how far each image's lung fields overlap the segmenter's atlas, on chest
X-rays (a manifest split) and on non-chest pictures, and what candidate limits would reject.

Usage: python benchmarks/lung_layout.py BUNDLE --manifest runs/data/manifest.csv --split val
                                        [--nonchest LIST.txt] [--benchmark-nonchest] [--json out.json]

``--nonchest`` names a text file of image paths (one per line) that are not chest X-rays: the set the limits are
fitted on besides the validation split. ``--benchmark-nonchest`` adds evaluate's non-chest check images (scikit-image
pictures, blanks, noise): the set the rejection target is scored on, so keep it out of fitting. BUNDLE must carry a
segmenter whose model.json has an atlas (`cxr-triage export-seg` writes one).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from cxr_triage.core.preprocess import ImageReadError
from cxr_triage.runtime.bundle import LungGate
from cxr_triage.runtime.predictor import Predictor

LAYOUT_LIMITS = (0.10, 0.15, 0.20, 0.25, 0.30)  # candidate limits, two or more lung fields
ONE_FIELD_LIMITS = (0.35, 0.40, 0.45, 0.50)  # candidate limits, one single field
VOUCH_LIMITS = (0.45, 0.50, 0.55, 0.60)  # candidate vouch_layout limits (measured with vouching off)


def measure(engine: Predictor, items: list[tuple[str, object]]) -> list[dict[str, object]]:
    """Per image: lung fields, layout overlap, area and the bundle's decision with its reasons."""
    rows: list[dict[str, object]] = []
    for i in range(0, len(items), 32):
        names, decoded = [], []
        for name, src in items[i : i + 32]:
            try:
                decoded.append(engine.decode(src))
            except ImageReadError:
                continue
            names.append(name)
        if not decoded:
            continue
        _, lung_stats = engine.segmenter.square_lungs([it.seg_square for it in decoded])
        preds = [s.prediction for s in engine.score(decoded)]
        for name, stats, pred in zip(names, lung_stats, preds, strict=True):
            rows.append(
                {
                    "name": name,
                    "fields": stats.fields,
                    "layout": round(float(stats.layout), 4),
                    "area": round(stats.area_fraction, 4),
                    "decision": pred.decision,
                    "reasons": [r.code for r in pred.reasons],
                }
            )
    return rows


def summary(rows: list[dict[str, object]]) -> dict[str, object]:
    """Quantiles of the layout overlap and, per candidate limit, how many images it would reject."""
    lay = np.array([r["layout"] for r in rows], float)
    one = np.array([r["fields"] < 2 for r in rows])
    rejected_now = sum(r["decision"] == "rejected" for r in rows)
    out: dict[str, object] = {
        "n": len(rows),
        "rejected by the bundle": rejected_now,
        "one field": int(one.sum()),
        "layout quantiles": {q: round(float(np.quantile(lay, q)), 3) for q in (0, 0.001, 0.005, 0.01, 0.05, 0.5)},
        "layout of one-field masks": sorted(round(float(v), 3) for v in lay[one]),
    }
    out["newly rejected, two+ fields, by limit"] = {
        t: sum(1 for r in rows if r["fields"] >= 2 and r["layout"] < t and r["decision"] != "rejected")
        for t in LAYOUT_LIMITS
    }
    out["newly rejected, one field, by limit"] = {
        t: sum(1 for r in rows if r["fields"] < 2 and r["layout"] < t and r["decision"] != "rejected")
        for t in ONE_FIELD_LIMITS
    }
    pixel_only = [r for r in rows if r["reasons"] == ["unfamiliar_layout"] and r["fields"] >= 2]
    out["rejected by the pixel gate alone, two+ fields: layouts"] = sorted(round(r["layout"], 3) for r in pixel_only)
    out["no longer rejected, by vouch_layout limit"] = {
        t: sum(1 for r in pixel_only if r["layout"] >= t) for t in VOUCH_LIMITS
    }
    if len(lay[~one]):
        out["two+ field share at or above each vouch limit"] = {
            t: round(float((lay[~one] >= t).mean()), 3) for t in VOUCH_LIMITS
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--manifest", type=Path)
    ap.add_argument("--split", default="val")
    ap.add_argument("--nonchest", type=Path, help="text file: one non-chest image path per line")
    ap.add_argument("--benchmark-nonchest", action="store_true", help="evaluate's non-chest check images")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    engine = Predictor(a.bundle)
    if engine.segmenter is None or engine.segmenter.atlas is None:
        raise SystemExit(f"{a.bundle}: needs a segmenter with a lung atlas (re-export it with `export-seg`)")
    res: dict[str, object] = {"bundle": str(a.bundle), "lung_gate": engine.bundle.raw.get("lung_gate")}
    no_vouch = (engine.meta.lung_gate or LungGate()).model_copy(update={"vouch_layout": None})
    engine.bundle = replace(engine.bundle, meta=engine.meta.model_copy(update={"lung_gate": no_vouch}))
    if a.manifest:
        from cxr_triage.data.manifest import load_manifest

        df = load_manifest(a.manifest)
        paths = list(df.loc[df["split"] == a.split, "abspath"])
        res[f"{a.split} split"] = summary(measure(engine, [(p, p) for p in paths]))
    if a.nonchest:
        lines = [line.strip() for line in a.nonchest.read_text().splitlines()]
        paths = [p for p in lines if p and not p.startswith("#")]
        rows = measure(engine, [(p, p) for p in paths])
        res["non-chest list"] = summary(rows) | {"not rejected": [r for r in rows if r["decision"] != "rejected"]}
    if a.benchmark_nonchest:
        from cxr_triage.evaluation.evaluate import ood_images

        rows = measure(engine, [(n, arr) for n, _, arr in ood_images()[0]])
        res["benchmark non-chest"] = summary(rows) | {"not rejected": [r for r in rows if r["decision"] != "rejected"]}
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
