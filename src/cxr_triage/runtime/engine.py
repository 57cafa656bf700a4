"""The classifier's onnxruntime session (``Engine``) and the numpy maths on its outputs: calibrated probabilities,
out-of-distribution scores, class activation maps (no torch). ``runtime.predictor`` puts them together.

A bundle is a folder: ``model.onnx`` (outputs ``logits`` and ``features``, the last feature map),
``extras.npz`` (classifier weights for class activation maps, out-of-distribution statistics) and
``model.json`` (classes, preprocessing spec, calibration, thresholds, metrics, sha256 of both files) and
``SHA256SUMS``, the seal over all three (``runtime.bundle``: schema, seal and checks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.runtime.bundle import BUNDLE_FORMAT as BUNDLE_FORMAT
from cxr_triage.runtime.bundle import Bundle, BundleError, Calibration, check_extras
from cxr_triage.runtime.bundle import default_bundle_dir as default_bundle_dir
from cxr_triage.runtime.bundle import read_bundle_meta as read_bundle_meta
from cxr_triage.runtime.bundle import sha256_file as sha256_file
from cxr_triage.runtime.segment import LungSegmenter, segmenter_for
from cxr_triage.runtime.session import cpu_session as cpu_session

DECISIONS = ("accept", "uncertain", "rejected", "error")


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def calibrated_probs(logits: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """softmax((logits + class bias) / temperature), with the values stored in model.json (as a dict)."""
    cal = meta.get("calibration", {})
    return _calibrated(logits, cal.get("logit_bias", np.zeros(len(CLASS_IDS))), cal.get("temperature", 1.0))


def calibrate(logits: np.ndarray, cal: Calibration) -> np.ndarray:
    """``calibrated_probs`` with a bundle's typed calibration block."""
    return _calibrated(logits, cal.logit_bias, cal.temperature)


def _calibrated(logits: np.ndarray, bias: Any, temperature: float) -> np.ndarray:
    return softmax((logits.astype(np.float32) + np.asarray(bias, np.float32)) / float(temperature))


def ood_scores(pooled: np.ndarray, extras: dict[str, np.ndarray]) -> np.ndarray:
    """Min Mahalanobis distance (shared covariance) of pooled features to the class means; large = unfamiliar."""
    if "ood_means" not in extras:
        return np.zeros(len(pooled), np.float32)
    diff = pooled[:, None, :] - extras["ood_means"][None, :, :]
    d2 = np.einsum("nkc,cd,nkd->nk", diff, extras["ood_precision"], diff, optimize=True)
    return np.sqrt(np.maximum(d2.min(axis=1), 0)).astype(np.float32)


def thumbnails(x: np.ndarray, side: int = 32) -> np.ndarray:
    """Model inputs (N, 1, S, S) -> (N, side*side) block means: the image layout the pixel gate models."""
    n, s = x.shape[0], x.shape[-1]
    f = max(1, s // side)
    side = s // f
    return x[:, 0, : f * side, : f * side].reshape(n, side, f, side, f).mean(axis=(2, 4)).reshape(n, -1)


def pixel_residual(thumbs: np.ndarray, extras: dict[str, np.ndarray]) -> np.ndarray:
    """RMS residual of thumbnails outside the principal subspace of training chest X-rays."""
    if "pix_mean" not in extras:
        return np.zeros(len(thumbs), np.float32)
    t = thumbs - extras["pix_mean"]
    p = extras["pix_components"]
    return np.sqrt(((t - (t @ p.T) @ p) ** 2).mean(axis=1)).astype(np.float32)


def class_activation_map(features: np.ndarray, class_idx: int, extras: dict[str, np.ndarray]) -> np.ndarray:
    """CAM (= Grad-CAM for GAP + linear): ReLU(sum_k w_ck A_k), scaled to [0, 1]. features: (C, h, w)."""
    cam = np.tensordot(extras["cam_weight"][class_idx], features, axes=1)
    cam = np.maximum(cam, 0)
    return (cam / cam.max()).astype(np.float32) if cam.max() > 0 else cam.astype(np.float32)


class Engine:
    """A bundle's onnxruntime sessions: the classifier, with the arrays it is read with (``extras.npz``, checked
    against the graph by one probe), and the lung segmenter it carries (or None). Thread-safe (onnxruntime sessions
    are). ``runtime.predictor.Predictor`` owns the route from an image to a prediction."""

    def __init__(self, bundle: Bundle | str | Path | None = None, threads: int | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.dir, self.spec = self.bundle.dir, self.bundle.spec
        spec = self.spec
        try:
            with np.load(self.dir / "extras.npz", allow_pickle=False) as z:
                self.extras = {k: z[k] for k in z.files}
            self.session = cpu_session(self.dir / "model.onnx", threads)
            x = np.zeros((1, 1, spec.size, spec.size), np.float32)
            logits, feats = self.forward(x)  # one probe: the graph's outputs must fit extras.npz and the classes
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"{self.dir}: cannot load the model ({type(exc).__name__}); export it again") from None
        if logits.shape != (1, len(CLASS_IDS)) or feats.ndim != 4:
            raise BundleError(f"{self.dir}: model.onnx gives logits {logits.shape}, features {feats.shape}")
        check_extras(self.extras, feats.shape[1], thumbnails(x).shape[1])
        self.segmenter: LungSegmenter | None = segmenter_for(self.bundle)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw (logits, feature maps) for a float32 batch (N, 1, S, S)."""
        logits, feats = self.session.run(["logits", "features"], {"input": np.ascontiguousarray(x, np.float32)})
        return logits, feats

    def cam(self, features: np.ndarray, class_idx: int) -> np.ndarray:
        return class_activation_map(features, class_idx, self.extras)
