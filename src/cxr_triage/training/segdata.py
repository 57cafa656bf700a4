"""Lung-mask pairs -> group-aware split and cached arrays; paired augmentation that keeps image and mask aligned.

A pairs folder holds ``images/<stem>.<ext>``, ``masks/<stem>.png`` (0/255, same size) and optionally ``sources.csv``
(``image, mask, origin``). Images go through the classifier's own ``square`` (intensity handling included); masks are
resized the same way with nearest-neighbour sampling.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cxr_triage.core.lungs import input_mask
from cxr_triage.core.preprocess import IMAGE_SUFFIXES, PreprocessSpec, load_grey, normalise, square
from cxr_triage.training.datasets import RandomDownscale, RandomGamma

log = logging.getLogger(__name__)


class PairsError(ValueError):
    """The lung-mask folder cannot be used; the message says why."""


def patient_group(stem: str) -> str:
    """Images of one patient share a group: Shenzhen ``CHNCXR_0001_0`` -> ``CHNCXR_0001``; ``x-day5`` -> ``x``."""
    return re.sub(r"(-day\d+|_[01])$", "", stem)


def find_pairs(root: Path) -> pd.DataFrame:
    """Rows (image, mask, origin, group) for every image with a mask of the same stem."""
    root = Path(root)
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise PairsError(f"{root} needs images/ and masks/ folders (same stems; masks 0/255 PNG)")
    masks = {p.stem: p for p in (root / "masks").iterdir() if p.suffix.lower() == ".png"}
    rows = [
        {"image": str(p), "mask": str(masks[p.stem]), "stem": p.stem}
        for p in sorted((root / "images").iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in masks
    ]
    if not rows:
        raise PairsError(f"{root}: no image in images/ has a mask of the same stem in masks/")
    df = pd.DataFrame(rows)
    origin = {}
    if (root / "sources.csv").exists():
        src = pd.read_csv(root / "sources.csv")
        origin = {Path(i).stem: o for i, o in zip(src["image"], src["origin"], strict=True)}
    df["origin"] = [origin.get(s, "unknown") for s in df["stem"]]
    df["group"] = [patient_group(s) for s in df["stem"]]
    return df


def split_pairs(df: pd.DataFrame, val: float, test: float, seed: int) -> pd.Series:
    """train/val/test per patient group, stratified by origin (each origin split in the same proportions)."""
    rng = np.random.default_rng(seed)
    split = {}
    for _, sub in df.groupby("origin", sort=True):
        groups = np.array(sorted(sub["group"].unique()))
        rng.shuffle(groups)
        n_test = max(1, round(test * len(groups))) if test > 0 and len(groups) > 2 else 0
        n_val = max(1, round(val * len(groups))) if val > 0 and len(groups) > 2 else 0
        for i, g in enumerate(groups):
            split[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return df["group"].map(split)


def load_mask(path: str | Path) -> np.ndarray:
    """A mask file -> bool array (anything above half intensity is lung)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def cache_pairs(df: pd.DataFrame, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, S, S), masks uint8 0/1 (N, S, S)) at the network's input size."""
    images = np.empty((len(df), spec.size, spec.size), np.uint8)
    masks = np.empty_like(images)
    for i, (ip, mp) in enumerate(zip(df["image"], df["mask"], strict=True)):
        grey, mask = load_grey(ip), load_mask(mp)
        if grey.shape != mask.shape:
            raise PairsError(f"{ip} is {grey.shape[::-1]} but its mask {mp} is {mask.shape[::-1]}")
        images[i], masks[i] = square(grey, spec), input_mask(mask, spec)  # the same geometry, no equalisation
    return images, masks


def build_pair_augment(aug: dict[str, Any], size: int) -> tuple[v2.Compose, v2.Compose]:
    """(geometric transform applied to image and mask together, intensity transform for the image only)."""
    geometric = v2.Compose(
        [
            v2.RandomAffine(
                degrees=aug["rotate"],
                translate=(aug["translate"], aug["translate"]),
                scale=tuple(aug["scale"]),
                shear=aug.get("shear", 0),
            ),
            v2.RandomResizedCrop(size, scale=tuple(aug["crop_scale"]), ratio=(0.8, 1.25), antialias=True),
        ]
    )
    intensity = v2.Compose(
        [
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.3, 1.5))], p=aug["blur_p"]),
            v2.RandomApply([RandomDownscale((0.35, 0.8))], p=aug["downscale_p"]),
            v2.ColorJitter(brightness=aug["brightness"], contrast=aug["contrast"]),
            RandomGamma(tuple(aug["gamma"])),
        ]
    )
    return geometric, intensity


class MaskPairs(Dataset):
    """Cached (image, mask) rows -> (normalised float (1, S, S), float mask (1, S, S)), augmented in step."""

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        spec: PreprocessSpec,
        augment: tuple[v2.Compose, v2.Compose] | None = None,
    ) -> None:
        self.images, self.masks, self.spec, self.augment = images, masks, spec, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(np.array(self.images[i]))[None]
        mask = torch.from_numpy(np.array(self.masks[i]))[None]
        if self.augment is not None:
            geometric, intensity = self.augment
            img, mask = geometric(tv_tensors.Image(img), tv_tensors.Mask(mask))
            img = intensity(img.as_subclass(torch.Tensor))
        x = torch.from_numpy(normalise(np.asarray(img)[0], self.spec))
        return x, torch.as_tensor(np.asarray(mask), dtype=torch.float32).reshape(1, *x.shape[-2:])
