"""Decode a manifest once into a cached uint8 array; datasets and augmentation read only that cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.core.preprocess import PreprocessSpec, normalise, prepare

log = logging.getLogger(__name__)


def _prepare_path(path: str, spec: PreprocessSpec) -> np.ndarray:
    return prepare(path, spec)


def cache_key(df: pd.DataFrame, spec: PreprocessSpec) -> str:
    h = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
    for p, s in zip(df["abspath"], df.get("sha256", df["abspath"]), strict=True):
        h.update(f"{p}\0{s}\n".encode())
    return h.hexdigest()[:16]


def build_cache(
    df: pd.DataFrame,
    spec: PreprocessSpec,
    cache_dir: Path,
    workers: int | None = None,
    progress: Callable[[Iterable, int], Iterable] | None = None,
) -> np.ndarray:
    """uint8 array (N, size, size) of ``prepare(path, spec)`` for every manifest row, cached on disk."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"images-{cache_key(df, spec)}-{spec.size}.npy"
    if target.exists():
        arr = np.load(target, mmap_mode="r")
        if arr.shape == (len(df), spec.size, spec.size):
            return arr
        log.warning("cache %s has the wrong shape; rebuilding", target)
    out = np.empty((len(df), spec.size, spec.size), np.uint8)
    with ProcessPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        it: Iterable = pool.map(partial(_prepare_path, spec=spec), list(df["abspath"]), chunksize=64)
        if progress is not None:
            it = progress(it, len(df))
        for i, img in enumerate(it):
            out[i] = img
    save_atomic(target, out)
    return out


def save_atomic(target: Path, arr: np.ndarray) -> None:
    """``np.save`` to a temporary sibling, then rename: a killed build never leaves half a cache."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, target)


class RandomDownscale(torch.nn.Module):
    """Down-sample by a random factor and back up: mimics an image rebuilt from a smaller copy."""

    def __init__(self, factor: tuple[float, float]) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        f = float(torch.empty(1).uniform_(*self.factor))
        small = v2.functional.resize(img, [max(8, int(h * f)), max(8, int(w * f))], antialias=True)
        return v2.functional.resize(small, [h, w], antialias=False)


class RandomGamma(torch.nn.Module):
    def __init__(self, gamma: tuple[float, float]) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return v2.functional.adjust_gamma(img, float(torch.empty(1).uniform_(*self.gamma)))


class RandomLungHoles(torch.nn.Module):
    """Cut holes and lobe drop-outs into a lung view (0 = outside the lungs), so that holes in a mask are no class
    cue: another party's segmenter leaves them in Lung Opacity masks only (data README, trap 4)."""

    def __init__(self, holes_p: float, lobe_p: float) -> None:
        super().__init__()
        self.holes_p, self.lobe_p = holes_p, lobe_p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        lung = img[0] > 0
        if not bool(lung.any()):
            return img
        img = img.clone()
        h, w = lung.shape
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        if float(torch.rand(1)) < self.holes_p:
            ys, xs = torch.nonzero(lung, as_tuple=True)
            for _ in range(int(torch.randint(1, 4, (1,)))):
                k = int(torch.randint(len(ys), (1,)))
                ry, rx = (float(torch.empty(1).uniform_(0.04, 0.16)) * s for s in (h, w))
                hole = ((yy - ys[k]) / ry) ** 2 + ((xx - xs[k]) / rx) ** 2 <= 1
                img[0][hole] = 0
        if float(torch.rand(1)) < self.lobe_p:
            side = slice(0, w // 2) if float(torch.rand(1)) < 0.5 else slice(w // 2, w)
            rows = torch.nonzero(lung[:, side].any(1), as_tuple=True)[0]
            if len(rows):
                top, bottom = int(rows.min()), int(rows.max())
                cut = top + int((bottom - top) * float(torch.empty(1).uniform_(0.35, 0.65)))
                part = slice(top, cut) if float(torch.rand(1)) < 0.3 else slice(cut, bottom + 1)
                img[0, part, side] = 0
        return img


class Augment:
    """Training augmentation on uint8 (1, H, W) tensors; the output stays uint8 for ``normalise``.

    ``pre`` (lung views: holes), then ``geometric`` (crop, flip, affine), then ``photometric`` (blur, resize history,
    JPEG, contrast). ``with_mask`` moves a lung mask through the same geometry (one stacked tensor, so every random
    parameter is shared) and leaves it out of the photometric part."""

    def __init__(self, pre: list[torch.nn.Module], geometric: v2.Compose, photometric: v2.Compose) -> None:
        self.pre, self.geometric, self.photometric = v2.Compose(pre) if pre else None, geometric, photometric

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.pre is not None:
            img = self.pre(img)
        return self.photometric(self.geometric(img))

    def with_mask(self, img: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented uint8 image (1, H, W), bool mask (1, H, W)) from a uint8 image and a bool/0-1 mask."""
        if self.pre is not None:
            img = self.pre(img)
        both = self.geometric(torch.cat([img, mask.to(torch.uint8) * 255]))
        return self.photometric(both[:1]), both[1:] > 127


def build_augment(aug: dict[str, Any], size: int, lung_view: bool = False) -> Augment:
    """The training augmentation of a config's ``augment`` section. Lung views (``preprocess.lungs: mask``) also get
    random holes and lobe drop-outs (``holes_p``, ``lobe_p``)."""
    holes = [RandomLungHoles(aug.get("holes_p", 0.0), aug.get("lobe_p", 0.0))] if lung_view else []
    geometric = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=tuple(aug["scale"]), ratio=(0.85, 1.18), antialias=True),
            v2.RandomHorizontalFlip(aug.get("hflip_p", 0.0)),
            v2.RandomAffine(degrees=aug["rotate"], translate=(aug["translate"], aug["translate"])),
        ]
    )
    photometric = v2.Compose(
        [
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.3, 1.5))], p=aug["blur_p"]),
            v2.RandomApply([RandomDownscale(tuple(aug["downscale_range"]))], p=aug["downscale_p"]),
            v2.RandomApply([v2.JPEG(tuple(aug["jpeg_quality"]))], p=aug["jpeg_p"]),
            v2.ColorJitter(brightness=aug["brightness"], contrast=aug["contrast"]),
            RandomGamma(tuple(aug["gamma"])),
        ]
    )
    return Augment(holes, geometric, photometric)


class CachedImages(Dataset):
    """Rows of a cached uint8 array -> (normalised float tensor (1, H, W), class index), or with ``masks`` (a cached
    (N, H, W) lung-mask array in the same coordinates) -> (image, class index, float lung mask (1, H, W))."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        spec: PreprocessSpec,
        augment: Augment | None = None,
        masks: np.ndarray | None = None,
    ) -> None:
        self.images, self.labels, self.spec, self.augment, self.masks = images, labels, spec, augment, masks

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        img = np.asarray(self.images[i])
        if self.masks is None:
            if self.augment is not None:
                img = self.augment(torch.from_numpy(img.copy())[None]).numpy()[0]
            return torch.from_numpy(normalise(img, self.spec)), int(self.labels[i])
        mask = torch.from_numpy(np.asarray(self.masks[i], bool).copy())[None]
        return masked_item(img, mask, int(self.labels[i]), self.spec, self.augment)


def masked_item(
    img: np.ndarray, mask: torch.Tensor, label: int, spec: PreprocessSpec, augment: Augment | None
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(normalised image (1, H, W), class index, float lung mask (1, H, W)), image and mask augmented together."""
    if augment is not None:
        t, mask = augment.with_mask(torch.from_numpy(np.ascontiguousarray(img))[None], mask)
        img = t.numpy()[0]
    return torch.from_numpy(normalise(img, spec)), label, mask.float()


def label_indices(df: pd.DataFrame) -> np.ndarray:
    return df["label"].map({c: i for i, c in enumerate(CLASS_IDS)}).to_numpy(np.int64)


def sample_weights(labels: np.ndarray, alpha: float) -> np.ndarray:
    """Per-sample weights so that class c is drawn with probability ~ count_c^(1-alpha)."""
    counts = np.bincount(labels, minlength=len(CLASS_IDS)).astype(np.float64)
    per_class = np.where(counts > 0, np.maximum(counts, 1) ** -alpha, 0.0)
    return per_class[labels]
