"""Refits of the two image gates (issue 11, session 7): do other fits separate chest X-rays from non-chest pictures
better than the shipped one? Fitted on training images, thresholds from validation, judged on validation and the
non-chest fit list only (the test split and the benchmark's non-chest images are not read).

Usage: python benchmarks/gate_refit.py BUNDLE --manifest runs/data/manifest.csv --nonchest benchmarks/nonchest-fit.txt
                                      [--json out.json]

Variants: the Mahalanobis feature gate fitted on 3,000 or all training images with covariance shrinkage 0.05 / 0.2 /
0.5; the pixel gate's PCA with 32-256 components; a k-nearest-neighbour cosine distance on the pooled features
(Sun et al. 2022) instead of Mahalanobis. Each row: ROC AUC of validation vs the fit list per score, and how many of
each set the pair of gates rejects at the shipped rule (99.8 % validation quantile + 5 %).
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from cxr_triage.core.preprocess import ImageReadError, load_grey, normalise, square
from cxr_triage.data.manifest import load_manifest
from cxr_triage.evaluation.calibrate import fit_mahalanobis, fit_pixel_pca
from cxr_triage.runtime.engine import Engine, ood_scores, pixel_residual, thumbnails
from cxr_triage.training.datasets import label_indices

QUANTILE, MARGIN = 0.998, 1.05  # the shipped gates' rule (training/export.py)


def features(engine: Engine, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features, 32 x 32 thumbnails) of every readable image, as the engine computes them."""

    def one(path: str) -> np.ndarray | None:
        try:
            return square(load_grey(path), engine.spec)
        except ImageReadError:
            return None

    with ThreadPoolExecutor(2) as ex:
        squares = [s for s in ex.map(one, paths) if s is not None]
    pooled, thumbs = [], []
    for i in range(0, len(squares), 64):
        x = normalise(np.stack(squares[i : i + 64]), engine.spec)
        pooled.append(engine.forward(x)[1].mean(axis=(2, 3)))
        thumbs.append(thumbnails(x))
    return np.concatenate(pooled), np.concatenate(thumbs)


def judged(val: np.ndarray, fit: np.ndarray, limit: float) -> dict[str, float]:
    y = np.r_[np.zeros(len(val)), np.ones(len(fit))]
    return {
        "auc": round(float(roc_auc_score(y, np.r_[val, fit])), 4),
        "val": int((val > limit).sum()),
        "fit": int((fit > limit).sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--nonchest", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    engine = Engine(a.bundle)
    df = load_manifest(a.manifest)
    tr, va = df[df["split"] == "train"], df[df["split"] == "val"]
    lines = [line.strip() for line in a.nonchest.read_text().splitlines()]
    f_tr, t_tr = features(engine, list(tr["abspath"]))
    f_va, t_va = features(engine, list(va["abspath"]))
    f_nc, t_nc = features(engine, [p for p in lines if p and not p.startswith("#")])
    y_tr = label_indices(tr)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(tr), min(3000, len(tr)), replace=False))
    rows = []
    for n, idx in (("3000", sample), ("all", np.arange(len(tr)))):
        for shrink in (0.05, 0.2, 0.5):
            means, precision = fit_mahalanobis(f_tr[idx], y_tr[idx], 4, shrink=shrink)
            ex = {"ood_means": means, "ood_precision": precision}
            sv, sn = ood_scores(f_va, ex), ood_scores(f_nc, ex)
            rows.append(
                {
                    "gate": "features (Mahalanobis)",
                    "train images": n,
                    "shrink": shrink,
                    **judged(sv, sn, float(np.quantile(sv, QUANTILE) * MARGIN)),
                }
            )
        for k in (32, 64, 128, 256):
            mean, comps = fit_pixel_pca(t_tr[idx], k=k)
            ex = {"pix_mean": mean, "pix_components": comps}
            pv, pn = pixel_residual(t_va, ex), pixel_residual(t_nc, ex)
            rows.append(
                {
                    "gate": "pixel (PCA residual)",
                    "train images": n,
                    "components": k,
                    **judged(pv, pn, float(np.quantile(pv, QUANTILE) * MARGIN)),
                }
            )
    unit = f_tr / np.linalg.norm(f_tr, axis=1, keepdims=True)
    for k in (1, 5, 20, 50):

        def knn(f: np.ndarray, k: int = k) -> np.ndarray:
            return 1 - np.sort((f / np.linalg.norm(f, axis=1, keepdims=True)) @ unit.T, axis=1)[:, -k]

        kv, kn = knn(f_va), knn(f_nc)
        rows.append(
            {
                "gate": "features (k-NN cosine distance)",
                "train images": "all",
                "k": k,
                **judged(kv, kn, float(np.quantile(kv, QUANTILE) * MARGIN)),
            }
        )
    shipped = engine.bundle.raw.get("ood", {})
    res = {
        "bundle": str(a.bundle),
        "shipped": {k: shipped.get(k) for k in ("threshold", "pixel_threshold", "fitted_on")},
        "validation": len(f_va),
        "non-chest fit list": len(f_nc),
        "rows": rows,
    }
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
