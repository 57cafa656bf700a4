"""Does a lung-view classifier read the lungs or the mask outline? (issue 12, data README trap 4)

Usage: python benchmarks/outline_probe.py CKPT [--extra ../shared/data/extra/rsna-lung-masked] [--n 2000]

On the lung-masked extra set (Lung Opacity vs Normal, masks from another party's network whose failures on dense
opacity leave holes), three scores of "Lung Opacity" against the label (ROC AUC):
  - the checkpoint on the real lung views (content + outline);
  - the checkpoint on outline-only views: the same masks, every lung pixel set to one grey level (no content);
  - a logistic regression on the 32x32 binary mask alone (5-fold cross-validated): how much the outline gives away.
A classifier that does not use the outline stays near 0.5 on outline-only views, whatever the third row says.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.core.lungs import crop_resize, view_box
from cxr_triage.core.preprocess import load_grey, normalise
from cxr_triage.training.lungcache import BLACK, masked_extra_view
from cxr_triage.training.model import load_checkpoint


def probs(model: torch.nn.Module, views: np.ndarray, spec) -> np.ndarray:
    with torch.inference_mode():
        out = [
            torch.softmax(model(torch.from_numpy(normalise(views[i : i + 128], spec))), 1).numpy()
            for i in range(0, len(views), 128)
        ]
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--extra", type=Path, default=Path("../shared/data/extra/rsna-lung-masked"))
    ap.add_argument("--n", type=int, default=2000, help="images drawn (seeded, balanced)")
    a = ap.parse_args()
    model, _, spec = load_checkpoint(a.checkpoint)
    src = pd.read_csv(a.extra / "sources.csv")
    src = src.groupby("label").sample(a.n // 2, random_state=0, replace=False)
    y = (src["label"] == "Lung_Opacity").to_numpy().astype(int)
    real, outline, thumbs = [], [], []
    for f in src["file"]:
        grey = load_grey(a.extra / f)
        real.append(masked_extra_view(grey, spec))
        mask = grey > BLACK
        inside = crop_resize(mask, view_box(mask, spec.lung_margin), spec.size)
        outline.append(np.where(inside, 128, 0).astype(np.uint8))
        thumbs.append(np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((32, 32))) > 127)
    lo = CLASS_IDS.index("lung_opacity")
    p_real = probs(model, np.stack(real), spec)[:, lo]
    p_outline = probs(model, np.stack(outline), spec)[:, lo]
    lr = cross_val_predict(
        LogisticRegression(max_iter=2000, C=0.1), np.stack(thumbs).reshape(len(y), -1), y, cv=5, method="predict_proba"
    )[:, 1]
    print(f"images: {len(y)} ({y.sum()} Lung Opacity, {len(y) - y.sum()} Normal) from {a.extra}")
    print("| input | ROC AUC, Lung Opacity vs Normal |\n|---|---|")
    print(f"| {a.checkpoint} on real lung views | {roc_auc_score(y, p_real):.3f} |")
    print(f"| {a.checkpoint} on outline-only views | {roc_auc_score(y, p_outline):.3f} |")
    print(f"| logistic regression on the 32x32 mask alone (5-fold) | {roc_auc_score(y, lr):.3f} |")


if __name__ == "__main__":
    main()
