"""A tiny model bundle made without torch, for tests that need *a* bundle (plumbing), not a trained one.

``make_tiny_bundle(folder)`` writes a sealed bundle with the files and metadata of an exported one: ``model.onnx``
(input ``input`` (N, 1, 64, 64); outputs ``logits`` (N, 4) and ``features`` (N, 8, 8, 8), the last feature map,
with logits = linear(global average pool(features)) so class activation maps are exact), ``extras.npz``
(``cam_weight``/``cam_bias``: that linear layer; ``ood_means``/``ood_precision`` and ``pix_mean``/``pix_components``
fitted on synthetic images of ``conftest.class_image``), ``model.json`` (calibration, gates, lung gate, sha256s),
``lungs/`` (a segmenter bundle whose graph answers a fixed two-lung mask whatever the image, with its atlas) and
``SHA256SUMS``, sealed by ``runtime.bundle.write_meta``.

The two graphs are hand-made with onnx's helper API (``build_classifier``, ``build_segmenter``) and checked in under
``tests/data/tiny_bundle/`` (a few KB each), so a base install (no torch, no onnx) can build the bundle; after a
change here, write them again with ``python -m tests.tiny_bundle`` (needs the onnx package, in the [train] extra).
The classifier's filters and head are fixed formulas (patch brightness, edges, stripes), not learnt: its answers
vary with the image, but it does not reliably tell the classes apart, so tests of what a trained model gets right
stay on ``conftest.smoke_bundle``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cxr_triage.core.classes import CLASS_IDS, DISPLAY_NAMES
from cxr_triage.core.geometry import PreprocessSpec, square
from cxr_triage.core.lungs import LUNG_GATE, coarse
from cxr_triage.core.preprocess import normalise
from cxr_triage.runtime.bundle import BUNDLE_FORMAT, sha256_file, write_meta
from cxr_triage.runtime.engine import thumbnails
from cxr_triage.runtime.segment import SEG_BUNDLE_FORMAT

DATA = Path(__file__).resolve().parent / "data" / "tiny_bundle"
CLASSIFIER = DATA / "classifier.onnx"
SEGMENTER = DATA / "lungs.onnx"
SIZE = 64  # classifier input side
PATCH = 8  # the convolution's kernel and stride: an 8 x 8 feature map
CHANNELS = 8
SEG_SIZE = 64
OPSET, IR_VERSION = 17, 8  # loadable by every onnxruntime the package allows (>= 1.17)
SPEC = {"size": SIZE, "channels": 1, "mean": 0.5, "std": 0.25, "resize": "stretch", "border": 0.03, "equalize": True}
SEG_SPEC = {**SPEC, "size": SEG_SIZE, "border": 0.0, "lungs": "none", "lung_margin": 0.08}
NOTICE = "Test fixture: a hand-made model for synthetic patterns, not trained on X-rays. Not for predictions."


def classifier_weights() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(conv weight C x 1 x P x P, conv bias C, head weight 4 x C, head bias 4): fixed formulas, no randomness."""
    yy, xx = np.mgrid[0:PATCH, 0:PATCH].astype(np.float32) / (PATCH - 1) - 0.5  # in [-0.5, 0.5]
    flat = np.full((PATCH, PATCH), 1.0, np.float32)
    rows = np.cos(np.pi * np.arange(PATCH, dtype=np.float32))[:, None] * flat  # alternating rows
    filters = [flat, -flat, xx, -xx, yy, -yy, rows, rows.T]  # bright, dark, edges, stripes
    conv_w = np.stack(filters)[:, None] / (PATCH * PATCH / 4)
    conv_b = np.array([0.0, 0.0, 0.05, 0.05, 0.05, 0.05, 0.02, 0.02], np.float32)
    # channels: bright, dark, brighter to the right / left, brighter below / above, alternating rows / columns
    head_w = np.array(
        [
            [2.0, 0.0, -20.0, 20.0, -20.0, 20.0, 0.0, 0.0],  # covid: a bright patch up and to the left (roughly)
            [2.0, 0.0, 20.0, -20.0, 20.0, -20.0, 0.0, 0.0],  # lung_opacity: a bright patch down and to the right
            [0.0, 0.0, 0.0, 0.0, 6.0, 6.0, 0.0, 0.0],  # normal: horizontal stripes (edges along y)
            [0.0, 0.0, 6.0, 6.0, 0.0, 0.0, 0.0, 0.0],  # viral_pneumonia: vertical stripes (edges along x)
        ],
        np.float32,
    )
    head_b = np.zeros(len(CLASS_IDS), np.float32)
    return conv_w.astype(np.float32), conv_b, head_w, head_b


def lung_template(side: int = SEG_SIZE) -> np.ndarray:
    """Two upright ellipses where a frontal chest X-ray's lungs are (bool side x side): the fixed lung mask."""
    yy, xx = (np.mgrid[0:side, 0:side] + 0.5) / side
    return sum(((xx - cx) ** 2 / 0.025 + (yy - 0.5) ** 2 / 0.1 < 1) for cx in (0.3, 0.7)) > 0


def build_classifier() -> bytes:
    """input (N, 1, S, S) -> Conv(P x P, stride P) -> Relu = features (N, C, S/P, S/P) -> GAP -> Gemm = logits."""
    from onnx import TensorProto, helper, numpy_helper

    conv_w, conv_b, head_w, head_b = classifier_weights()
    inits = [
        numpy_helper.from_array(conv_w, "conv_w"),
        numpy_helper.from_array(conv_b, "conv_b"),
        numpy_helper.from_array(head_w, "head_w"),
        numpy_helper.from_array(head_b, "head_b"),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["input", "conv_w", "conv_b"], ["conv"], kernel_shape=[PATCH] * 2, strides=[PATCH] * 2
        ),
        helper.make_node("Relu", ["conv"], ["features"]),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled4"]),
        helper.make_node("Flatten", ["pooled4"], ["pooled"], axis=1),
        helper.make_node("Gemm", ["pooled", "head_w", "head_b"], ["logits"], transB=1),
    ]
    side = SIZE // PATCH
    graph = helper.make_graph(
        nodes,
        "tiny-classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(CLASS_IDS)]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", CHANNELS, side, side]),
        ],
        inits,
    )
    return _serialise(graph)


def build_segmenter() -> bytes:
    """input (N, 1, S, S) -> logits (N, 1, S, S) = 0 * input + the lung template (+6 inside, -6 outside)."""
    from onnx import TensorProto, helper, numpy_helper

    template = np.where(lung_template(), 6.0, -6.0).astype(np.float32)[None, None]
    inits = [numpy_helper.from_array(np.zeros(1, np.float32), "zero"), numpy_helper.from_array(template, "template")]
    nodes = [
        helper.make_node("Mul", ["input", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "template"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-lungs",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, SEG_SIZE, SEG_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, SEG_SIZE, SEG_SIZE])],
        inits,
    )
    return _serialise(graph)


def _serialise(graph: Any) -> bytes:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cxr-triage-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def write_graphs(folder: Path = DATA) -> None:
    """Write the two graphs (``python -m tests.tiny_bundle``; needs onnx)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CLASSIFIER.name).write_bytes(build_classifier())
    (folder / SEGMENTER.name).write_bytes(build_segmenter())


def _fit_gates(onnx_path: Path, spec: PreprocessSpec, seed: int = 0) -> tuple[dict[str, np.ndarray], float, float]:
    """The out-of-distribution statistics (extras.npz) and gate thresholds (3x the largest score seen, as the
    smoke bundle widens its own) from 32 synthetic images of the four class patterns."""
    from tests.conftest import class_image

    rng = np.random.default_rng(seed)
    greys = [class_image(c, int(rng.integers(64, 129)), int(rng.integers(64, 129)), rng) for c in CLASS_IDS * 8]
    x = normalise(np.stack([square(g, spec) for g in greys]), spec)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    _, feats = session.run(["logits", "features"], {"input": x})
    pooled = feats.mean(axis=(2, 3))
    labels = np.repeat(np.arange(len(CLASS_IDS))[None], 8, axis=0).ravel()
    means = np.stack([pooled[labels == k].mean(axis=0) for k in range(len(CLASS_IDS))])
    resid = pooled - means[labels]
    cov = resid.T @ resid / len(pooled) + 1e-3 * np.eye(pooled.shape[1])
    thumbs = thumbnails(x)
    pix_mean = thumbs.mean(axis=0)
    components = np.linalg.svd(thumbs - pix_mean, full_matrices=False)[2][:8]
    extras = {
        "ood_means": means.astype(np.float32),
        "ood_precision": np.linalg.inv(cov).astype(np.float32),
        "pix_mean": pix_mean.astype(np.float32),
        "pix_components": components.astype(np.float32),
    }
    from cxr_triage.runtime.engine import ood_scores, pixel_residual

    return extras, 3 * float(ood_scores(pooled, extras).max()), 3 * float(pixel_residual(thumbs, extras).max())


def _write_segmenter(folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True)
    shutil.copyfile(SEGMENTER, folder / "model.onnx")
    meta = {
        "format": SEG_BUNDLE_FORMAT,
        "name": "tiny-test-lungs",
        "version": "0.0.0",
        "architecture": "a fixed two-lung mask (0 * input + template), hand-made with onnx.helper",
        "preprocess": SEG_SPEC,
        "postprocess": "two largest components (each >= 0.5 % of the image), holes filled",
        "onnx_sha256": sha256_file(folder / "model.onnx"),
        "notice": NOTICE,
        "atlas": np.round(coarse(lung_template()), 3).tolist(),
        "atlas_from": "the fixed mask itself, 32 x 32 grid over the segmenter's square",
    }
    (folder / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def make_tiny_bundle(folder: Path | str, lungs: bool = True) -> Path:
    """Write a sealed tiny bundle into ``folder`` (created; must not exist) and return it. ``lungs``: carry the
    fixed-mask segmenter in ``lungs/`` (lung gate, lung attention, lung outline in heatmaps), as the shipped bundle
    does; without it, like a bundle exported without a segmenter (the smoke bundle)."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    shutil.copyfile(CLASSIFIER, folder / "model.onnx")
    spec = PreprocessSpec.from_dict(SPEC)
    _, _, head_w, head_b = classifier_weights()
    gates, ood_threshold, pixel_threshold = _fit_gates(folder / "model.onnx", spec)
    np.savez(folder / "extras.npz", cam_weight=head_w, cam_bias=head_b, **gates)
    meta: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "name": "tiny-test-bundle",
        "version": "0.0.0",
        "classes": list(CLASS_IDS),
        "display_names": dict(DISPLAY_NAMES),
        "architecture": f"conv {PATCH}x{PATCH}/{PATCH} ({CHANNELS} fixed filters) + relu + GAP + linear",
        "preprocess": SPEC,
        "inputs": {"input": ["batch", 1, SIZE, SIZE]},
        "outputs": {"logits": ["batch", len(CLASS_IDS)], "features": ["batch", "C", "h", "w"]},
        "onnx_sha256": sha256_file(folder / "model.onnx"),
        "extras_sha256": sha256_file(folder / "extras.npz"),
        "notice": NOTICE,
        "weights": "fp32",
        "calibration": {"temperature": 1.0, "logit_bias": [0.0] * len(CLASS_IDS)},
        "abstain": {"threshold": 0.0},
        "ood": {
            "method": "Mahalanobis on pooled features + PCA residual of 32x32 thumbnails + colour",
            "threshold": ood_threshold,
            "pixel_threshold": pixel_threshold,
            "colour_threshold": 0.08,
            "fitted_on": "32 synthetic images (tests/conftest.class_image), thresholds 3x the largest score",
        },
    }
    if lungs:
        seg = _write_segmenter(folder / "lungs")
        meta["segmenter"] = {"path": "lungs", "sha256": seg["onnx_sha256"], "name": seg["name"]}
        meta["lung_gate"] = dict(LUNG_GATE)
    write_meta(folder, meta)  # validated by the schema the engine loads with, and sealed (SHA256SUMS)
    return folder


if __name__ == "__main__":
    write_graphs()
    for path in (CLASSIFIER, SEGMENTER):
        print(f"{path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}: {path.stat().st_size} B")
