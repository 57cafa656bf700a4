"""The lung segmenter: a small MONAI U-Net trained from scratch with the same Lightning loop as the classifier.

``train_segmenter(cfg)`` is callable from tests; ``cxr-triage train-seg`` is a thin shell over it. A run writes
``<out_dir>/<name>/``: config.yaml, pairs.csv (the split), checkpoints/ (best + last, resumable), history.csv,
best.pt (state_dict + config, ``weights_only`` loadable).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.nets import UNet
from torch.utils.data import DataLoader, WeightedRandomSampler

from cxr_triage.core.preprocess import PreprocessSpec
from cxr_triage.training.model import CheckpointError
from cxr_triage.training.segdata import MaskPairs, build_pair_augment, cache_pairs, find_pairs, split_pairs
from cxr_triage.training.train import checkpoint_callbacks, prepare_run, single_device_trainer

log = logging.getLogger(__name__)
SEG_FORMAT = "cxr-triage-segmenter-checkpoint/1"


def create_segmenter(channels: list[int], num_res_units: int = 1) -> torch.nn.Module:
    """MONAI U-Net, 1 grey channel in, 1 lung logit out, BatchNorm (fused into the convolutions at export)."""
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=tuple(channels),
        strides=tuple([2] * (len(channels) - 1)),
        num_res_units=num_res_units,
        norm="batch",
    )


class Segmenter(L.LightningModule):
    """Dice + cross-entropy on one sigmoid channel; validation Dice and HD95 (MONAI metrics)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.cfg = config
        self.model = create_segmenter(config["model"]["channels"], config["model"]["num_res_units"])
        self.loss = DiceCELoss(sigmoid=True)
        self.dice = DiceMetric(include_background=True, reduction="mean")
        self.hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="mean")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x).float(), y)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        logits = self(x).float()
        self.log("val/loss", self.loss(logits, y), on_epoch=True, batch_size=len(y))
        pred = (logits > 0).float()
        self.dice(pred, y)
        if pred.sum() > 0:
            self.hd95(pred, y)

    def on_validation_epoch_end(self) -> None:
        self.log("val/dice", self.dice.aggregate().item(), prog_bar=True)
        hd = self.hd95.aggregate().item() if self.hd95.get_buffer() is not None else float("nan")
        self.log("val/hd95_px", hd)
        self.dice.reset()
        self.hd95.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.cfg["optim"]
        opt = torch.optim.AdamW(self.model.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs, eta_min=o["lr"] * 0.01)
        return {"optimizer": opt, "lr_scheduler": sched}


class SegHistory(Callback):
    """One row per epoch in history.csv (rewritten atomically; survives resume)."""

    def __init__(self, run_dir: Path) -> None:
        self.path, self.t0 = run_dir / "history.csv", time.time()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = time.time()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {"epoch": trainer.current_epoch, "train_loss": m.get("train/loss"), "val_loss": m.get("val/loss")}
        row |= {"val_dice": m.get("val/dice"), "val_hd95_px": m.get("val/hd95_px")}
        row["epoch_s"] = round(time.time() - self.t0, 1)
        old = pd.read_csv(self.path) if self.path.exists() else pd.DataFrame()
        hist = pd.concat([old[old["epoch"] < row["epoch"]] if len(old) else old, pd.DataFrame([row])])
        hist.to_csv(self.path.with_name("history.csv.tmp"), index=False)
        os.replace(self.path.with_name("history.csv.tmp"), self.path)


def save_segmenter(path: Path, model: torch.nn.Module, cfg: dict[str, Any], extra: dict[str, Any]) -> None:
    payload = {
        "format": SEG_FORMAT,
        "config": cfg,
        "preprocess": cfg["preprocess"],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra,
    }
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_segmenter(path: Path) -> tuple[torch.nn.Module, dict[str, Any], PreprocessSpec]:
    """(eval-mode U-Net, config, spec) from best.pt or a Lightning .ckpt of a segmenter run; no unpickling."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"segmenter checkpoint {path} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if "hyper_parameters" in payload:
        cfg = payload["hyper_parameters"]["config"]
        state = {k.removeprefix("model."): v for k, v in payload["state_dict"].items() if k.startswith("model.")}
    elif payload.get("format") == SEG_FORMAT:
        cfg, state = payload["config"], payload["state_dict"]
    else:
        raise CheckpointError(f"{path} is not a cxr-triage segmenter checkpoint")
    model = create_segmenter(cfg["model"]["channels"], cfg["model"]["num_res_units"])
    model.load_state_dict(state)
    return model.eval(), cfg, PreprocessSpec.from_dict(cfg["preprocess"])


def train_segmenter(cfg: dict[str, Any], resume: bool = False) -> Path:
    """Train on a lung-mask pairs folder; returns the run directory (holding best.pt and pairs.csv)."""
    run_dir, last = prepare_run(cfg, resume)
    d = cfg["data"]
    spec = PreprocessSpec.from_dict(cfg["preprocess"])
    df = find_pairs(Path(d["pairs"]))
    df["split"] = split_pairs(df, d["val"], d["test"], int(cfg["seed"]))
    df.to_csv(run_dir / "pairs.csv", index=False)
    images, masks = cache_pairs(df, spec)
    tr, va = np.flatnonzero(df["split"] == "train"), np.flatnonzero(df["split"] == "val")
    nw, bs = int(d["num_workers"]), int(d["batch_size"])
    augment = build_pair_augment(cfg["augment"], spec.size)
    over = d.get("oversample") or {}
    weights = df["origin"].map(lambda o: float(over.get(o, 1.0))).to_numpy()[tr]
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    sampler = WeightedRandomSampler(weights.tolist(), len(tr), generator=gen) if over else None
    train_dl = DataLoader(
        MaskPairs(images[tr], masks[tr], spec, augment),
        batch_size=bs,
        sampler=sampler,
        shuffle=sampler is None,
        drop_last=len(tr) > bs,
        num_workers=nw,
        persistent_workers=nw > 0,
    )
    val_dl = DataLoader(MaskPairs(images[va], masks[va], spec), batch_size=bs, num_workers=0)
    t = cfg["trainer"]
    best, latest = checkpoint_callbacks(last.parent, monitor="val/dice")
    stop = EarlyStopping("val/dice", mode="max", patience=t["patience"])
    trainer = single_device_trainer(cfg, t["max_epochs"], run_dir, [best, latest, stop, SegHistory(run_dir)])
    t0 = time.time()
    trainer.fit(Segmenter(cfg), train_dl, val_dl, ckpt_path=str(last) if resume and last.exists() else None)
    model, _, _ = load_segmenter(Path(best.best_model_path or last))
    counts = df.groupby(["split", "origin"]).size().unstack(fill_value=0).to_dict(orient="index")
    extra = {"best_val_dice": float(best.best_model_score or float("nan")), "fit_seconds": round(time.time() - t0)}
    save_segmenter(run_dir / "best.pt", model, cfg, {**extra, "pairs": str(d["pairs"]), "counts": counts})
    log.info("best segmenter: %s (val Dice %.4f)", best.best_model_path, best.best_model_score or 0)
    return run_dir
