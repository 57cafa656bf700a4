"""Model bundles and onnxruntime inference: probabilities, decision and heatmaps with numpy only (no torch).

A bundle is a folder: ``model.onnx`` (outputs ``logits`` and ``features``, the last feature map),
``extras.npz`` (classifier weights for class activation maps, out-of-distribution statistics) and
``model.json`` (classes, preprocessing spec, calibration, thresholds, metrics, sha256 of both files) and
``SHA256SUMS``, the seal over all three (``runtime.bundle``: schema, seal and checks).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.core.preprocess import PreprocessSpec
from cxr_triage.runtime.bundle import BUNDLE_FORMAT as BUNDLE_FORMAT
from cxr_triage.runtime.bundle import BundleError, check_extras, read_bundle_meta
from cxr_triage.runtime.bundle import sha256_file as sha256_file
from cxr_triage.runtime.reasons import decision_of, findings

DECISIONS = ("accept", "uncertain", "rejected", "error")


def default_bundle_dir() -> Path:
    """The bundle shipped inside the package (``cxr_triage/assets/model``)."""
    return Path(str(resources.files("cxr_triage") / "assets" / "model"))


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def calibrated_probs(logits: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """softmax((logits + class bias) / temperature), with the values stored in model.json."""
    cal = meta.get("calibration", {})
    bias = np.asarray(cal.get("logit_bias", np.zeros(len(CLASS_IDS))), np.float32)
    return softmax((logits.astype(np.float32) + bias) / float(cal.get("temperature", 1.0)))


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


def decide(confidence: float, ood: float, meta: dict[str, Any], pixel: float = 0.0, colour: float = 0.0) -> str:
    """'rejected' when the input looks unlike a chest X-ray, 'uncertain' below the abstention threshold, 'error' when
    a score is not finite.

    Three gates, each fitted or fixed at export: unfamiliar network features (Mahalanobis), an unfamiliar
    image layout (pixel-PCA residual), and colour (radiographs are grey). The rule is ``reasons.findings``.
    """
    if not all(math.isfinite(v) for v in (confidence, ood, pixel, colour)):
        return "error"  # NaN compares False with every threshold: it must never fall through to 'accept'
    return decision_of(findings(confidence, ood, meta, pixel, colour))


def class_activation_map(features: np.ndarray, class_idx: int, extras: dict[str, np.ndarray]) -> np.ndarray:
    """CAM (= Grad-CAM for GAP + linear): ReLU(sum_k w_ck A_k), scaled to [0, 1]. features: (C, h, w)."""
    cam = np.tensordot(extras["cam_weight"][class_idx], features, axes=1)
    cam = np.maximum(cam, 0)
    return (cam / cam.max()).astype(np.float32) if cam.max() > 0 else cam.astype(np.float32)


@dataclass
class Output:
    """Per-batch outputs: calibrated probabilities, raw logits, OOD score and decision per image."""

    probs: np.ndarray
    logits: np.ndarray
    features: np.ndarray
    ood: np.ndarray
    pixel: np.ndarray
    decisions: list[str]


def cpu_session(model: Path, threads: int | None = None) -> Any:
    """The onnxruntime CPU session both networks run in: ``threads`` intra-op threads (default: the cores, up to 4),
    every graph optimisation (int8 QDQ graphs need it; fp32 ones get activations fused into convolutions), no
    spin-waiting (steadier latency on shared CPUs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


class Engine:
    """An onnxruntime session over a bundle. Thread-safe for ``run`` (onnxruntime sessions are)."""

    def __init__(self, bundle_dir: str | Path | None = None, threads: int | None = None) -> None:
        self.dir = Path(bundle_dir) if bundle_dir else default_bundle_dir()
        self.meta = read_bundle_meta(self.dir)  # sealed and valid, or BundleError
        self.spec = PreprocessSpec.from_dict(self.meta["preprocess"])
        try:
            with np.load(self.dir / "extras.npz", allow_pickle=False) as z:
                self.extras = {k: z[k] for k in z.files}
            self.session = cpu_session(self.dir / "model.onnx", threads)
            x = np.zeros((1, 1, self.spec.size, self.spec.size), np.float32)
            logits, feats = self.forward(x)  # one probe: the graph's outputs must fit extras.npz and the classes
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"{self.dir}: cannot load the model ({type(exc).__name__}); export it again") from None
        if logits.shape != (1, len(CLASS_IDS)) or feats.ndim != 4:
            raise BundleError(f"{self.dir}: model.onnx gives logits {logits.shape}, features {feats.shape}")
        check_extras(self.extras, feats.shape[1], thumbnails(x).shape[1])
        from cxr_triage.runtime.segment import segmenter_for  # segment imports this module

        self.segmenter = segmenter_for(self.dir, self.meta, self.spec)

    @property
    def info(self) -> dict[str, str]:
        return {
            "name": self.meta.get("name", "cxr-triage"),
            "version": self.meta.get("version", ""),
            "sha256": self.meta["onnx_sha256"],
        }

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw (logits, feature maps) for a float32 batch (N, 1, S, S)."""
        logits, feats = self.session.run(["logits", "features"], {"input": np.ascontiguousarray(x, np.float32)})
        return logits, feats

    def run(self, x: np.ndarray, colour: list[float] | None = None) -> Output:
        """Score a float32 batch; ``colour`` holds each input's colourfulness (0 for grey inputs)."""
        logits, feats = self.forward(x)
        probs = calibrated_probs(logits, self.meta)
        ood = ood_scores(feats.mean(axis=(2, 3)), self.extras)
        pix = pixel_residual(thumbnails(x), self.extras)
        colour = colour if colour is not None else [0.0] * len(x)
        decisions = [
            decide(float(p.max()), float(o), self.meta, float(q), float(c))
            for p, o, q, c in zip(probs, ood, pix, colour, strict=True)
        ]
        return Output(probs, logits, feats, ood, pix, decisions)

    def cam(self, features: np.ndarray, class_idx: int) -> np.ndarray:
        return class_activation_map(features, class_idx, self.extras)
