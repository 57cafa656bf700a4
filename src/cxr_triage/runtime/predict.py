"""Classify images with a bundle (onnxruntime only; never imports torch): ``Prediction``s and heatmap overlays.

CSV, JSON and the CLI table are rendered from the predictions by ``formats.py``.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_triage.core.preprocess import IMAGE_SUFFIXES, ImageReadError, PreprocessSpec, load_grey, normalise, square
from cxr_triage.runtime.engine import Engine
from cxr_triage.runtime.prediction import ModelInfo, Prediction, png_bytes
from cxr_triage.runtime.reasons import findings

log = logging.getLogger(__name__)
__all__ = ["collect_inputs", "overlay", "png_bytes", "predict_arrays", "predict_bytes", "predict_grey", "predict_paths"]


def collect_inputs(items: Iterable[str]) -> list[str]:
    """Files as given, folders searched recursively for image files, globs expanded; order kept, no repeats."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            # a folder named like an image (x.png/) holding no images was meant as a file: report it as an error row
            out += found or ([item] if p.suffix.lower() in IMAGE_SUFFIXES else [])
        elif not p.exists() and any(ch in item for ch in "*?["):
            out += sorted(m for m in glob.glob(item, recursive=True) if Path(m).is_file())
        else:
            out.append(item)  # missing files become error rows, not a crash
    return list(dict.fromkeys(out))


def jet(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 with the jet colour map (no matplotlib on the predict path)."""
    x = np.clip(x, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * x - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (rgb * 255).astype(np.uint8)


def fit(grey: np.ndarray, max_side: int = 512) -> np.ndarray:
    """The grey image shrunk to at most ``max_side`` on its long side (aspect kept): what overlays are drawn on."""
    h, w = grey.shape
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return grey
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR))


def heat_field(h: int, w: int, cam: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The class activation map on an (h, w) image, in [0, 1].

    The map is placed where the model's square came from (inside the trimmed border; for ``crop`` the centre
    square, for ``pad`` the image part of the letterbox) and extended to the edges with its nearest values over
    the trimmed border and any cropped-away side, so the overlay covers the whole image and leaves no frame.
    """
    dy, dx = round(h * spec.border), round(w * spec.border)
    ih, iw = h - 2 * dy, w - 2 * dx

    def resized(rh: int, rw: int) -> np.ndarray:
        return np.asarray(Image.fromarray(cam.astype(np.float32)).resize((rw, rh), Image.Resampling.BILINEAR))

    if spec.resize == "crop" and ih != iw:
        s = min(ih, iw)
        y, x, region = dy + (ih - s) // 2, dx + (iw - s) // 2, resized(s, s)
    elif spec.resize == "pad" and ih != iw:
        s = max(ih, iw)
        y0, x0 = (s - ih) // 2, (s - iw) // 2
        y, x, region = dy, dx, resized(s, s)[y0 : y0 + ih, x0 : x0 + iw]
    else:
        y, x, region = dy, dx, resized(ih, iw)
    rh, rw = region.shape
    return np.pad(region, ((y, h - y - rh), (x, w - x - rw)), mode="edge").clip(0, 1)


def overlay(
    grey: np.ndarray, cam: np.ndarray, spec: PreprocessSpec, alpha: float = 0.4, max_side: int = 512
) -> np.ndarray:
    """The heatmap over the original image (its aspect ratio kept, the whole image covered): RGB uint8."""
    base = fit(grey, max_side).astype(np.float32)
    heat = heat_field(*base.shape, cam, spec)
    rgb = (1 - alpha * heat[..., None]) * base[..., None] + alpha * heat[..., None] * jet(heat)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _load(path: str, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray, float] | str:
    """(grey image, model-size square, colourfulness) or an error sentence."""
    try:
        info: dict[str, float] = {}
        grey = load_grey(path, info=info)
        return grey, square(grey, spec), info.get("colourfulness", 0.0)
    except ImageReadError as exc:
        return str(exc)
    except (OSError, MemoryError) as exc:
        return f"{path}: cannot read ({type(exc).__name__}: {exc})"


def predict_arrays(
    engine: Engine,
    greys: list[np.ndarray],
    squares: list[np.ndarray],
    lang: str = "en",
    heatmaps: bool = False,
    colours: list[float] | None = None,
    paths: list[str] | None = None,
) -> list[Prediction]:
    """Predictions for decoded images (grey originals and their model-size squares), optionally with heatmaps."""
    out = engine.run(normalise(np.stack(squares), engine.spec), colours)
    colours = colours if colours is not None else [0.0] * len(greys)
    paths = paths if paths is not None else [""] * len(greys)
    model = ModelInfo(**engine.info)
    preds = []
    for i, grey in enumerate(greys):
        probs = out.probs[i]
        found = findings(float(probs.max()), float(out.ood[i]), engine.meta, float(out.pixel[i]), float(colours[i]))
        extra = {}
        if heatmaps and out.decisions[i] != "rejected":
            extra["heatmap"] = overlay(grey, engine.cam(out.features[i], int(probs.argmax())), engine.spec)
        preds.append(Prediction.answer(paths[i], probs, found, float(out.ood[i]), model, lang, **extra))
    return preds


def predict_grey(
    engine: Engine,
    grey: np.ndarray,
    name: str,
    lang: str = "en",
    heatmap: bool = False,
    image: bool = False,
    colour: float = 0.0,
) -> Prediction:
    """One decoded grey image; ``image`` adds it (shrunk for display) to the prediction."""
    pred = predict_arrays(engine, [grey], [square(grey, engine.spec)], lang, heatmap, [colour], [name])[0]
    return pred.model_copy(update={"image": fit(grey)}) if image else pred


def predict_bytes(
    engine: Engine, data: bytes, name: str = "upload", lang: str = "en", heatmap: bool = False, image: bool = False
) -> Prediction:
    """One image given as bytes (the service's path); ``image`` adds the decoded input as shown under the heatmap.
    Raises ImageReadError for unreadable input."""
    info: dict[str, float] = {}
    grey = load_grey(data, name=name, info=info)
    return predict_grey(engine, grey, name, lang, heatmap, image, info.get("colourfulness", 0.0))


def predict_paths(
    engine: Engine,
    paths: list[str],
    lang: str = "en",
    heatmap_dir: Path | None = None,
    batch_size: int = 32,
    workers: int = 2,
    heatmaps: bool = False,
) -> Iterator[Prediction]:
    """A prediction for every path, in order (unreadable files: decision 'error'); decoding runs in threads while
    the previous batch is scored. ``heatmap_dir``: write overlay PNGs there; ``heatmaps``: keep them as arrays."""
    if heatmap_dir is not None:
        heatmap_dir.mkdir(parents=True, exist_ok=True)
    model = ModelInfo(**engine.info)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
        pending = pool.map(lambda b: [_load(p, engine.spec) for p in b], batches)
        for idx, (batch, loaded) in enumerate(zip(batches, pending, strict=True)):
            good = [(p, r) for p, r in zip(batch, loaded, strict=True) if not isinstance(r, str)]
            scored = iter(
                predict_arrays(
                    engine,
                    [r[0] for _, r in good],
                    [r[1] for _, r in good],
                    lang,
                    heatmaps or heatmap_dir is not None,
                    [r[2] for _, r in good],
                    [p for p, _ in good],
                )
                if good
                else []
            )
            for j, (p, r) in enumerate(zip(batch, loaded, strict=True)):
                if isinstance(r, str):
                    yield Prediction.unreadable(p, r, model, lang)
                    continue
                pred = next(scored)
                if heatmap_dir is not None and pred.heatmap is not None:
                    target = heatmap_dir / f"{idx * batch_size + j:05d}_{Path(p).stem}_heatmap.png"
                    Image.fromarray(pred.heatmap).save(target)
                    keep = pred.heatmap if heatmaps else None
                    pred = pred.model_copy(update={"heatmap_path": str(target), "heatmap": keep})
                yield pred
