"""Classify image files with a bundle (onnxruntime only; never imports torch): rows, advice, heatmap overlays."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.core.lungs import (
    LUNG_GATE,
    input_mask,
    lung_attention,
    lung_gate,
    lung_stats,
    outline,
    resize_mask,
    view_box,
)
from cxr_triage.core.preprocess import (
    ImageReadError,
    PreprocessSpec,
    load_grey,
    model_square,
    normalise,
    square,
)
from cxr_triage.core.safe_text import csv_cell
from cxr_triage.runtime.advice import advice
from cxr_triage.runtime.engine import Engine
from cxr_triage.runtime.inputs import scan_inputs

log = logging.getLogger(__name__)
NON_FINITE = "the model gave non-finite probabilities (NaN or infinity) for this image; check the model bundle"
CSV_COLUMNS = [
    "path",
    "label",
    "confidence",
    *[f"p_{c}" for c in CLASS_IDS],
    "decision",
    "error",
    "lung_attention",
    "lung_note",
]


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


def overlay(
    grey: np.ndarray,
    cam: np.ndarray,
    spec: PreprocessSpec,
    alpha: float = 0.4,
    max_side: int = 512,
    lungs: np.ndarray | None = None,
) -> np.ndarray:
    """The heatmap over the original image (its aspect ratio kept): RGB uint8. ``lungs`` (the image's lung mask)
    draws the lung outline and, for lung-view classifiers, places the map over the lungs' box."""
    base = fit(grey, max_side).astype(np.float32)
    h, w = base.shape
    heat = np.zeros((h, w), np.float32)
    small = resize_mask(lungs, (h, w)) if lungs is not None else None
    dy, dx = round(h * spec.border), round(w * spec.border)
    ih, iw = h - 2 * dy, w - 2 * dx
    if spec.lungs != "none":
        y0, y1, x0, x1 = view_box(small if small is not None else np.zeros((h, w), bool), spec.lung_margin)
        region = (y0, x0, y1 - y0, x1 - x0)
    elif spec.resize == "stretch" or ih == iw:
        region = (dy, dx, ih, iw)
    elif spec.resize == "crop":
        s = min(ih, iw)
        region = (dy + (ih - s) // 2, dx + (iw - s) // 2, s, s)
    else:  # pad: the square covered the whole image plus bars; take the image part of the map
        s = max(ih, iw)
        big = np.asarray(Image.fromarray(cam).resize((s, s), Image.Resampling.BILINEAR))
        y0, x0 = (s - ih) // 2, (s - iw) // 2
        heat[dy : dy + ih, dx : dx + iw] = big[y0 : y0 + ih, x0 : x0 + iw]
        region = None
    if region is not None:
        y, x, rh, rw = region
        heat[y : y + rh, x : x + rw] = np.asarray(Image.fromarray(cam).resize((rw, rh), Image.Resampling.BILINEAR))
    rgb = (1 - alpha * heat[..., None]) * base[..., None] + alpha * heat[..., None] * jet(heat)
    if small is not None:
        rgb[outline(small, width=max(1, round(max(h, w) / 256)))] = (0, 255, 255)  # lung outline in cyan
    return np.clip(rgb, 0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def error_row(path: str, reason: str) -> dict[str, Any]:
    return {
        "path": path,
        "label": "",
        "confidence": "",
        **{f"p_{c}": "" for c in CLASS_IDS},
        "decision": "error",
        "error": reason,
    }


def _load(path: str, engine: Engine) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, float] | str:
    """(grey image, whole-image model square or None, segmenter square or None, colourfulness) or an error sentence.
    Runs in loader threads: everything per image that needs no network."""
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


def lung_masks(engine: Engine, greys: list[np.ndarray], seg_squares: list | None = None) -> list[np.ndarray] | None:
    """Each image's lung mask at its own size (None without a segmenter)."""
    seg = engine.segmenter
    if seg is None:
        return None
    squares = [
        q if q is not None else square(g, seg.spec)
        for g, q in zip(greys, seg_squares or [None] * len(greys), strict=True)
    ]
    return [seg.to_image(m, g.shape) for m, g in zip(seg.square_masks(squares), greys, strict=True)]


def _with_lung_gate(decision: str, mask: np.ndarray, meta: dict[str, Any]) -> tuple[str, str]:
    """The classifier's decision after the lung gate (a stricter decision wins), and the gate's reason."""
    gate = {**LUNG_GATE, **(meta.get("lung_gate") or {})}
    override, reason = lung_gate(lung_stats(mask), gate["min_area"], gate["max_area"])
    order = ("accept", "uncertain", "rejected")
    if override is not None and decision in order and order.index(override) > order.index(decision):
        return override, reason
    return decision, reason if override is not None else ""


def predict_arrays(
    engine: Engine,
    greys: list[np.ndarray],
    squares: list[np.ndarray | None] | None = None,
    lang: str = "en",
    heatmaps: bool = False,
    colours: list[float] | None = None,
    seg_squares: list[np.ndarray | None] | None = None,
) -> list[dict[str, Any]]:
    """Rows (CSV fields + advice, lung attention, optionally a heatmap RGB array) for decoded images."""
    masks = lung_masks(engine, greys, seg_squares)
    if engine.spec.lungs != "none" or squares is None or any(q is None for q in squares):
        squares = [model_square(g, engine.spec, m) for g, m in zip(greys, masks or [None] * len(greys), strict=True)]
    out = engine.run(normalise(np.stack(squares), engine.spec), colours)
    rows = []
    for i, grey in enumerate(greys):
        p, k = out.probs[i], int(out.probs[i].argmax())
        if out.decisions[i] == "error":  # non-finite probabilities: never a label, never accept
            rows.append({key: v for key, v in error_row("", NON_FINITE).items() if key != "path"})
            continue
        decision, lung_note, attention = out.decisions[i], "", ""
        cam = engine.cam(out.features[i], k)
        if masks is not None:
            decision, lung_note = _with_lung_gate(decision, masks[i], engine.meta)
            attention = round(lung_attention(cam, input_mask(masks[i], engine.spec)), 3)
        row = {
            "label": CLASS_IDS[k],
            "confidence": round(float(p[k]), 6),
            **{f"p_{c}": round(float(v), 6) for c, v in zip(CLASS_IDS, p, strict=True)},
            "decision": decision,
            "error": "",
            "ood_score": round(float(out.ood[i]), 3),
            "lung_attention": attention,
            "lung_note": lung_note,
            "advice": advice(CLASS_IDS[k], decision, lang),
        }
        if heatmaps and decision != "rejected":
            row["heatmap"] = overlay(grey, cam, engine.spec, lungs=masks[i] if masks is not None else None)
        rows.append(row)
    return rows


def predict_bytes(
    engine: Engine, data: bytes, name: str = "upload", lang: str = "en", heatmap: bool = False, image: bool = False
) -> dict[str, Any]:
    """One image given as bytes (the service's path); ``image`` adds the decoded input as shown under the heatmap.
    Raises ImageReadError for unreadable input."""
    info: dict[str, float] = {}
    grey = load_grey(data, name=name, info=info)
    rows = predict_arrays(engine, [grey], None, lang, heatmap, [info.get("colourfulness", 0.0)])
    if image:
        rows[0]["image"] = fit(grey)
    return {"path": name, **rows[0]}


def predict_paths(
    engine: Engine,
    paths: list[str],
    lang: str = "en",
    heatmap_dir: Path | None = None,
    batch_size: int = 32,
    workers: int = 2,
) -> Iterator[dict[str, Any]]:
    """Rows for every path, in order; decoding runs in threads while the previous batch is scored."""
    if heatmap_dir is not None:
        heatmap_dir.mkdir(parents=True, exist_ok=True)
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
                    heatmap_dir is not None,
                    [r[3] for _, r in good],
                    [r[2] for _, r in good],
                )
                if good
                else []
            )
            for j, (p, r) in enumerate(zip(batch, loaded, strict=True)):
                if isinstance(r, str):
                    yield error_row(p, r)
                    continue
                row = {"path": p, **next(scored)}
                heat = row.pop("heatmap", None)
                if heat is not None:
                    target = heatmap_dir / f"{idx * batch_size + j:05d}_{Path(p).stem}_heatmap.png"
                    Image.fromarray(heat).save(target)
                    row["heatmap_path"] = str(target)
                yield row


def write_rows(rows: list[dict[str, Any]], fmt: str, out: io.TextIOBase) -> None:
    """CSV (the DESIGN.md columns; cells that start like a formula get a leading ') or JSON of rows to a stream."""
    if fmt == "csv":
        cells = [{k: csv_cell(v) for k, v in r.items()} for r in rows]
        # csv quotes a field holding a character of the line terminator; a bare CR elsewhere would split the row
        cr = any(isinstance(v, str) and "\r" in v for r in cells for v in r.values())
        w = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\r\n" if cr else "\n")
        w.writeheader()
        w.writerows(cells)
    elif fmt == "json":
        json.dump(rows, out, ensure_ascii=False, indent=2)
        out.write("\n")
    else:
        raise ValueError(f"unknown format {fmt!r}; use table, csv or json")
