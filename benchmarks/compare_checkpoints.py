"""Validation metrics of several checkpoints side by side (PyTorch, fp32, decoded cache): which one to ship.

Usage: python benchmarks/compare_checkpoints.py CKPT[:raw] ... [--manifest runs/data/manifest.csv] [--split val]
                                                [--border B ...]

A Lightning checkpoint of a run with weight EMA holds both the EMA weights (what `load_checkpoint` returns and what
export ships) and the raw weights; append `:raw` to score the raw ones. `--border` scores each checkpoint with other
border trims (the test-time crop that `cxr-triage export --border` can ship). Only the validation split is used.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from cxr_triage.classes import CLASS_IDS
from cxr_triage.data import build_cache, label_indices
from cxr_triage.manifest import load_manifest
from cxr_triage.metrics import classification_metrics
from cxr_triage.model import load_checkpoint
from cxr_triage.preprocess import normalise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--manifest", type=Path, default=Path("runs/data/manifest.csv"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--border", type=float, nargs="*", default=[], help="border trims to try (default: as trained)")
    a = ap.parse_args()
    df = load_manifest(a.manifest)
    rows = np.flatnonzero(df["split"] == a.split)
    y = label_indices(df)[rows]
    print(f"| checkpoint | border | {a.split} acc | macro-F1 | " + " | ".join(f"F1 {c}" for c in CLASS_IDS) + " |")
    print("|---" * (4 + len(CLASS_IDS)) + "|")
    for item in a.checkpoints:
        path, _, mode = item.partition(":")
        model, cfg, spec = load_checkpoint(Path(path), raw=mode == "raw")
        for border in a.border or [spec.border]:
            spec_b = dataclasses.replace(spec, border=border)
            images = build_cache(df, spec_b, Path(cfg["data"]["cache_dir"]))
            with torch.inference_mode():
                logits = np.concatenate(
                    [
                        model(torch.from_numpy(normalise(np.asarray(images[rows[i : i + 128]]), spec_b))).numpy()
                        for i in range(0, len(rows), 128)
                    ]
                )
            m = classification_metrics(y, torch.softmax(torch.from_numpy(logits), 1).numpy())
            f1 = " | ".join(f"{m['per_class'][c]['f1']:.3f}" for c in CLASS_IDS)
            print(f"| {item} | {border:g} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {f1} |", flush=True)


if __name__ == "__main__":
    main()
