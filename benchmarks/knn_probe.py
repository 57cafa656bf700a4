"""k-nearest-neighbour probe of backbones (issue 12, self-supervised pre-training): how well pooled features of a
network separate the classes without any training on top, against a randomly initialised network of the same kind.

Usage: python benchmarks/knn_probe.py CKPT [CKPT ...] [--size 128] [--manifest runs/data/manifest.csv]

The probe is `cxr-triage pretrain`'s own (training/pretrain.py): 2,000 training-split images (seeded) as the labelled
memory, the validation split as queries, cosine similarity, k = 20, similarity-weighted votes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from cxr_triage.core.config import load_config
from cxr_triage.core.preprocess import PreprocessSpec
from cxr_triage.data.manifest import load_manifest
from cxr_triage.training.datasets import build_cache, label_indices
from cxr_triage.training.model import load_checkpoint
from cxr_triage.training.pretrain import SimSiam, knn_accuracy

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", nargs="+", type=Path)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--manifest", type=Path, default=Path("runs/data/manifest.csv"))
    ap.add_argument("--cache", type=Path, default=Path("runs/cache"))
    a = ap.parse_args()
    cfg = load_config(REPO / "configs" / "default.yaml", [f"preprocess.size={a.size}"])
    spec = PreprocessSpec.from_dict(cfg["preprocess"])
    df = load_manifest(a.manifest)
    tr, va = (df[df["split"] == s].reset_index(drop=True) for s in ("train", "val"))
    mem = np.sort(np.random.default_rng(0).choice(len(tr), min(2000, len(tr)), replace=False))
    memory = torch.from_numpy(np.asarray(build_cache(tr, spec, a.cache))[mem])
    memory_labels = torch.from_numpy(label_indices(tr)[mem])
    queries = torch.from_numpy(np.asarray(build_cache(va, spec, a.cache)))
    labels = torch.from_numpy(label_indices(va))
    torch.manual_seed(0)
    print(f"| backbone | k-NN accuracy (validation, n={len(va)}) |\n|---|---|")
    print(f"| majority class | {float((labels == labels.mode().values).float().mean()):.4f} |")
    for name in ["random initialisation", *map(str, a.ckpt)]:
        probe = SimSiam(cfg)
        if name != "random initialisation":
            probe.model.load_state_dict(load_checkpoint(Path(name))[0].state_dict())
        probe.eval()
        with torch.inference_mode():
            acc = knn_accuracy(probe.features(memory), memory_labels, probe.features(queries), labels)
        print(f"| {name} | {acc:.4f} |")


if __name__ == "__main__":
    main()
