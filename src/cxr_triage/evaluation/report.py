"""The evaluation report: figures (matplotlib Agg canvas, no pyplot state), tables, the error gallery with
heatmaps, and one self-contained report.html (every image embedded as a base64 PNG)."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_curve

from cxr_triage.core.classes import CLASS_IDS, DISPLAY_NAMES
from cxr_triage.core.preprocess import ImageReadError
from cxr_triage.data.eda import template_env
from cxr_triage.data.manifest import atomic_write_text
from cxr_triage.evaluation.metrics import P_COLS
from cxr_triage.runtime.predict import png_bytes
from cxr_triage.runtime.predictor import Predictor

log = logging.getLogger(__name__)
GALLERY_PX = 256
NAMES = [DISPLAY_NAMES[c] for c in CLASS_IDS]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _fig_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return png_uri(buf.getvalue())


def plot_confusion(metrics: dict[str, Any]) -> Figure:
    """Confusion matrix as counts and row-normalised (rows = true classes present, columns = all classes)."""
    cm = np.asarray(metrics["confusion"], float)
    rows = [i for i in range(len(CLASS_IDS)) if cm[i].sum() > 0]
    cm = cm[rows]
    norm = cm / cm.sum(1, keepdims=True)
    fig = _figure(12, 1.6 + 0.9 * len(rows))
    for ax, values, title, fmt in zip(
        fig.subplots(1, 2),
        (cm, norm),
        ("Counts", "Row-normalised (recall)"),
        ("{:.0f}", "{:.2f}"),
        strict=True,
    ):
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, fmt.format(v), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(CLASS_IDS)), labels=[n.replace(" ", "\n") for n in NAMES])
        ax.set_yticks(range(len(rows)), labels=[NAMES[i] for i in rows])
        ax.set(xlabel="predicted", ylabel="true", title=title)
    return fig


def plot_roc(preds: pd.DataFrame, auc: dict[str, float]) -> Figure:
    """One-vs-rest ROC curve of each class present (calibrated probabilities)."""
    lab = preds[(preds["true"] != "") & (preds["decision"] != "error")]
    fig = _figure(6, 5)
    ax = fig.subplots()
    for i, c in enumerate(CLASS_IDS):
        if c in auc:
            fpr, tpr, _ = roc_curve(lab["true"] == c, lab[P_COLS[i]])
            ax.plot(fpr, tpr, label=f"{DISPLAY_NAMES[c]} (AUC {auc[c]:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="ROC, one class vs the rest",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=9)
    return fig


def plot_reliability(cal: dict[str, Any]) -> Figure:
    """Reliability diagrams of raw softmax(logits) and of the calibrated probabilities."""
    fig = _figure(11, 4.4)
    for ax, key, title in zip(
        fig.subplots(1, 2),
        ("raw", "calibrated"),
        ("Before (raw softmax)", f"After (T = {cal['temperature']:.3g}, class bias)"),
        strict=True,
    ):
        bins = [b for b in cal[f"reliability_{key}"] if b["n"]]
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        ax.bar(centres, [b["accuracy"] for b in bins], width=1 / cal["bins"], edgecolor="white", label="accuracy")
        ax.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            "o",
            color="C3",
            label="bin: mean confidence, accuracy",
        )
        ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="confidence (top class)",
            ylabel="accuracy",
            title=f"{title}: ECE {cal[f'ece_{key}']:.3f}",
        )
        ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_risk_coverage(ab: dict[str, Any]) -> Figure:
    """Error rate of the most confident fraction of images, with the bundle's operating point."""
    fig = _figure(6.5, 4.5)
    ax = fig.subplots()
    ax.plot(ab["curve"]["coverage"], ab["curve"]["risk"], label="risk-coverage")
    label = f"operating point (confidence ≥ {ab['threshold']:.3f}): coverage {ab['coverage_confidence']:.1%}"
    if ab.get("accuracy_confidence") is not None:
        ax.plot(
            [ab["coverage_confidence"]],
            [1 - ab["accuracy_confidence"]],
            "o",
            color="C3",
            markersize=8,
            label=label,
        )
    else:
        ax.axvline(ab["coverage_confidence"], color="C3", label=label)
    if ab.get("target_accuracy") is not None:
        ax.axhline(1 - ab["target_accuracy"], ls=":", color="grey", label="target risk (validation)")
    ax.set(
        xlabel="coverage (fraction of images answered)",
        ylabel="risk (error rate)",
        xlim=(-0.01, 1.01),
        title="Risk-coverage",
    )
    ax.legend(fontsize=8)
    return fig


def heatmap_gallery(predictor: Predictor, rows: pd.DataFrame, caption: Callable[[Any], str]) -> list[dict[str, str]]:
    """Heatmap overlays (predicted class, lung outline when there is a segmenter) with captions, for frame rows."""
    loaded = []
    for row in rows.itertuples():
        try:
            item = predictor.decode(row.abspath)
        except (ImageReadError, OSError):
            continue
        item.colour = 0.0  # the gallery draws every image's map; the colour gate is not what it shows
        loaded.append((row, item))
    if not loaded:
        return []
    scored = [s.prediction for s in predictor.score([it for _, it in loaded], heatmaps=True)]
    items = []
    for (row, _), r in zip(loaded, scored, strict=True):
        if r.heatmap is None:  # rejected: no heatmap is drawn
            continue
        im = Image.fromarray(r.heatmap)
        im.thumbnail((GALLERY_PX, GALLERY_PX))
        items.append({"src": png_uri(png_bytes(np.asarray(im))), "name": Path(row.path).name, "caption": caption(row)})
    return items


def error_gallery(predictor: Predictor, preds: pd.DataFrame, k: int = 12) -> list[dict[str, str]]:
    """The ``k`` most confident wrong predictions: heatmap overlay (of the predicted class) and caption."""
    wrong = preds[(preds["true"] != "") & (preds["decision"] != "error") & (preds["pred"] != preds["true"])]
    wrong = wrong.sort_values("confidence", ascending=False, kind="stable").head(max(k, 0))
    return heatmap_gallery(
        predictor,
        wrong,
        lambda row: (
            f"true {DISPLAY_NAMES[row.true]} · predicted {DISPLAY_NAMES[row.pred]} "
            f"({row.confidence:.1%}) · {row.decision} · {row.origin}"
        ),
    )


def attention_gallery(predictor: Predictor, preds: pd.DataFrame, k: int = 12) -> list[dict[str, str]]:
    """The ``k`` images whose heatmap has the least mass inside the lungs (lung attention), lowest first."""
    if "lung_attention" not in preds or preds["lung_attention"].isna().all():
        return []
    low = preds[preds["decision"] != "error"].sort_values("lung_attention", kind="stable").head(max(k, 0))
    return heatmap_gallery(
        predictor,
        low,
        lambda row: (
            f"lung attention {row.lung_attention:.0%} · predicted {DISPLAY_NAMES[row.pred]} "
            f"({row.confidence:.1%})" + (f" · true {DISPLAY_NAMES[row.true]}" if row.true else "") + f" · {row.origin}"
        ),
    )


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ci(m: dict[str, Any], key: str) -> str:
    ci = m.get("ci", {}).get(key)
    return f"{_pct(m.get(key))} [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else _pct(m.get(key))


def _table(columns: Sequence[str], rows: list[list[Any]]) -> dict[str, Any]:
    return {"columns": list(columns), "rows": [[str(v) for v in r] for r in rows]}


def group_table(groups: dict[str, dict[str, Any]], label: str) -> dict[str, Any]:
    """Per origin / copy_px: counts, accuracy and macro-F1 with 95% CIs, COVID recall, decisions."""
    rows = []
    for name, g in groups.items():
        readable = g["images"] - g["errors"]
        covid = g.get("per_class", {}).get("covid", {})
        rows.append(
            [
                name,
                g["images"],
                g["n"],
                _ci(g, "accuracy"),
                _ci(g, "macro_f1"),
                _pct(covid["recall"]) if covid.get("support") else "–",
                _pct(g["gate_acceptance"]),
                _pct(g["decisions"]["accept"] / readable if readable else None),
                g["errors"],
            ]
        )
    return _table(
        [
            label,
            "images",
            "labelled",
            "accuracy [95% CI]",
            "macro-F1 [95% CI]",
            "COVID recall",
            "gate acceptance",
            "accepted",
            "errors",
        ],
        rows,
    )


def tables(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every table the report shows."""
    out = {}
    if metrics["n"]:
        out["per_class"] = _table(
            ["class", "precision", "recall", "F1", "AUC", "support"],
            [
                [
                    DISPLAY_NAMES[c],
                    _pct(v["precision"]),
                    _pct(v["recall"]),
                    _pct(v["f1"]),
                    f"{metrics['auc'][c]:.3f}" if c in metrics["auc"] else "–",
                    v["support"],
                ]
                for c, v in metrics["per_class"].items()
            ],
        )
    out["by_origin"] = group_table(metrics["by_origin"], "origin")
    if "by_copy_px" in metrics:
        out["by_copy_px"] = group_table(metrics["by_copy_px"], "copy_px")
    out["decisions"] = _table(["decision", "images"], [[d, n] for d, n in metrics["decisions"].items()])
    att = metrics.get("lung_attention") or {}
    if att:
        rows = [["all images", att["n"], _pct(att["mean"])]]
        for key, label in (("by_class", "true class"), ("by_predicted", "predicted"), ("by_origin", "origin")):
            rows += [[f"{label}: {DISPLAY_NAMES.get(k, k)}", v["n"], _pct(v["mean"])] for k, v in att[key].items()]
        out["lung_attention"] = _table(["images", "n", "mean lung attention"], rows)
    held = (metrics.get("segmenter") or {}).get("heldout") or {}
    if held:
        out["segmenter"] = _table(
            ["held-out pairs", "n", "mean Dice", "min Dice", "mean HD95 (px)"],
            [
                [k, v["n"], f"{v['dice_mean']:.4f}", f"{v['dice_min']:.4f}", f"{v['hd95_px_mean']:.1f}"]
                for k, v in held.items()
            ],
        )
    if "ood" in metrics:
        out["ood"] = _table(
            ["image", "source", "OOD score", "decision", "predicted (confidence)"],
            [
                [
                    r["name"],
                    r["source"],
                    f"{r['ood_score']:.1f}",
                    r["decision"],
                    f"{DISPLAY_NAMES[r['label']]} ({r['confidence']:.0%})",
                ]
                for r in metrics["ood"]["images"]
            ],
        )
    return out


def figures(metrics: dict[str, Any], preds: pd.DataFrame) -> dict[str, str]:
    """name -> data URI of every figure that the metrics allow."""
    if not metrics["n"]:
        return {}
    figs = {
        "confusion": plot_confusion(metrics),
        "reliability": plot_reliability(metrics["calibration"]),
        "risk_coverage": plot_risk_coverage(metrics["abstention"]),
    }
    if metrics["auc"]:
        figs["roc"] = plot_roc(preds, metrics["auc"])
    return {name: _fig_uri(fig) for name, fig in figs.items()}


def render_report(
    metrics: dict[str, Any],
    preds: pd.DataFrame,
    out_path: Path,
    gallery: Sequence[dict[str, str]] = (),
    low_attention: Sequence[dict[str, str]] = (),
) -> Path:
    """Write the self-contained report.html for ``evaluate``'s metrics and predictions; returns its path."""
    env = template_env()
    env.filters["pct"] = _pct
    html = env.get_template("evaluate.html.j2").render(
        m=metrics,
        images=figures(metrics, preds),
        tables=tables(metrics),
        gallery=list(gallery),
        low_attention=list(low_attention),
        ci=_ci,
        names=DISPLAY_NAMES,
        title=f"Evaluation: {Path(metrics['data']).name} ({metrics['split']})",
    )
    atomic_write_text(Path(out_path), html)
    log.info("report written to %s", out_path)
    return Path(out_path)
