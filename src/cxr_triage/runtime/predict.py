"""Classify images with a bundle (onnxruntime only; never imports torch): ``Prediction``s and heatmap overlays.

CSV, JSON and the CLI table are rendered from the predictions by ``formats.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_triage.core.lungs import LUNG_GATE, LungStats, outline, resize_mask, view_box
from cxr_triage.core.preprocess import ImageReadError, PreprocessSpec, load_grey, model_square, normalise, square
from cxr_triage.runtime.engine import Engine
from cxr_triage.runtime.inputs import scan_inputs
from cxr_triage.runtime.prediction import ModelInfo, Prediction, png_bytes
from cxr_triage.runtime.reasons import findings, lung_gate_findings, lungs_vouch

log = logging.getLogger(__name__)
__all__ = ["collect_inputs", "overlay", "png_bytes", "predict_arrays", "predict_bytes", "predict_grey", "predict_paths"]


NON_FINITE = "the model gave non-finite probabilities (NaN or infinity) for this image; check the model bundle"


def error_row(path: str, reason: str, model: ModelInfo | None = None, lang: str = "en") -> Prediction:
    """The prediction of an input that could not be read (decision 'error', no label, the reason)."""
    return Prediction.unreadable(path, reason, model or ModelInfo(name="", version="", sha256=""), lang)


def collect_inputs(items: Iterable[str]) -> list[str]:
    """Files as given, folders searched recursively, globs expanded; order kept, no repeats (see ``runtime.inputs``:
    every named path and every scanned entry that may be an image gets a row)."""
    return scan_inputs(items).paths


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
    grey: np.ndarray,
    cam: np.ndarray,
    spec: PreprocessSpec,
    alpha: float = 0.4,
    max_side: int = 512,
    lungs: np.ndarray | None = None,
) -> np.ndarray:
    """The heatmap over the original image (its aspect ratio kept, the whole image covered): RGB uint8.
    ``lungs`` (the image's lung mask) draws the lung outline; lung-view classifiers' maps cover the lungs' box."""
    base = fit(grey, max_side).astype(np.float32)
    h, w = base.shape
    small = resize_mask(lungs, (h, w)) if lungs is not None else None
    if spec.lungs != "none":
        y0, y1, x0, x1 = view_box(small if small is not None else np.zeros((h, w), bool), spec.lung_margin)
        heat = np.zeros((h, w), np.float32)
        cam_img = Image.fromarray(cam.astype(np.float32)).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
        heat[y0:y1, x0:x1] = np.asarray(cam_img).clip(0, 1)
    else:
        heat = heat_field(h, w, cam, spec)
    rgb = (1 - alpha * heat[..., None]) * base[..., None] + alpha * heat[..., None] * jet(heat)
    if small is not None:
        rgb[outline(small, width=max(1, round(max(h, w) / 256)))] = (0, 255, 255)  # lung outline in cyan
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _load(path: str, engine: Engine) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, float] | str:
    """(grey image shrunk by ``fit``, whole-image model square or None, segmenter square or None, colourfulness) or
    an error sentence. Runs in loader threads: everything per image that needs no network."""
    try:
        info: dict[str, float] = {}
        grey = load_grey(path, info=info)
        sq = square(grey, engine.spec) if engine.spec.lungs == "none" else None
        seg_sq = square(grey, engine.segmenter.spec) if engine.segmenter is not None else None
        return fit(grey), sq, seg_sq, info.get("colourfulness", 0.0)  # overlays need no more than fit()
    except ImageReadError as exc:
        return str(exc)
    except Exception as exc:  # load_grey raises only ImageReadError; this keeps the batch going whatever happens
        return f"{path}: cannot read ({type(exc).__name__})"


def lung_masks(
    engine: Engine, greys: list[np.ndarray], seg_squares: list | None = None
) -> tuple[list[np.ndarray], list[LungStats]] | None:
    """Each image's cleaned lung mask at the segmenter's square size and its statistics (None without a
    segmenter); the segmenter's ``to_image`` / ``in_input`` bring a mask to the image or the classifier input."""
    seg = engine.segmenter
    if seg is None:
        return None
    squares = [
        q if q is not None else square(g, seg.spec)
        for g, q in zip(greys, seg_squares or [None] * len(greys), strict=True)
    ]
    return seg.square_lungs(squares)


def predict_arrays(
    engine: Engine,
    greys: list[np.ndarray],
    squares: list[np.ndarray | None] | None = None,
    lang: str = "en",
    heatmaps: bool = False,
    colours: list[float] | None = None,
    paths: list[str] | None = None,
    seg_squares: list[np.ndarray | None] | None = None,
) -> list[Prediction]:
    """Predictions for decoded images (grey originals and, optionally, their model-size squares), optionally with
    heatmaps; with a lung segmenter, also lung attention and the lung gate."""
    lungs = lung_masks(engine, greys, seg_squares)  # at the segmenter's size: statistics and attention need no more
    small, stats = lungs if lungs is not None else (None, None)
    seg = engine.segmenter
    full: list[np.ndarray | None] = [None] * len(greys)  # at each image's size: lung views and overlays only
    if small is not None and (engine.spec.lungs != "none" or heatmaps):
        full = [seg.to_image(m, g.shape) for m, g in zip(small, greys, strict=True)]
    if engine.spec.lungs != "none" or squares is None or any(q is None for q in squares):
        squares = [model_square(g, engine.spec, m) for g, m in zip(greys, full, strict=True)]
    out = engine.run(normalise(np.stack(squares), engine.spec), colours)
    colours = colours if colours is not None else [0.0] * len(greys)
    paths = paths if paths is not None else [""] * len(greys)
    model = ModelInfo(**engine.info)
    gate = {**LUNG_GATE, **(engine.meta.get("lung_gate") or {})}
    cams: list = [None] * len(greys)  # class-activation maps: for lung attention and heatmaps only
    if small is not None or heatmaps:
        cams = [engine.cam(f, int(p.argmax())) for f, p in zip(out.features, out.probs, strict=True)]
    preds = []
    for i, grey in enumerate(greys):
        probs = out.probs[i]
        if out.decisions[i] == "error":  # non-finite probabilities: never a label, never accept
            preds.append(Prediction.unreadable(paths[i], NON_FINITE, model, lang))
            continue
        vouch = stats is not None and lungs_vouch(stats[i], gate)
        confidence, ood, pixel = float(probs.max()), float(out.ood[i]), float(out.pixel[i])
        found = findings(confidence, ood, engine.meta, pixel, float(colours[i]), lungs_vouch=vouch)
        extra: dict = {}
        if small is not None and stats is not None:
            found = lung_gate_findings(stats[i], gate) + found
            extra["lung_attention"] = round(seg.attention(cams[i], small[i], grey.shape, engine.spec), 3)
        pred = Prediction.answer(paths[i], probs, found, float(out.ood[i]), model, lang, **extra)
        if heatmaps and pred.decision != "rejected":
            heat = overlay(grey, cams[i], engine.spec, lungs=full[i])
            pred = pred.model_copy(update={"heatmap": heat})
        preds.append(pred)
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
    pred = predict_arrays(engine, [grey], None, lang, heatmap, [colour], [name])[0]
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
        pending = pool.map(lambda b: [_load(p, engine) for p in b], batches)
        for idx, (batch, loaded) in enumerate(zip(batches, pending, strict=True)):
            good = [(p, r) for p, r in zip(batch, loaded, strict=True) if not isinstance(r, str)]
            scored = iter(
                predict_arrays(
                    engine,
                    [r[0] for _, r in good],
                    [r[1] for _, r in good],
                    lang,
                    heatmaps or heatmap_dir is not None,
                    [r[3] for _, r in good],
                    [p for p, _ in good],
                    [r[2] for _, r in good],
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
