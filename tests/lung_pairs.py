"""Generated chest images with their lung masks, for the segmentation tests (nothing from ../shared/data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def chest(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A generated 'chest': two dark lung ellipses in a bright body on a dark background; (image, mask bool)."""
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    body = ((xx - 0.5) ** 2 / 0.2 + (yy - 0.55) ** 2 / 0.3) < 1
    cy = 0.5 + rng.uniform(-0.05, 0.05)
    lungs = np.zeros((h, w), bool)
    for cx in (0.32, 0.68):
        cx += rng.uniform(-0.03, 0.03)
        lungs |= ((xx - cx) ** 2 / rng.uniform(0.008, 0.014) + (yy - cy) ** 2 / rng.uniform(0.06, 0.09)) < 1
    img = 20 + 150 * body - 90 * lungs + rng.normal(0, 8, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8), lungs


def write_pairs(root: Path, n: int = 28, seed: int = 0) -> Path:
    """``n`` image + mask pairs under ``root`` (images/, masks/, sources.csv with two origins); ``root``."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["image,mask,origin"]
    for i in range(n):
        h, w = (int(v) for v in rng.integers(80, 121, 2))
        img, mask = chest(h, w, rng)
        stem = f"CHNCXR_{i:04d}_{i % 2}" if i % 3 else f"case{i}-day{i % 4}"
        Image.fromarray(img).save(root / "images" / f"{stem}.jpg", quality=92)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{stem}.png")
        rows.append(f"images/{stem}.jpg,masks/{stem}.png,{'shenzhen' if i % 3 else 'covid-multi'}")
    (root / "sources.csv").write_text("\n".join(rows) + "\n")
    return root
