"""Fitting on validation outputs (numpy only): temperature, class-bias operating point, abstention, OOD gate."""

from __future__ import annotations

import numpy as np

from cxr_triage.runtime.engine import softmax


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    p = softmax(logits / temperature)
    return float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising validation NLL (log-spaced grid, then a finer grid around the best)."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 200))
    best = grid[np.argmin([nll(logits, labels, t) for t in grid])]
    fine = np.linspace(best * 0.9, best * 1.1, 101)
    return float(fine[np.argmin([nll(logits, labels, t) for t in fine])])


def macro_f1(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    f1 = []
    for c in range(n_classes):
        tp = np.sum((pred == c) & (labels == c))
        denom = np.sum(pred == c) + np.sum(labels == c)
        f1.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1))


def fit_logit_bias(
    logits: np.ndarray, labels: np.ndarray, rounds: int = 3, span: float = 2.0, min_gain: float = 0.002
) -> np.ndarray:
    """Per-class additive logit bias maximising validation macro-F1 (coordinate search).

    Returns zeros unless the gain on validation is at least ``min_gain`` (avoid fitting noise).
    """
    k = logits.shape[1]
    bias = np.zeros(k, np.float32)
    base = best = macro_f1(logits.argmax(1), labels, k)
    steps = np.linspace(-span, span, 41)
    for _ in range(rounds):
        for c in range(k):
            for s in steps:
                trial = bias.copy()
                trial[c] = s
                score = macro_f1((logits + trial).argmax(1), labels, k)
                if score > best + 1e-9:
                    best, bias = score, trial
    return bias if best - base >= min_gain else np.zeros(k, np.float32)


def abstain_threshold(probs: np.ndarray, labels: np.ndarray, target: float = 0.99) -> tuple[float, float]:
    """Smallest confidence threshold whose accepted predictions reach ``target`` accuracy; (threshold, coverage)."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    order = np.argsort(-conf)
    acc_at = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(acc_at >= target)
    if len(ok) == 0:
        return 1.0, 0.0
    n = ok.max() + 1  # largest accepted set that still meets the target
    return float(conf[order][n - 1]), float(n / len(conf))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence (equal-width bins)."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def fit_pixel_pca(thumbs: np.ndarray, k: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top-k principal directions of training thumbnails (the pixel gate's model)."""
    mean = thumbs.mean(axis=0)
    _, _, vt = np.linalg.svd(thumbs - mean, full_matrices=False)
    return mean.astype(np.float32), vt[: min(k, len(vt))].astype(np.float32)


def fit_mahalanobis(
    pooled: np.ndarray, labels: np.ndarray, n_classes: int, shrink: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Class means and shared (shrunk) precision matrix of pooled features."""
    means = np.stack([pooled[labels == c].mean(0) if np.any(labels == c) else pooled.mean(0) for c in range(n_classes)])
    centred = pooled - means[labels]
    cov = centred.T @ centred / max(1, len(pooled) - 1)
    cov = (1 - shrink) * cov + shrink * np.eye(len(cov)) * np.trace(cov) / len(cov)
    return means.astype(np.float32), np.linalg.inv(cov).astype(np.float32)
