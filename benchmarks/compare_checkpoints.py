"""Validation metrics of several checkpoints side by side (PyTorch, fp32, decoded cache): which one to ship.

Usage: python benchmarks/compare_checkpoints.py CKPT[:raw][@SIZE[@BORDER]] | BUNDLE_DIR ... [--ensemble]
                                                [--manifest runs/data/manifest.csv] [--split val]
                                                [--border B ...] [--size S ...] [--segmenter DIR]

A Lightning checkpoint of a run with weight EMA holds both the EMA weights (what `load_checkpoint` returns and what
export ships) and the raw weights; append `:raw` to score the raw ones. `--border` scores each checkpoint with other
border trims (the test-time crop that `cxr-triage export --border` can ship) and `--size` with other input sizes (a
net trained on random crops often scores better a little above its training size). `CKPT@SIZE@BORDER` names one view
directly. `--ensemble` adds a row for the mean probabilities of every combination of the views scored (test-time
augmentation / model ensembles). An exported bundle directory (e.g. the shipped `src/cxr_triage/assets/model`, which
has no PyTorch checkpoint) is scored through onnxruntime at its own preprocessing, so that networks with different
inputs (a whole-image bundle and a lung-view checkpoint) can be mixed. `--segmenter` scores lung-view checkpoints
through another lung segmenter than the one they were trained with (e.g. the shipped one). Only the validation split
is used unless `--split` says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.core.preprocess import PreprocessSpec, normalise
from cxr_triage.data.manifest import load_manifest
from cxr_triage.evaluation.metrics import classification_metrics
from cxr_triage.runtime.engine import softmax
from cxr_triage.training.datasets import build_cache, label_indices
from cxr_triage.training.lungcache import build_lung_cache
from cxr_triage.training.model import load_checkpoint


def view_probs(
    model: torch.nn.Module, spec: PreprocessSpec, df: pd.DataFrame, cache_dir: Path, segmenter: str | None = None
) -> np.ndarray:
    """Softmax of one checkpoint on every row of ``df`` at one preprocessing spec (fp32, batches of 128); lung views
    go through the checkpoint's lung segmenter (``data.segmenter``)."""
    if spec.lungs == "none":
        images = build_cache(df, spec, cache_dir)
    else:
        images = build_lung_cache(df, spec, cache_dir, Path(segmenter) if segmenter else None)
    with torch.inference_mode():
        logits = np.concatenate(
            [
                model(torch.from_numpy(normalise(np.asarray(images[i : i + 128]), spec))).numpy()
                for i in range(0, len(df), 128)
            ]
        )
    return softmax(logits)


def bundle_probs(bundle: Path, df: pd.DataFrame, cache_dir: Path) -> np.ndarray:
    """Softmax of an exported whole-image bundle's logits (onnxruntime, uncalibrated like the checkpoints' rows)."""
    from cxr_triage.runtime.engine import Engine

    engine = Engine(bundle)
    if engine.spec.lungs != "none":
        raise SystemExit(f"{bundle}: lung-view bundles are scored from their checkpoint")
    images = build_cache(df, engine.spec, cache_dir)
    logits = np.concatenate(
        [engine.forward(normalise(np.asarray(images[i : i + 64]), engine.spec))[0] for i in range(0, len(df), 64)]
    )
    return softmax(logits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--manifest", type=Path, default=Path("runs/data/manifest.csv"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--border", type=float, nargs="*", default=[], help="border trims to try (default: as trained)")
    ap.add_argument("--size", type=int, nargs="*", default=[], help="input sizes to try (default: as trained)")
    ap.add_argument("--ensemble", action="store_true", help="also score the mean probabilities of every set of views")
    ap.add_argument("--segmenter", default=None, help="lung segmenter bundle for lung-view checkpoints")
    ap.add_argument("--cache-dir", type=Path, default=Path("runs/cache"), help="decoded images for bundle views")
    a = ap.parse_args()
    df = load_manifest(a.manifest)
    part = df[df["split"] == a.split].reset_index(drop=True)
    y = label_indices(part)

    def row(name: str, probs: np.ndarray) -> None:
        m = classification_metrics(y, probs)
        f1 = " | ".join(f"{m['per_class'][c]['f1']:.3f}" for c in CLASS_IDS)
        print(f"| {name} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {f1} |", flush=True)

    print(
        f"| checkpoint @ size @ border | {a.split} acc | macro-F1 | " + " | ".join(f"F1 {c}" for c in CLASS_IDS) + " |"
    )
    print("|---" * (3 + len(CLASS_IDS)) + "|")
    views: dict[str, np.ndarray] = {}
    for item in a.checkpoints:
        if Path(item).is_dir():
            views[item] = bundle_probs(Path(item), part, a.cache_dir)
            row(item, views[item])
            continue
        ckpt, *view = item.split("@")
        path, _, mode = ckpt.partition(":")
        model, cfg, spec = load_checkpoint(Path(path), raw=mode == "raw")
        sizes = [int(view[0])] if view else a.size or [spec.size]
        borders = [float(view[1])] if len(view) > 1 else a.border or [spec.border]
        for size, border in itertools.product(sizes, borders):
            name = f"{ckpt} @ {size} @ {border:g}"
            spec_v = dataclasses.replace(spec, size=size, border=border)
            segmenter = a.segmenter or cfg["data"].get("segmenter")
            views[name] = view_probs(model, spec_v, part, Path(cfg["data"]["cache_dir"]), segmenter)
            row(name, views[name])
    if a.ensemble:
        for r in range(2, len(views) + 1):
            for names in itertools.combinations(views, r):
                row(" + ".join(names), np.mean([views[n] for n in names], axis=0))


if __name__ == "__main__":
    main()
