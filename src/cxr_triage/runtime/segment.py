"""Lung masks with onnxruntime (no torch): the segmenter bundle, batch inference, ``cxr-triage segment`` rows.

A segmenter bundle is a folder: ``model.onnx`` (input ``input`` (N, 1, S, S), output ``logits`` (N, 1, S, S)) and
``model.json`` (format, preprocessing spec, metrics, sha256 of the graph and, since session 6, the lung atlas: the
mean of its training masks on a 32 x 32 grid). The shipped one is ``assets/model/lungs``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cxr_triage.core.geometry import SquareMap, resize_mask
from cxr_triage.core.lungs import LungStats, cleaned, input_mask, lung_attention, lung_stats
from cxr_triage.core.preprocess import ImageReadError, PreprocessSpec, load_grey, normalise, square
from cxr_triage.runtime.bundle import Bundle, BundleError, read_bundle_meta, sha256_file, write_meta
from cxr_triage.runtime.session import cpu_session

SEG_BUNDLE_FORMAT = "cxr-triage-segmenter/1"
SEGMENT_COLUMNS = [
    "path",
    "lung_area_fraction",
    "left_found",
    "right_found",
    "lung_fields",
    "lung_layout",
    "mask_path",
    "error",
]


def default_segmenter_dir() -> Path:
    """The segmenter shipped inside the package, within the shipped classifier bundle (``assets/model/lungs``)."""
    return Path(str(resources.files("cxr_triage") / "assets" / "model" / "lungs"))


def read_segmenter_meta(bundle_dir: Path) -> dict[str, Any]:
    """model.json of a segmenter bundle, checked: format, spec and the graph's sha256."""
    meta_path = Path(bundle_dir) / "model.json"
    if not meta_path.exists():
        raise BundleError(f"{bundle_dir} is not a segmenter bundle (no model.json); export one with `export-seg`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{meta_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != SEG_BUNDLE_FORMAT:
        raise BundleError(f"{meta_path}: not a {SEG_BUNDLE_FORMAT!r} bundle")
    try:
        PreprocessSpec.from_dict(meta["preprocess"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{meta_path}: bad preprocessing spec ({exc})") from None
    onnx = Path(bundle_dir) / "model.onnx"
    if not onnx.exists() or sha256_file(onnx) != meta.get("onnx_sha256"):
        raise BundleError(f"{onnx} is missing or does not match the sha256 in model.json: re-export the segmenter")
    return meta


def read_atlas(meta: dict[str, Any], where: Path) -> np.ndarray | None:
    """The segmenter's lung atlas (model.json "atlas": a square grid of lung shares in [0, 1]) or None."""
    if "atlas" not in meta:
        return None
    bad = BundleError(f"{where}/model.json: 'atlas' must be a square grid of lung shares in [0, 1]")
    try:
        atlas = np.asarray(meta["atlas"], np.float32)
    except (TypeError, ValueError):
        raise bad from None
    square_grid = atlas.ndim == 2 and atlas.shape[0] == atlas.shape[1] > 0
    if not square_grid or not np.isfinite(atlas).all() or atlas.min() < 0 or atlas.max() > 1 or atlas.sum() == 0:
        raise bad
    return atlas


class LungSegmenter:
    """An onnxruntime session over a segmenter bundle: grey images -> cleaned lung masks at their own size."""

    def __init__(self, bundle_dir: str | Path | None = None, threads: int | None = None) -> None:
        self.dir = Path(bundle_dir) if bundle_dir else default_segmenter_dir()
        self.meta = read_segmenter_meta(self.dir)
        self.spec = PreprocessSpec.from_dict(self.meta["preprocess"])
        self.session = cpu_session(self.dir / "model.onnx", threads)
        self.atlas = read_atlas(self.meta, self.dir)  # where lungs usually are (None for bundles made before it)

    @property
    def info(self) -> dict[str, str]:
        return {
            "name": self.meta.get("name", ""),
            "version": self.meta.get("version", ""),
            "sha256": self.meta["onnx_sha256"],
        }

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw lung logits (N, S, S) for a float32 batch (N, 1, S, S)."""
        return self.session.run(["logits"], {"input": np.ascontiguousarray(x, np.float32)})[0][:, 0]

    def square_masks(self, squares: list[np.ndarray]) -> list[np.ndarray]:
        """Cleaned masks (bool, S x S) for uint8 squares already made with this segmenter's spec."""
        return self.square_lungs(squares)[0]

    def square_lungs(self, squares: list[np.ndarray]) -> tuple[list[np.ndarray], list[LungStats]]:
        """``square_masks`` and each mask's ``stats`` (the field count taken from the clean-up)."""
        if not squares:
            return [], []
        raw = self.logits(normalise(np.stack(squares), self.spec)) > 0
        pairs = [cleaned(m) for m in raw]
        return [m for m, _ in pairs], [self.stats(m, fields) for m, fields in pairs]

    def stats(self, small: np.ndarray, fields: int | None = None) -> LungStats:
        """``lung_stats`` of a mask at this network's square size, with the layout overlap when there is an atlas."""
        return lung_stats(small, self.atlas, fields)

    def masks(self, greys: list[np.ndarray]) -> list[np.ndarray]:
        """Cleaned lung masks (bool) at each grey image's own height x width."""
        small = self.square_masks([square(g, self.spec) for g in greys])
        return [self.to_image(m, g.shape) for m, g in zip(small, greys, strict=True)]

    def in_input(self, small: np.ndarray, shape: tuple[int, int], spec: PreprocessSpec) -> np.ndarray:
        """A mask at the network's square size in a whole-image classifier's input coordinates (``spec``) for an
        image of ``shape``: what ``core.lungs.input_mask`` gives for the full-size mask, computed at the network's
        size when both specs stretch (no full-size mask is made; within a pixel of the network's grid)."""
        box = self._input_box(small.shape, shape, spec)
        if box is None:
            return input_mask(self.to_image(small, shape), spec)
        y0, y1, x0, x1 = box
        return resize_mask(small[y0:y1, x0:x1], (spec.size, spec.size))

    def attention(self, cam: np.ndarray, small: np.ndarray, shape: tuple[int, int], spec: PreprocessSpec) -> float:
        """``lung_attention`` of a classifier's activation map (over its input, ``spec``) against a mask at this
        network's size for an image of ``shape``. When both specs stretch, it is measured on the mask's own grid over
        the region the classifier sees (the map is resized, the mask is not: the same share within the grids'
        discretisation, at a fraction of the cost); otherwise through ``in_input``."""
        box = self._input_box(small.shape, shape, spec)
        if box is None:
            return lung_attention(cam, self.in_input(small, shape, spec))
        y0, y1, x0, x1 = box
        return lung_attention(cam, small[y0:y1, x0:x1])

    def _input_box(
        self, grid: tuple[int, int], shape: tuple[int, int], spec: PreprocessSpec
    ) -> tuple[int, int, int, int] | None:
        """The region of this network's square (``grid``) that a whole-image classifier's input covers for an image
        of ``shape``, or None when the two geometries do not map by a crop (lung views, crop/pad rules, a trim
        here): ``SquareMap.crop_of``."""
        if spec.lungs != "none":
            return None
        return SquareMap(self.spec, shape).crop_of(SquareMap(spec, shape), grid)

    def to_image(self, small: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """A mask at the network's square size back onto the image (undoing border trim and the square rule; no
        lung outside what the square shows): ``SquareMap.invert``."""
        return SquareMap(self.spec, tuple(shape)).invert(np.asarray(small, bool), outside="zero")


def segmenter_for(bundle: Bundle) -> LungSegmenter | None:
    """The lung segmenter a classifier bundle carries (its typed ``meta.segmenter``: a sub-folder, checked by
    sha256), or None for a bundle without one (then: no lung attention, no lung gate). A classifier that reads lung
    views cannot work without its segmenter (BundleError)."""
    ref, bundle_dir = bundle.meta.segmenter, bundle.dir
    if ref is None:
        if bundle.spec.lungs != "none":
            raise BundleError(f"{bundle_dir}: this classifier reads lung views but its bundle names no lung segmenter")
        return None
    place = (bundle_dir / ref.path).resolve()
    if bundle_dir.resolve() not in place.parents:
        raise BundleError(f"{bundle_dir}: segmenter path {ref.path!r} leaves the bundle folder")
    seg = LungSegmenter(place)
    if ref.sha256 != seg.meta["onnx_sha256"]:
        raise BundleError(f"{place} is not the lung segmenter this bundle was made with (sha256 differs); re-export")
    return seg


def _mask_name(path: str, taken: set[str]) -> str:
    """``<stem>.png``, or ``<stem>-2.png``... when another input of the batch has the same stem."""
    stem, k = Path(path).stem, 1
    name = f"{stem}.png"
    while name in taken:
        k += 1
        name = f"{stem}-{k}.png"
    taken.add(name)
    return name


def segment_paths(seg: LungSegmenter, paths: list[str], out_dir: Path) -> Iterator[dict[str, Any]]:
    """One ``segment.csv`` row per path, in order; writes ``<stem>.png`` (0/255, the input's own size) per image.
    Unreadable inputs give a row with ``error`` and no mask."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for path in paths:
        try:
            grey = load_grey(path)
        except ImageReadError as exc:
            yield segment_row(path, None, "", str(exc))
            continue
        except (OSError, MemoryError) as exc:
            yield segment_row(path, None, "", f"{path}: cannot read ({type(exc).__name__}: {exc})")
            continue
        mask = seg.masks([grey])[0]
        target = out_dir / _mask_name(path, taken)
        Image.fromarray(mask.astype(np.uint8) * 255).save(target)
        yield segment_row(path, lung_stats(mask, seg.atlas), str(target), "")  # the statistics of the mask written


def segment_row(path: str, stats: LungStats | None, mask_path: str, error: str) -> dict[str, Any]:
    """One ``segment.csv`` row."""
    return {
        "path": path,
        "lung_area_fraction": round(stats.area_fraction, 4) if stats else "",
        "left_found": stats.left_found if stats else "",
        "right_found": stats.right_found if stats else "",
        "lung_fields": stats.fields if stats else "",
        "lung_layout": round(stats.layout, 4) if stats and stats.layout is not None else "",
        "mask_path": mask_path,
        "error": error,
    }


def replace_segmenter(bundle_dir: Path, segmenter: Path) -> dict[str, Any]:
    """Put another lung segmenter bundle into a whole-image classifier bundle (as ``lungs/``), name it in model.json
    and re-seal; returns the new model.json content. Lung-view classifiers are refused: their inputs were made by
    the segmenter they were trained with, so they need a new export instead."""
    bundle_dir = Path(bundle_dir)
    meta = read_bundle_meta(bundle_dir)
    if meta["preprocess"].get("lungs", "none") != "none":
        raise BundleError(f"{bundle_dir} classifies lung views made by its own segmenter: export it again instead")
    seg_meta = read_segmenter_meta(Path(segmenter))
    new, old = bundle_dir / ".lungs.new", bundle_dir / ".lungs.old"
    for leftover in (new, old):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(segmenter, new)
    if (bundle_dir / "lungs").exists():
        (bundle_dir / "lungs").rename(old)
    new.rename(bundle_dir / "lungs")
    shutil.rmtree(old, ignore_errors=True)
    meta["segmenter"] = {"path": "lungs", "sha256": seg_meta["onnx_sha256"], "name": seg_meta.get("name")}
    write_meta(bundle_dir, meta)
    return meta
