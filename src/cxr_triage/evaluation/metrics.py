"""Metrics of a predictions frame (numpy + scikit-learn): per class, per origin, bootstrap CIs, calibration,
abstention and decision counts. Every value is a plain Python number, list or dict (JSON-ready).

A predictions frame has one row per image: ``true`` (class id, or '' when unlabelled), ``decision``,
``p_<class>`` (calibrated probabilities) and ``logit_<class>`` (raw logits; NaN for unreadable rows),
``origin`` and ``copy_px``. Macro averages run over the classes present in the true labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.evaluation.calibrate import ece
from cxr_triage.runtime.bundle import BundleMeta
from cxr_triage.runtime.engine import DECISIONS, softmax

K = len(CLASS_IDS)
P_COLS = [f"p_{c}" for c in CLASS_IDS]
LOGIT_COLS = [f"logit_{c}" for c in CLASS_IDS]
BINS = 15
CI_LEVEL = 0.95


def _f(x: float | np.floating | None) -> float | None:
    """A plain float, or None for missing / NaN."""
    return None if x is None or not np.isfinite(x) else float(x)


def macro_f1_from_confusion(cm: np.ndarray) -> float:
    """Mean F1 over the classes present in the true labels (rows of ``cm`` with any count)."""
    tp, true_n, pred_n = np.diag(cm), cm.sum(1), cm.sum(0)
    denom = true_n + pred_n
    f1 = np.divide(2 * tp, denom, out=np.zeros(len(cm)), where=denom > 0)
    return float(f1[true_n > 0].mean())


def classification_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """n, accuracy, macro-F1, per-class precision/recall/F1/support, one-vs-rest AUC and the confusion
    matrix (rows = true, CLASS_IDS order); COVID recall and normal specificity vs COVID when both occur."""
    if len(y) == 0:
        return {"n": 0}
    pred = probs.argmax(1)
    present = sorted(set(int(v) for v in y))
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=list(range(K)), zero_division=0)
    auc = {c: float(roc_auc_score(y == i, probs[:, i])) for i, c in enumerate(CLASS_IDS) if 0 < (y == i).sum() < len(y)}
    out: dict[str, Any] = {
        "n": len(y),
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(f1[present].mean()),
        "macro_over": [CLASS_IDS[i] for i in present],
        "per_class": {
            c: {
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(CLASS_IDS)
        },
        "auc": {**auc, "macro": float(np.mean(list(auc.values())))} if auc else {},
        "confusion": confusion_matrix(y, pred, labels=list(range(K))).tolist(),
    }
    covid, normal = CLASS_IDS.index("covid"), CLASS_IDS.index("normal")
    if covid in present and normal in present:
        out["covid_recall"] = float(rec[covid])
        out["normal_specificity_vs_covid"] = float((pred[y == normal] != covid).mean())
    return out


def bootstrap_ci(y: np.ndarray, pred: np.ndarray, resamples: int, seed: int) -> dict[str, Any]:
    """Percentile 95% intervals of accuracy and macro-F1 over ``resamples`` resamples of the images."""
    if resamples <= 0 or len(y) == 0:
        return {}
    rng = np.random.default_rng(seed)
    acc, f1 = np.empty(resamples), np.empty(resamples)
    for b in range(resamples):
        i = rng.integers(0, len(y), len(y))
        cm = np.bincount(y[i] * K + pred[i], minlength=K * K).reshape(K, K)
        acc[b], f1[b] = np.trace(cm) / len(y), macro_f1_from_confusion(cm)
    q = [100 * (1 - CI_LEVEL) / 2, 100 * (1 + CI_LEVEL) / 2]
    return {
        "accuracy": np.percentile(acc, q).tolist(),
        "macro_f1": np.percentile(f1, q).tolist(),
        "level": CI_LEVEL,
        "resamples": resamples,
        "seed": seed,
        "method": "percentile bootstrap",
    }


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> list[dict[str, Any]]:
    """Reliability-diagram data: per equal-width confidence bin, its count, mean confidence and accuracy."""
    conf, correct = probs.max(1), probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        out.append(
            {
                "lo": float(lo),
                "hi": float(hi),
                "n": int(m.sum()),
                "confidence": _f(conf[m].mean()) if m.any() else None,
                "accuracy": _f(correct[m].mean()) if m.any() else None,
            }
        )
    return out


def risk_coverage(conf: np.ndarray, correct: np.ndarray, points: int = 101) -> dict[str, list[float]]:
    """Risk (error rate) of the most confident fraction of images, for coverages from 1/n to 1."""
    if len(conf) == 0:
        return {"coverage": [], "risk": [], "threshold": []}
    order = np.argsort(-conf, kind="stable")
    err = np.cumsum(~correct[order]) / np.arange(1, len(order) + 1)
    keep = np.unique(np.linspace(0, len(order) - 1, points).round().astype(int))
    return {
        "coverage": ((keep + 1) / len(order)).tolist(),
        "risk": err[keep].tolist(),
        "threshold": conf[order][keep].tolist(),
    }


def _labelled(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """Class indices, calibrated probs, raw logits and rows of the labelled readable images."""
    lab = frame[(frame["true"] != "") & (frame["decision"] != "error")]
    y = lab["true"].map(CLASS_IDS.index).to_numpy(int)
    return y, lab[P_COLS].to_numpy(float), lab[LOGIT_COLS].to_numpy(float), lab


def counts(frame: pd.DataFrame) -> dict[str, Any]:
    """Images, unlabelled, decisions, and the rejection gate's acceptance rate among readable images."""
    readable = frame["decision"] != "error"
    dec = frame["decision"].value_counts()
    return {
        "images": len(frame),
        "unlabelled": int((frame["true"] == "").sum()),
        "errors": int((~readable).sum()),
        "decisions": {d: int(dec.get(d, 0)) for d in DECISIONS},
        "labels": {c: int((frame["true"] == c).sum()) for c in CLASS_IDS},
        "gate_acceptance": _f((frame.loc[readable, "decision"] != "rejected").mean()) if readable.any() else None,
    }


def score(frame: pd.DataFrame, resamples: int, seed: int) -> dict[str, Any]:
    """Counts + classification metrics + bootstrap CIs of one frame (or one group of it)."""
    y, probs, _, _ = _labelled(frame)
    m = {**counts(frame), **classification_metrics(y, probs)}
    if len(y):
        m["ci"] = bootstrap_ci(y, probs.argmax(1), resamples, seed)
    return m


def by_group(frame: pd.DataFrame, column: str, resamples: int, seed: int) -> dict[str, dict[str, Any]]:
    """``score`` per value of ``column`` (blank values left out)."""
    values = sorted(v for v in frame[column].astype(str).unique() if v != "")
    return {v: score(frame[frame[column].astype(str) == v], resamples, seed) for v in values}


def calibration(frame: pd.DataFrame, meta: BundleMeta, bins: int = BINS) -> dict[str, Any]:
    """ECE and reliability data of raw softmax(logits) and of the bundle's calibrated probabilities; the bundle's
    temperature and logit bias (None when its model.json gives none)."""
    y, probs, logits, _ = _labelled(frame)
    cal = meta.calibration
    out = {
        "temperature": float(cal.temperature),
        "logit_bias": cal.logit_bias if "logit_bias" in cal.model_fields_set else None,
        "bins": bins,
    }
    if len(y):
        raw = softmax(logits)
        out |= {
            "ece_raw": ece(raw, y, bins),
            "ece_calibrated": ece(probs, y, bins),
            "reliability_raw": reliability(raw, y, bins),
            "reliability_calibrated": reliability(probs, y, bins),
        }
    return out


def abstention(frame: pd.DataFrame, meta: BundleMeta) -> dict[str, Any]:
    """The bundle's threshold; coverage and accuracy of accepted predictions here; the risk-coverage curve.

    "coverage"/"accuracy_accepted" follow the decisions (rejected and uncertain both left out);
    the "_confidence" pair applies the confidence threshold alone.
    """
    ab = meta.abstain
    thr = float(ab.threshold)
    y, probs, _, lab = _labelled(frame)
    out = {
        "threshold": thr,
        "target_accuracy": ab.target_accuracy,
        "val_coverage": ab.val_coverage,
    }
    if len(y):
        conf, correct = probs.max(1), probs.argmax(1) == y
        acc = (lab["decision"] == "accept").to_numpy()
        by_conf = conf >= thr
        out |= {
            "coverage": float(acc.mean()),
            "accuracy_accepted": _f(correct[acc].mean()) if acc.any() else None,
            "coverage_confidence": float(by_conf.mean()),
            "accuracy_confidence": _f(correct[by_conf].mean()) if by_conf.any() else None,
            "curve": risk_coverage(conf, correct),
        }
    return out


def attention(frame: pd.DataFrame) -> dict[str, Any]:
    """Mean lung attention (share of heatmap mass inside the lung mask) overall, per true class, per origin."""
    if "lung_attention" not in frame or frame["lung_attention"].isna().all():
        return {}
    ok = frame[frame["lung_attention"].notna()]

    def means(col: str) -> dict[str, Any]:
        return {
            str(k): {"n": int(len(g)), "mean": _f(g["lung_attention"].mean())}
            for k, g in ok.groupby(col)
            if str(k) != ""
        }

    return {
        "n": int(len(ok)),
        "mean": _f(ok["lung_attention"].mean()),
        "by_class": means("true"),
        "by_predicted": means("pred"),
        "by_origin": means("origin"),
    }


def summarise(frame: pd.DataFrame, meta: BundleMeta, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Everything metrics.json holds about a predictions frame (the OOD check aside); ``meta`` is the bundle's typed
    model.json (``Bundle.meta``)."""
    out = score(frame, resamples, seed)
    out["by_origin"] = by_group(frame, "origin", resamples, seed)
    if (frame["copy_px"].astype(str) != "").any():
        out["by_copy_px"] = by_group(frame, "copy_px", resamples, seed)
    out["lung_attention"] = attention(frame)
    out["calibration"] = calibration(frame, meta)
    out["abstention"] = abstention(frame, meta)
    return out
