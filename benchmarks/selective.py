"""Selective prediction (issue 12): which confidence score lets the most images clear 99 % accuracy?

Usage: python benchmarks/selective.py BUNDLE [--manifest runs/data/manifest.csv] [--split val] [--target 0.99]

For each score (the shipped calibrated top probability; the margin between the two top probabilities; the negative
entropy; the top probability discounted by the feature gate's distance), the largest share of the split accepted at
the target accuracy (the rule `export` uses to set the abstention cut-off: `evaluation.calibrate.abstain_threshold`).
Validation decides; only the score that would ship is scored on test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cxr_triage.data.manifest import load_manifest
from cxr_triage.evaluation.calibrate import abstain_threshold
from cxr_triage.runtime.predictor import Predictor
from cxr_triage.training.datasets import label_indices


def scores(probs: np.ndarray, ood: np.ndarray, ood_limit: float) -> dict[str, np.ndarray]:
    top2 = np.sort(probs, axis=1)[:, -2:]
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(axis=1)
    return {
        "top probability (shipped)": top2[:, 1],
        "margin top1 - top2": top2[:, 1] - top2[:, 0],
        "negative entropy": -entropy,
        "top probability x (1 - distance / gate limit)": top2[:, 1] * np.clip(1 - ood / ood_limit, 0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--manifest", type=Path, default=Path("runs/data/manifest.csv"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--target", type=float, default=0.99)
    a = ap.parse_args()
    engine = Predictor(a.bundle)
    df = load_manifest(a.manifest)
    df = df[df["split"] == a.split]
    labels = label_indices(df)
    probs, ood = [], []
    paths = list(df["abspath"])
    for i in range(0, len(paths), 64):
        scored = engine.score([engine.decode(p, p) for p in paths[i : i + 64]])
        probs.append(np.stack([s.probs for s in scored]))
        ood.append(np.array([s.prediction.ood_score for s in scored], np.float32))
    p, d = np.concatenate(probs), np.concatenate(ood)
    print(f"| score ({a.split}, n={len(df)}) | accepted at ≥ {a.target:.0%} accuracy | accuracy among them |")
    print("|---|---|---|")
    correct = p.argmax(1) == labels
    for name, s in scores(p, d, float(engine.meta.ood.threshold)).items():
        onehot = np.zeros_like(p)  # abstain_threshold ranks by the top of its input: give it the score as that top
        onehot[np.arange(len(s)), p.argmax(1)] = s - s.min() + 1e-9
        _, coverage = abstain_threshold(onehot, labels, a.target)
        n = round(coverage * len(s))
        acc = float(correct[np.argsort(-s)][:n].mean()) if n else float("nan")
        print(f"| {name} | {coverage:.1%} | {acc:.4f} |")


if __name__ == "__main__":
    main()
