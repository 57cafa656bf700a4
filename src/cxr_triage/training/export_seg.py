"""Segmenter checkpoint -> segmenter bundle (ONNX + model.json), parity-checked, int8 only if Dice holds.

Dice and HD95 in model.json are measured on the held-out (``test``) pairs of the training run's split, at each
image's own size, after the same clean-up ``predict`` applies (two largest components, holes filled).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxr_triage._version import __version__
from cxr_triage.core.lungs import ATLAS_SIDE, input_mask, lung_atlas
from cxr_triage.core.preprocess import PreprocessSpec, load_grey, normalise, square
from cxr_triage.data.manifest import atomic_dir
from cxr_triage.runtime.engine import sha256_file
from cxr_triage.runtime.segment import SEG_BUNDLE_FORMAT, LungSegmenter
from cxr_triage.training.export import ExportError, quantize_int8
from cxr_triage.training.segdata import load_mask
from cxr_triage.training.segmenter import load_segmenter

log = logging.getLogger(__name__)
SEG_PARITY_TOL = 1e-3  # max |sigmoid(torch) - sigmoid(onnx)| per pixel
INT8_MAX_DICE_DROP = 0.005


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    inter = float(np.logical_and(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    return 2 * inter / total if total > 0 else 1.0


def hd95(pred: np.ndarray, truth: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance in pixels (MONAI's metric)."""
    from monai.metrics import compute_hausdorff_distance

    if not pred.any() or not truth.any():
        return float("nan")
    p = torch.from_numpy(pred[None, None].astype(np.float32))
    t = torch.from_numpy(truth[None, None].astype(np.float32))
    return float(compute_hausdorff_distance(p, t, percentile=95).item())


def score_pairs(seg: LungSegmenter, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per-pair Dice and HD95 at the image's own size (cleaned masks), with origin."""
    rows = []
    for r in pairs.itertuples():
        grey, truth = load_grey(r.image), load_mask(r.mask)
        pred = seg.masks([grey])[0]
        rows.append({"image": r.image, "origin": r.origin, "dice": dice(pred, truth), "hd95_px": hd95(pred, truth)})
    return pd.DataFrame(rows)


def summarise_scores(scores: pd.DataFrame) -> dict[str, Any]:
    def block(df: pd.DataFrame) -> dict[str, Any]:
        return {
            "n": int(len(df)),
            "dice_mean": round(float(df["dice"].mean()), 4),
            "dice_min": round(float(df["dice"].min()), 4),
            "hd95_px_mean": round(float(df["hd95_px"].mean()), 2),
        }

    out = {"all": block(scores)}
    out |= {o: block(g) for o, g in scores.groupby("origin")}
    nlm = scores[scores["origin"].isin(["shenzhen", "montgomery"])]
    if len(nlm):
        out["nlm"] = block(nlm)
    return out


def training_atlas(pairs: pd.DataFrame, spec: PreprocessSpec) -> np.ndarray:
    """The lung atlas of a segmenter: its training masks, brought to its square like its inputs, averaged on the
    coarse grid (``core.lungs.lung_atlas``)."""
    geometry = dataclasses.replace(spec, lungs="none")
    return lung_atlas(input_mask(load_mask(m), geometry) for m in pairs["mask"])


def fusable(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the network with every one-slope PReLU (MONAI's default activation) written as the LeakyReLU it
    is: the same function, but onnxruntime fuses LeakyRelu into the convolution before it and not PRelu (the
    shipped segmenter: batch 1 1.8 -> 0.9 ms on this CPU; RESULTS.md, session 7)."""
    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, torch.nn.PReLU) and mod.weight.numel() == 1:
            parent, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent), attr, torch.nn.LeakyReLU(float(mod.weight.detach().reshape(()))))
    return out.eval()


def export_segmenter(ckpt: Path, out_dir: Path, quantize: str = "int8") -> dict[str, Any]:
    """Write a verified segmenter bundle to ``out_dir``; returns its model.json content."""
    model, cfg, spec = load_segmenter(ckpt)
    run_dir = Path(ckpt).parent if Path(ckpt).name == "best.pt" else Path(ckpt).parent.parent
    pairs = pd.read_csv(run_dir / "pairs.csv")
    held = pairs[pairs["split"] == "test"]
    val = pairs[pairs["split"] == "val"]
    with atomic_dir(Path(out_dir)) as tmp:
        torch.onnx.export(
            fusable(model),
            (torch.zeros(1, 1, spec.size, spec.size),),
            str(tmp / "model.onnx"),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
        meta: dict[str, Any] = {
            "format": SEG_BUNDLE_FORMAT,
            "name": f"cxr-triage-lungs-unet-{spec.size}",
            "version": __version__,
            "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "architecture": f"MONAI UNet channels={cfg['model']['channels']} res_units={cfg['model']['num_res_units']}",
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "preprocess": spec.to_dict(),
            "postprocess": "two largest components (each >= 0.5 % of the image), holes filled",
            "training": {k: cfg[k] for k in ("name", "seed", "data", "model", "optim") if k in cfg},
            "onnx_sha256": sha256_file(tmp / "model.onnx"),
            "notice": "Trained on NLM (CC BY-NC-SA 4.0 masks) and Cohen et al. data: research use only.",
            "atlas": np.round(training_atlas(pairs[pairs["split"] == "train"], spec).astype(float), 3).tolist(),
            "atlas_from": f"mean of the {int((pairs['split'] == 'train').sum())} training masks, {ATLAS_SIDE} x "
            f"{ATLAS_SIDE} grid over the segmenter's square",
        }
        (tmp / "model.json").write_text(json.dumps(meta))
        seg = LungSegmenter(tmp)
        x = normalise(np.stack([square(load_grey(p), spec) for p in val["image"].iloc[:16]]), spec)
        with torch.no_grad():
            p_torch = torch.sigmoid(model(torch.from_numpy(x)))[:, 0].numpy()
        parity = float(np.abs(p_torch - 1 / (1 + np.exp(-seg.logits(x)))).max())
        if parity > SEG_PARITY_TOL:
            raise ExportError(f"onnxruntime differs from torch by {parity:.2e} (> {SEG_PARITY_TOL}) per pixel")
        meta["parity_max_prob_diff"] = parity
        fp32 = score_pairs(seg, val)
        meta["weights"] = "fp32"
        if quantize == "int8":
            calib = normalise(
                np.stack([square(load_grey(p), spec) for p in pairs[pairs["split"] == "train"]["image"].iloc[:128]]),
                spec,
            )
            quantize_int8(tmp / "model.onnx", tmp / "int8.onnx", calib)
            int8_bytes = (tmp / "int8.onnx").read_bytes()
            fp32_bytes = (tmp / "model.onnx").read_bytes()
            (tmp / "model.onnx").write_bytes(int8_bytes)
            meta["onnx_sha256"] = sha256_file(tmp / "model.onnx")
            (tmp / "model.json").write_text(json.dumps(meta))
            int8 = score_pairs(LungSegmenter(tmp), val)
            drop = float(fp32["dice"].mean() - int8["dice"].mean())
            meta["quantization"] = {
                "val_dice_fp32": float(fp32["dice"].mean()),
                "val_dice_int8": float(int8["dice"].mean()),
                "kept": drop <= INT8_MAX_DICE_DROP,
            }
            if drop <= INT8_MAX_DICE_DROP:
                meta["weights"] = "int8 (static QDQ, per-channel)"
            else:
                log.info("int8 costs %.4f val Dice (> %.3f): keeping fp32", drop, INT8_MAX_DICE_DROP)
                (tmp / "model.onnx").write_bytes(fp32_bytes)
                meta["onnx_sha256"] = sha256_file(tmp / "model.onnx")
            (tmp / "int8.onnx").unlink()
            (tmp / "model.json").write_text(json.dumps(meta))
        scores = score_pairs(LungSegmenter(tmp), held)
        meta["heldout"] = summarise_scores(scores)
        meta["val_dice_mean"] = round(float(fp32["dice"].mean()), 4)
        (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        LungSegmenter(tmp)
    log.info("segmenter bundle written to %s: held-out %s", out_dir, meta["heldout"])
    return meta
