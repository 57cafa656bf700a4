"""Checkpoint -> model bundle: ONNX (logits + last feature map), extras.npz, model.json; verified and calibrated.

Calibration uses only the validation split (and a sample of the training split for the OOD statistics).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_triage._version import __version__
from cxr_triage.core.classes import CLASS_IDS, DISPLAY_NAMES
from cxr_triage.core.preprocess import PreprocessSpec, normalise
from cxr_triage.data.manifest import atomic_dir, load_manifest
from cxr_triage.evaluation.calibrate import (
    abstain_threshold,
    fit_logit_bias,
    fit_mahalanobis,
    fit_pixel_pca,
    fit_temperature,
    macro_f1,
)
from cxr_triage.runtime.bundle import BUNDLE_FORMAT, write_meta
from cxr_triage.runtime.engine import (
    Engine,
    calibrated_probs,
    ood_scores,
    pixel_residual,
    sha256_file,
    softmax,
    thumbnails,
)
from cxr_triage.runtime.segment import default_segmenter_dir, read_segmenter_meta
from cxr_triage.training.datasets import build_cache, label_indices
from cxr_triage.training.fold import FoldError, fold_for_export
from cxr_triage.training.lungcache import build_lung_cache
from cxr_triage.training.model import FeatureExport, load_ensemble

log = logging.getLogger(__name__)
PARITY_TOL = 1e-4
GATE_QUANTILE, GATE_MARGIN = 0.998, 1.05  # each rejection gate passes 99.8% of validation images, plus 5%
COLOUR_THRESHOLD = 0.08  # mean chroma above which an input is a colour picture, not a radiograph


class ExportError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


def export_module(model: torch.nn.Module, size: int, fp16: bool = True) -> tuple[torch.nn.Module, bool]:
    """(module returning logits and feature map, fp16-storable). Conv+BatchNorm pairs are fused first
    (torch.fx; for networks it cannot trace, such as TF-ported ones with 'same' padding and BatchNorm+activation
    modules, ``training.fold`` at the bundle's input size), so that the weights rounded to fp16 here are exactly the
    weights in the ONNX graph."""
    wrapper = FeatureExport(model).eval()
    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(wrapper)
    except Exception as exc:  # torch.fx cannot trace it: fold by module structure instead
        log.info("torch.fx cannot fuse this network (%s); folding by module structure", exc)
        try:
            fused = FeatureExport(fold_for_export(model, size)).eval()
        except FoldError as fold_exc:  # export unfused, weights in fp32
            log.warning("conv-bn folding failed (%s); exporting fp32 weights", fold_exc)
            return wrapper, False
    if fp16:
        round_weights_to_fp16(fused)
    return fused.eval(), fp16


def quantize_int8(src: Path, dst: Path, calib: np.ndarray, batch: int = 16) -> None:
    """Static int8 quantisation (onnxruntime QDQ, per-channel weights, min-max activation ranges from ``calib``,
    normalised training images). The classifier layer stays fp32: it is tiny and feeds the logits directly."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({"input": calib[i : i + batch]} for i in range(0, len(calib), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    pre = dst.with_name("pre-quant.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    head = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type in ("Gemm", "MatMul")]
    quantize_static(
        str(pre),
        str(dst),
        Batches(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=head,
    )
    pre.unlink()


def to_onnx(module: torch.nn.Module, spec: PreprocessSpec, path: Path) -> None:
    dummy = torch.zeros(1, 1, spec.size, spec.size)
    torch.onnx.export(
        module,
        (dummy,),
        str(path),
        input_names=["input"],
        output_names=["logits", "features"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def round_weights_to_fp16(model: torch.nn.Module) -> None:
    """Round float parameters and buffers to fp16 precision (kept as fp32), so the fp16-stored ONNX
    weights reproduce this model exactly and the parity check compares like with like."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())


def store_weights_fp16(path: Path, min_elements: int = 1024) -> None:
    """Halve the ONNX file: large fp32 initializers are stored as fp16 behind a Cast to fp32.

    Computation stays fp32 (onnxruntime folds the casts when it loads the graph), so speed is unchanged.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(path))
    casts = []
    for init in m.graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            continue
        arr = numpy_helper.to_array(init).astype(np.float16)
        name = init.name
        init.CopyFrom(numpy_helper.from_array(arr, name=f"{name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT))
    for i, node in enumerate(casts):
        m.graph.node.insert(i, node)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def max_prob_diff(module: torch.nn.Module, engine: Engine, x: np.ndarray) -> float:
    """Max |p_torch - p_onnx| over a batch."""
    with torch.no_grad():
        p_torch = torch.softmax(module(torch.from_numpy(x))[0], 1).numpy()
    p_onnx = torch.softmax(torch.from_numpy(engine.forward(x)[0]), 1).numpy()
    return float(np.abs(p_torch - p_onnx).max())


def check_parity(module: torch.nn.Module, engine: Engine, x: np.ndarray) -> float:
    """Max probability difference torch vs onnxruntime on real images; ExportError above PARITY_TOL."""
    diff = max_prob_diff(module, engine, x)
    if diff > PARITY_TOL:
        raise ExportError(f"onnxruntime differs from torch by {diff:.2e} (> {PARITY_TOL}) in probability")
    return diff


def infer_cached(engine: Engine, images: np.ndarray, spec: PreprocessSpec, batch: int = 64):
    """Raw logits, pooled features and thumbnails over a uint8 cache, in batches."""
    logits, pooled, thumbs = [], [], []
    for i in range(0, len(images), batch):
        x = normalise(np.asarray(images[i : i + batch]), spec)
        lg, ft = engine.forward(x)
        logits.append(lg)
        pooled.append(ft.mean(axis=(2, 3)))
        thumbs.append(thumbnails(x))
    return np.concatenate(logits), np.concatenate(pooled), np.concatenate(thumbs)


def _gate(scores: np.ndarray) -> float:
    return float(np.quantile(scores, GATE_QUANTILE) * GATE_MARGIN)


def calibrate(
    engine: Engine,
    df,
    images: np.ndarray,
    spec: PreprocessSpec,
    n_train: int = 3000,
    seed: int = 0,
    target: float = 0.99,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Temperature, class bias, abstention threshold and rejection gates from validation (+ a train sample)."""
    labels = label_indices(df)
    va = np.flatnonzero(df["split"] == "val")
    tr = np.flatnonzero(df["split"] == "train")
    tr = np.sort(np.random.default_rng(seed).choice(tr, min(n_train, len(tr)), replace=False))
    lv, fv, tv = infer_cached(engine, images[va], spec)
    _, ft, tt = infer_cached(engine, images[tr], spec)
    yv = labels[va]
    bias = fit_logit_bias(lv, yv)
    temperature = fit_temperature(lv + bias, yv)
    meta_cal = {"calibration": {"temperature": temperature, "logit_bias": bias.tolist()}}
    thr, cov = abstain_threshold(calibrated_probs(lv, meta_cal), yv, target)
    means, precision = fit_mahalanobis(ft, labels[tr], len(CLASS_IDS))
    pix_mean, pix_components = fit_pixel_pca(tt)
    extras = {"ood_means": means, "ood_precision": precision, "pix_mean": pix_mean, "pix_components": pix_components}
    sv, pv = ood_scores(fv, extras), pixel_residual(tv, extras)
    gates = {"threshold": _gate(sv), "pixel_threshold": _gate(pv), "colour_threshold": COLOUR_THRESHOLD}
    accepted = (sv <= gates["threshold"]) & (pv <= gates["pixel_threshold"])
    summary = {
        **meta_cal,
        "abstain": {"threshold": thr, "target_accuracy": target, "val_coverage": cov},
        "ood": {
            "method": "Mahalanobis on pooled features + PCA residual of 32x32 thumbnails + colour",
            **gates,
            "val_accept_rate": float(accepted.mean()),
            "fitted_on": f"{len(tr)} train images",
        },
        "val": {
            "images": int(len(va)),
            "macro_f1_raw": macro_f1(lv.argmax(1), yv, len(CLASS_IDS)),
            "macro_f1_biased": macro_f1((lv + bias).argmax(1), yv, len(CLASS_IDS)),
        },
    }
    return summary, extras


QUANTIZE = ("int8", "none")
INT8_CALIB_IMAGES = 256


def export_bundle(
    ckpt: Path | list[Path],
    out_dir: Path,
    manifest: Path | None = None,
    quantize: str = "int8",
    max_accuracy_drop: float = 0.005,
    border: float | None = None,
    segmenter: Path | None = None,
) -> dict[str, Any]:
    """Write a verified, calibrated bundle to ``out_dir``; returns its model.json content.

    The ONNX graph is first checked against torch (``PARITY_TOL``). With ``quantize="int8"`` it is then quantised
    statically and kept only if validation accuracy drops by at most ``max_accuracy_drop``; with ``"none"`` its
    weights are stored as fp16 (computed in fp32). ``border`` replaces the trained border trim at inference (a
    test-time crop chosen on validation: training's random resized crops show the network slightly zoomed-in images).
    Several checkpoints trained with the same preprocessing are exported as one ensemble (mean of their logits).
    ``segmenter`` (a segmenter bundle) is copied into the bundle as ``lungs/``: predict then reports lung attention
    and applies the lung gate; a classifier trained on lung views needs it (default: the one it was trained with).
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}")
    model, configs, spec = load_ensemble(ckpt if isinstance(ckpt, list) else [ckpt])
    cfg = configs[0]
    trained_border = spec.border
    if border is not None:
        spec = dataclasses.replace(spec, border=float(border))
    original = copy.deepcopy(model)  # as trained, before fp16 rounding
    manifest = Path(manifest or cfg["data"]["manifest"])
    df = load_manifest(manifest)
    if segmenter is None and spec.lungs != "none":
        segmenter = Path(cfg["data"].get("segmenter") or default_segmenter_dir())
    cache_dir = Path(cfg["data"].get("cache_dir", Path(out_dir) / ".cache"))
    if spec.lungs == "none":
        images = build_cache(df, spec, cache_dir)
    else:
        images = build_lung_cache(df, spec, cache_dir, segmenter)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if segmenter is not None:
            shutil.copytree(segmenter, tmp / "lungs")
        module, fp16 = export_module(model, spec.size, fp16=quantize == "none")
        to_onnx(module, spec, tmp / "model.onnx")
        if fp16:
            store_weights_fp16(tmp / "model.onnx")
            round_weights_to_fp16(model)  # the CAM weights below match the graph's
        head = model.get_classifier()
        extras = {
            "cam_weight": head.weight.detach().numpy().astype(np.float32),
            "cam_bias": head.bias.detach().numpy().astype(np.float32),
        }
        np.savez(tmp / "extras.npz", **extras)
        meta = _base_meta(configs, spec, tmp, model)
        if segmenter is not None:
            seg_meta = read_segmenter_meta(tmp / "lungs")
            meta["segmenter"] = {"path": "lungs", "sha256": seg_meta["onnx_sha256"], "name": seg_meta.get("name")}
        if spec.border != trained_border:
            meta["inference_border"] = {"trained": trained_border, "used": spec.border, "chosen_on": "validation"}
        write_meta(tmp, meta)
        engine = Engine(tmp)
        va = np.flatnonzero(df["split"] == "val")[:32]
        x = normalise(np.asarray(images[va]), spec)
        meta["parity_max_prob_diff"] = check_parity(module, engine, x)
        meta["weights"] = "fp16 (conv-bn fused, computed in fp32)" if fp16 else "fp32"
        if fp16:  # effect of fp16 weight storage against the checkpoint as trained
            meta["fp16_rounding_max_prob_diff"] = max_prob_diff(FeatureExport(original).eval(), engine, x)
        if quantize == "int8":
            engine = _quantize(engine, tmp, meta, df, images, spec, max_accuracy_drop, int(cfg.get("seed", 0)))
        cal, ood = calibrate(engine, df, images, spec, seed=int(cfg.get("seed", 0)))
        np.savez(tmp / "extras.npz", **extras, **ood)
        meta.update(cal)
        meta["extras_sha256"] = sha256_file(tmp / "extras.npz")
        write_meta(tmp, meta)  # validated by the schema the engine loads with, and sealed
        Engine(tmp)  # re-open: the seal, schema and arrays must check out
    log.info("bundle written to %s (parity %.1e)", out_dir, meta["parity_max_prob_diff"])
    return meta


def _quantize(
    engine: Engine,
    folder: Path,
    meta: dict[str, Any],
    df,
    images: np.ndarray,
    spec: PreprocessSpec,
    max_drop: float,
    seed: int,
) -> Engine:
    """Replace folder/model.onnx by its int8 version (recorded in ``meta``) if validation accuracy holds; returns
    the engine on the int8 graph. ExportError otherwise."""
    labels = label_indices(df)
    va = np.flatnonzero(df["split"] == "val")
    tr = np.flatnonzero(df["split"] == "train")
    pick = np.sort(np.random.default_rng(seed).choice(tr, min(INT8_CALIB_IMAGES, len(tr)), False))
    before, _, _ = infer_cached(engine, images[va], spec)
    quantize_int8(folder / "model.onnx", folder / "int8.onnx", normalise(np.asarray(images[pick]), spec))
    fp32_bytes = (folder / "model.onnx").stat().st_size
    (folder / "int8.onnx").replace(folder / "model.onnx")
    meta["onnx_sha256"] = sha256_file(folder / "model.onnx")
    meta["weights"] = "int8 (static QDQ, per-channel; classifier fp32)"
    write_meta(folder, meta)
    int8 = Engine(folder)
    after, _, _ = infer_cached(int8, images[va], spec)
    acc_fp32 = float((before.argmax(1) == labels[va]).mean())
    acc_int8 = float((after.argmax(1) == labels[va]).mean())
    if acc_fp32 - acc_int8 > max_drop:
        raise ExportError(
            f"int8 quantisation costs {100 * (acc_fp32 - acc_int8):.2f} points of validation accuracy "
            f"(> {100 * max_drop:.2f}); export with --quantize none"
        )
    meta["quantization"] = {
        "method": "onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 activations, min-max",
        "calibration_images": int(len(pick)),
        "val_accuracy_fp32": acc_fp32,
        "val_accuracy_int8": acc_int8,
        "val_top1_agreement": float((before.argmax(1) == after.argmax(1)).mean()),
        "val_max_prob_diff": float(np.abs(softmax(before) - softmax(after)).max()),
        "fp32_onnx_bytes": fp32_bytes,
    }
    return int8


def _base_meta(
    configs: list[dict[str, Any]], spec: PreprocessSpec, folder: Path, model: torch.nn.Module
) -> dict[str, Any]:
    keys = ("name", "seed", "model", "optim", "trainer", "data")
    archs = [cfg["model"]["arch"] for cfg in configs]
    arch = archs[0] if len(archs) == 1 else f"ensemble of {len(archs)}: {' + '.join(archs)} (mean logits)"
    members = [{k: cfg[k] for k in keys if k in cfg} for cfg in configs]
    training = members[0] if len(members) == 1 else {"members": members}
    sources = [cfg["model"]["init_source"] for cfg in configs if cfg["model"].get("init_source")]
    credit = {"initial_weights": sources} if sources else {}  # the model card's credit: package, file, licence
    return {
        **credit,
        "format": BUNDLE_FORMAT,
        "name": f"cxr-triage-{'-'.join(archs)}-{spec.size}",
        "version": __version__,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "classes": list(CLASS_IDS),
        "display_names": DISPLAY_NAMES,
        "architecture": arch,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "preprocess": spec.to_dict(),
        "inputs": {"input": ["batch", 1, spec.size, spec.size]},
        "outputs": {"logits": ["batch", len(CLASS_IDS)], "features": ["batch", "C", "h", "w"]},
        "training": training,
        "onnx_sha256": sha256_file(folder / "model.onnx"),
        "extras_sha256": sha256_file(folder / "extras.npz"),
        "notice": "Research and education only; not a medical device and not a diagnosis.",
    }
