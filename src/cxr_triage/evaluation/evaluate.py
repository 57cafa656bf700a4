"""Evaluate a bundle (or a checkpoint) on labelled images: predictions.csv, metrics.json and report.html.

``data`` is a manifest.csv (rows of one split), a dataset folder in the Kaggle layout, or a folder holding a
``labels.csv`` (``file,label[,source]``; rows whose label names no class are scored but unlabelled).
Predictions go through ``predict_paths`` (onnxruntime), so the numbers describe what the predictor does;
unreadable files are counted, never fatal. The headline metrics score the arg-max class of every readable
labelled image whatever its decision; the "abstention" section gives the accepted-only view.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from cxr_triage.core.classes import CLASS_IDS, class_from_name, normalise_name
from cxr_triage.core.preprocess import ImageReadError
from cxr_triage.core.safe_text import csv_cell
from cxr_triage.data.manifest import DatasetError, atomic_write_text, find_images, load_manifest, read_origins
from cxr_triage.evaluation.metrics import LOGIT_COLS, P_COLS, summarise
from cxr_triage.evaluation.report import attention_gallery, error_gallery, render_report
from cxr_triage.runtime.bundle import write_meta
from cxr_triage.runtime.engine import BundleError, read_bundle_meta
from cxr_triage.runtime.predictor import Predictor

__all__ = ["evaluate", "load_data", "ood_check", "predict_frame", "record_metrics", "render_report"]

log = logging.getLogger(__name__)
CHECKPOINT_SUFFIXES = {".pt", ".pth", ".ckpt"}
LABEL_ALIASES = {"no_finding": "normal"}  # labels.csv spellings beyond the class names
FRAME_COLS = ["path", "abspath", "true", "origin", "copy_px"]
OOD_TARGET = 0.95  # non-chest images the rejection gate must reject
SKIMAGE_2D = (
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "rocket",
    "coins",
    "moon",
    "page",
    "text",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "microaneurysms",
    "retina",
    "skin",
    "lily",
    "cell",
    "clock",
    "brick",
    "grass",
    "gravel",
    "checkerboard",
    "colorwheel",
    "logo",
    "shepp_logan_phantom",
)
SKIMAGE_3D = {"brain": ((2, 5, 8), None), "cells3d": ((15, 30, 45), 1), "kidney": ((4, 8, 12), None)}
SKIMAGE_DOWNLOAD = {"brain", "cells3d", "kidney", "skin", "lily"}  # not shipped: fetched with pooch


def _class_or_blank(name: object) -> str:
    """A label as a class id, or '' when it names no class (unlabelled)."""
    text = "" if pd.isna(name) else str(name)
    return class_from_name(text) or LABEL_ALIASES.get(normalise_name(text), "")


def _frame(df: pd.DataFrame) -> pd.DataFrame:
    """The columns evaluation needs, with blanks for unknown origin / copy_px."""
    out = df.copy()
    for col, default in (("origin", "unknown"), ("copy_px", "")):
        out[col] = out[col].fillna(default).astype(str) if col in out.columns else default
    out["origin"] = out["origin"].replace("", "unknown")
    out["true"] = out["label"].map(_class_or_blank)
    return out[FRAME_COLS].reset_index(drop=True)


def _from_manifest(path: Path, split: str) -> pd.DataFrame:
    df = load_manifest(path)
    if split != "all":
        if split not in set(df["split"]):
            raise DatasetError(
                f"{path} has no rows in split {split!r}; splits there: {sorted(set(df['split']))}, or use 'all'"
            )
        df = df[df["split"] == split]
    return _frame(df)


def _from_folder(root: Path) -> pd.DataFrame:
    files = find_images(root)
    df = pd.DataFrame(files, columns=["path", "label"])
    origins = read_origins(root)
    if "path" in origins.columns and len(origins):
        df = df.merge(origins.drop_duplicates("path"), on="path", how="left")
    elif len(origins):  # <Class>.metadata.xlsx: matched by file stem
        stems = df["path"].map(lambda p: Path(p).stem.lower())
        df["origin"] = stems.map(origins.drop_duplicates("stem").set_index("stem")["origin"])
    df["abspath"] = [str(root / p) for p in df["path"]]
    return _frame(df)


def _from_labels(csv: Path) -> pd.DataFrame:
    tab = pd.read_csv(csv, dtype=str, keep_default_na=False)
    if not {"file", "label"} <= set(tab.columns):
        raise DatasetError(f"{csv} needs columns 'file' and 'label' (got {list(tab.columns)})")
    tab = tab.rename(columns={"file": "path"})
    if "origin" not in tab.columns and "source" in tab.columns:
        tab["origin"] = tab["source"]
    tab["abspath"] = [p if Path(p).is_absolute() else str(csv.parent / p) for p in tab["path"]]
    return _frame(tab)


def load_data(data: Path, split: str = "test") -> tuple[pd.DataFrame, str]:
    """Rows to score (path, abspath, true class id or '', origin, copy_px) and the input kind.

    The kind is "manifest" (rows of ``split``; "all" for every row), "folder" (Kaggle layout, all rows)
    or "labels" (a folder with labels.csv, or such a CSV itself).
    """
    data = Path(data)
    if not data.exists():
        raise DatasetError(
            f"data {data} does not exist; give a manifest.csv, a dataset folder in the Kaggle "
            "layout or a folder with a labels.csv"
        )
    if data.is_file():
        columns = set(pd.read_csv(data, nrows=0).columns)
        if {"file", "label"} <= columns and "split" not in columns:
            return _from_labels(data), "labels"
        return _from_manifest(data, split), "manifest"
    if (data / "labels.csv").exists():
        return _from_labels(data / "labels.csv"), "labels"
    return _from_folder(data), "folder"


def resolve_bundle(model: Path, workdir: Path, manifest: Path | None = None, export: Exporter | None = None) -> Path:
    """A bundle folder as is; a checkpoint is exported to ``workdir/bundle`` first with ``export`` (training's
    ``export_bundle``, which imports torch; evaluation never imports training, its caller hands the exporter in)."""
    model = Path(model)
    if not model.exists():
        raise BundleError(
            f"model {model} does not exist; give a bundle folder (with model.json) or a checkpoint (.pt/.ckpt)"
        )
    if model.is_dir():
        return model
    if model.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise BundleError(f"{model} is neither a bundle folder nor a checkpoint (.pt/.pth/.ckpt)")
    if export is None:
        raise BundleError(
            f"{model} is a checkpoint: export it to a bundle first (cxr-triage export), evaluate it with "
            "`cxr-triage evaluate`, or pass export=cxr_triage.training.export.export_bundle"
        )
    log.info("exporting %s to a temporary bundle", model)
    export(model, workdir / "bundle", manifest=manifest, quantize="none")  # as trained: no int8
    return workdir / "bundle"


class Exporter(Protocol):
    """Checkpoint -> bundle folder: the signature of ``cxr_triage.training.export.export_bundle``."""

    def __call__(self, checkpoint: Path, out: Path, /, *, manifest: Path | None, quantize: str) -> Any: ...


def predict_frame(predictor: Predictor, frame: pd.DataFrame, batch_size: int = 32) -> pd.DataFrame:
    """The rows plus pred, confidence, p_* (calibrated, unrounded), logit_*, decision, error, ood_score."""
    scored = list(predictor.predict_files(list(frame["abspath"]), batch_size=batch_size))
    preds = [s.prediction for s in scored]
    out = frame.copy()
    out["decision"] = [p.decision for p in preds]
    out["error"] = [p.error or "" for p in preds]
    out["ood_score"] = [np.nan if p.ood_score is None else p.ood_score for p in preds]
    out["lung_attention"] = [np.nan if p.lung_attention is None else p.lung_attention for p in preds]
    ok = (out["decision"] != "error").to_numpy()
    ran = [s for s in scored if s.logits is not None]
    logits = np.stack([s.logits for s in ran]) if ran else np.zeros((0, len(CLASS_IDS)), np.float32)
    probs = np.stack([s.probs for s in ran]) if ran else np.zeros((0, len(CLASS_IDS)), np.float32)
    if len(logits) != ok.sum():
        raise RuntimeError(f"scored {len(logits)} images for {ok.sum()} readable rows")
    for cols, values in ((P_COLS, probs), (LOGIT_COLS, logits)):
        block = np.full((len(out), len(CLASS_IDS)), np.nan)
        block[ok] = values
        out[cols] = block
    out["confidence"] = out[P_COLS].max(axis=1)
    # the arg-max class of every readable image, rejected ones included (their predictions carry no label)
    out["pred"] = np.where(ok, np.array(CLASS_IDS)[np.nan_to_num(out[P_COLS].to_numpy()).argmax(axis=1)], "")
    return out


def ood_images(seed: int = 0) -> tuple[list[tuple[str, str, np.ndarray]], list[str]]:
    """(name, source, array) of non-chest images: scikit-image samples that load offline, blanks and noise;
    and the names skipped (not installed, or needing a download)."""
    images: list[tuple[str, str, np.ndarray]] = []
    skipped: list[str] = []
    try:
        from skimage import data as skdata
    except ImportError:
        skdata, skipped = None, ["scikit-image (not installed)"]
    for name in (*SKIMAGE_2D, *SKIMAGE_3D) if skdata is not None else ():
        if name in SKIMAGE_DOWNLOAD and importlib.util.find_spec("pooch") is None:
            skipped.append(f"{name} (needs a download)")
            continue
        try:
            arr = np.asarray(getattr(skdata, name)())
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # absent here, or no network; under pytest scikit-image raises Skipped
            skipped.append(f"{name} ({type(exc).__name__})")
            continue
        if name in SKIMAGE_3D:
            slices, channel = SKIMAGE_3D[name]
            images += [
                (f"{name} slice {i}", "scikit-image", arr[i] if channel is None else arr[i, channel]) for i in slices
            ]
        else:
            images.append((name, "scikit-image", arr))
    rng, s = np.random.default_rng(seed), 256
    images += [
        (name, "generated", arr)
        for name, arr in (
            ("black", np.zeros((s, s), np.uint8)),
            ("white", np.full((s, s), 255, np.uint8)),
            ("grey", np.full((s, s), 128, np.uint8)),
            ("uniform noise", rng.integers(0, 256, (s, s), np.uint8)),
            ("gaussian noise", np.clip(rng.normal(128, 40, (s, s)), 0, 255).astype(np.uint8)),
            ("colour noise", rng.integers(0, 256, (s, s, 3), np.uint8)),
        )
    ]
    return images, skipped


def ood_check(predictor: Predictor, target: float = OOD_TARGET, seed: int = 0) -> dict[str, Any]:
    """Run the bundle over non-chest images (``ood_images``): rejected fraction overall and per image."""
    images, skipped = ood_images(seed)
    items, kept = [], []
    for name, source, arr in images:
        try:
            items.append(predictor.decode(arr))
            kept.append((name, source))
        except ImageReadError as exc:
            skipped.append(f"{name} ({exc})")
    preds = [s.prediction for i in range(0, len(items), 32) for s in predictor.score(items[i : i + 32])]
    per_image = [
        {
            "name": name,
            "source": source,
            "ood_score": float(p.ood_score or 0.0),
            "decision": p.decision,
            "rejected": p.decision == "rejected",
            "label": p.top(1)[0][0],  # the arg-max class, also for rejected images
            "confidence": p.top(1)[0][1],
        }
        for (name, source), p in zip(kept, preds, strict=True)
    ]
    n_rej = sum(r["rejected"] for r in per_image)
    frac = n_rej / len(per_image) if per_image else 0.0
    log.info("OOD check: %d of %d non-chest images rejected (%.0f%%)", n_rej, len(per_image), 100 * frac)
    return {
        "n": len(per_image),
        "rejected": n_rej,
        "rejected_fraction": frac,
        "target": target,
        "passed": frac >= target,
        "threshold": predictor.meta.ood.threshold,
        "images": per_image,
        "skipped": skipped,
    }


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers worth keeping with a bundle (model.json "test_metrics")."""
    keys = ("n", "accuracy", "macro_f1", "covid_recall", "normal_specificity_vs_covid")
    out = {k: metrics[k] for k in keys if k in metrics}
    out |= {
        "split": metrics["split"],
        "data": metrics["data"],
        "evaluated": metrics["evaluated"],
        "ci95": metrics.get("ci", {}),
        "f1": {c: v["f1"] for c, v in metrics.get("per_class", {}).items()},
        "origin_accuracy": {
            o: {"n": g["n"], "accuracy": g.get("accuracy")} for o, g in metrics.get("by_origin", {}).items()
        },
    }
    return out


def record_metrics(bundle_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write ``headline(metrics)`` into the bundle's model.json as "test_metrics" (atomically); return it."""
    bundle_dir = Path(bundle_dir)
    meta = read_bundle_meta(bundle_dir)  # refuse an altered bundle before writing to it
    meta["test_metrics"] = headline(metrics)
    write_meta(bundle_dir, meta)  # and seal it again
    log.info("test metrics recorded in %s", bundle_dir / "model.json")
    return meta["test_metrics"]


def _write(out_dir: Path, preds: pd.DataFrame, metrics: dict[str, Any]) -> None:
    cols = [
        "path",
        "true",
        "pred",
        "confidence",
        *P_COLS,
        "decision",
        "error",
        "ood_score",
        "lung_attention",
        "origin",
        "copy_px",
        *LOGIT_COLS,
    ]
    table = preds[cols].copy()
    text = [c for c in table.columns if table[c].dtype == object or isinstance(table[c].dtype, pd.StringDtype)]
    for c in text:  # text cells (object in pandas 2, str in pandas 3) that look like formulas get a leading '
        table[c] = table[c].map(csv_cell)
    atomic_write_text(out_dir / "predictions.csv", table.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")


def evaluate(
    model: Path,
    data: Path,
    split: str = "test",
    out_dir: Path = Path("runs/eval"),
    bootstrap: int = 1000,
    seed: int = 0,
    gallery: int = 12,
    record: bool = False,
    ood: bool | None = None,
    batch_size: int = 32,
    export: Exporter | None = None,
) -> dict[str, Any]:
    """Score ``model`` on ``data``; write predictions.csv, metrics.json and report.html to ``out_dir``.

    ``ood`` (default: on for manifest data) adds the non-chest-image rejection check; ``record`` stores the
    headline numbers in the bundle's model.json (bundle folders only). A checkpoint ``model`` needs ``export``
    (``cxr_triage.training.export.export_bundle``; the CLI passes it) to become a bundle first.
    """
    start = time.perf_counter()
    model, data, out_dir = Path(model), Path(data), Path(out_dir)
    if not model.exists():
        resolve_bundle(model, out_dir)  # raises the clear error
    if record and not model.is_dir():
        raise ValueError(
            "record=True writes into a bundle's model.json; export the checkpoint to a bundle "
            "first (cxr-triage export) and evaluate that"
        )
    frame, kind = load_data(data, split)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cxr-eval-")))
        bundle = resolve_bundle(model, tmp, data if kind == "manifest" else None, export)
        predictor = Predictor(bundle)
        t_pred = time.perf_counter()
        preds = predict_frame(predictor, frame, batch_size)
        t_pred = time.perf_counter() - t_pred
        metrics = {
            "model": str(model),
            "bundle": predictor.info,
            "data": str(data),
            "kind": kind,
            "split": split if kind == "manifest" else "all",
            "evaluated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **summarise(preds, predictor.meta, bootstrap, seed),
        }
        if ood if ood is not None else kind == "manifest":
            metrics["ood"] = ood_check(predictor)
        metrics["timing"] = {
            "predict_s": round(t_pred, 2),
            "images_per_s": round(len(preds) / max(t_pred, 1e-9), 1),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        items = error_gallery(predictor, preds, gallery)
        low_attention = attention_gallery(predictor, preds, gallery)
        if predictor.segmenter is not None:
            seg = predictor.segmenter
            metrics["segmenter"] = {**seg.info, "heldout": seg.meta.get("heldout", {})}
        metrics["timing"]["total_s"] = round(time.perf_counter() - start, 2)
        _write(out_dir, preds, metrics)
        render_report(metrics, preds, out_dir / "report.html", items, low_attention)
        if record:
            record_metrics(bundle, metrics)
    log.info(
        "evaluated %d images (%s) in %.1f s: accuracy %s, macro-F1 %s -> %s",
        len(preds),
        kind,
        time.perf_counter() - start,
        metrics.get("accuracy"),
        metrics.get("macro_f1"),
        out_dir,
    )
    return metrics
