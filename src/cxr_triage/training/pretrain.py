"""Self-supervised pre-training of the classifier's backbone on unlabelled chest X-rays (SimSiam, Chen & He 2021).

Two augmented views of each image go through the backbone (the same timm network ``train`` uses), a projector and a
predictor MLP; the loss is the negative cosine similarity of each view's prediction with the other view's projection,
the latter under a stop-gradient. No labels are read: the images are the pool's *training* split (never validation
or test) plus any folders named in ``pretrain.folders`` (e.g. the lung-mask pairs' images). Each epoch is scored by a
k-nearest-neighbour probe (cosine, on pooled backbone features: a training-split sample as the memory, the
validation split as queries, labels used only here) so that a collapsed or useless representation shows at once.

``pretrain(cfg)`` writes ``<out_dir>/<name>/best.pt``, a cxr-triage checkpoint with a fresh classifier head: start a
supervised run from it with ``cxr-triage train model.init_from=<out_dir>/<name>/best.pt``.
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
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cxr_triage.core.classes import NUM_CLASSES
from cxr_triage.core.errors import ImageReadError
from cxr_triage.core.preprocess import PreprocessSpec, normalise, prepare
from cxr_triage.data.manifest import load_manifest
from cxr_triage.training.datasets import Augment, build_augment, build_cache, cache_key, label_indices, save_atomic
from cxr_triage.training.model import create_model, load_checkpoint, save_checkpoint
from cxr_triage.training.train import checkpoint_callbacks, prepare_run, single_device_trainer

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")


class TwoViews(Dataset):
    """Rows of a cached uint8 array -> two independently augmented, normalised views (1, H, W) of the same image."""

    def __init__(self, images: np.ndarray, spec: PreprocessSpec, augment: Augment) -> None:
        self.images, self.spec, self.augment = images, spec, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(np.asarray(self.images[i]).copy())[None]
        a, b = (self.augment(img).numpy()[0] for _ in range(2))
        return torch.from_numpy(normalise(a, self.spec)), torch.from_numpy(normalise(b, self.spec))


def mlp(dims: list[int], last_bn: bool) -> nn.Sequential:
    """Linear-BN-ReLU blocks; the last linear layer has a bias unless followed by BatchNorm (SimSiam's heads)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=last and not last_bn))
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


def knn_accuracy(
    memory: torch.Tensor, memory_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor, k: int = 20
) -> float:
    """Accuracy of a cosine k-nearest-neighbour vote (similarity-weighted) of queries against labelled memory."""
    sim = F.normalize(queries, dim=1) @ F.normalize(memory, dim=1).T
    top, idx = sim.topk(min(k, len(memory)), dim=1)
    votes = torch.zeros(len(queries), NUM_CLASSES).scatter_add_(1, memory_labels[idx], top.exp())
    return float((votes.argmax(1) == labels).float().mean())


class SimSiam(L.LightningModule):
    """The backbone with SimSiam's projector and predictor; only the backbone is kept afterwards."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.cfg, p = config, config["pretrain"]
        self.model = create_model(config["model"]["arch"]).to(memory_format=torch.channels_last)
        dim = self.model.num_features
        self.projector = mlp([dim, p["hidden_dim"], p["hidden_dim"], p["out_dim"]], last_bn=True)
        self.predictor = mlp([p["out_dim"], p["predictor_dim"], p["out_dim"]], last_bn=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        a, b = (v.to(memory_format=torch.channels_last) for v in batch)
        za, zb = self.projector(self.embed(a)), self.projector(self.embed(b))
        pa, pb = self.predictor(za), self.predictor(zb)
        loss = -0.5 * (F.cosine_similarity(pa, zb.detach()).mean() + F.cosine_similarity(pb, za.detach()).mean())
        # collapse monitor: per-dimension std of the normalised projections, ~1/sqrt(out_dim) if healthy, 0 if collapsed
        spread = F.normalize(za.detach().float(), dim=1).std(dim=0).mean() * math.sqrt(za.shape[1])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(a))
        self.log("train/spread", spread, on_step=False, on_epoch=True, batch_size=len(a))
        return loss

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (float32) of uint8 images (N, H, W), in inference mode."""
        spec = PreprocessSpec.from_dict(self.cfg["preprocess"])
        out = []
        for i in range(0, len(images), 128):
            x = torch.from_numpy(normalise(images[i : i + 128].numpy(), spec)).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cpu"):
                out.append(self.embed(x.to(memory_format=torch.channels_last)).float().cpu())
        return torch.cat(out)

    def configure_optimizers(self) -> dict[str, Any]:
        p = self.cfg["pretrain"]
        lr = p["lr"] * p["batch_size"] / 256  # SimSiam's linear scaling rule; the predictor keeps a fixed rate
        groups = [
            {"params": [*self.model.parameters(), *self.projector.parameters()], "fix_lr": False},
            {"params": self.predictor.parameters(), "fix_lr": True},
        ]
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=p["weight_decay"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, [lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))), lambda s: 1.0]
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class KnnProbe(Callback):
    """Logs ``val/knn_acc`` at the end of every training epoch (before the checkpoint and history callbacks read
    it): uint8 images and labels of the probe's memory and queries."""

    def __init__(self, probe: dict[str, torch.Tensor]) -> None:
        self.probe = probe

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was = pl_module.training
        pl_module.eval()
        with torch.inference_mode():
            memory, queries = (pl_module.features(self.probe[k]) for k in ("memory", "queries"))
        acc = knn_accuracy(memory, self.probe["memory_labels"], queries, self.probe["labels"])
        pl_module.log("val/knn_acc", acc, prog_bar=True)
        pl_module.train(was)


class PretrainHistory(Callback):
    """One row per epoch in history.csv: loss, spread, k-NN accuracy, wall time, images a second."""

    def __init__(self, run_dir: Path) -> None:
        self.path, self.t0 = run_dir / "history.csv", time.time()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = time.time()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        elapsed = time.time() - self.t0
        seen = trainer.num_training_batches * pl_module.cfg["pretrain"]["batch_size"]
        row = {
            "epoch": trainer.current_epoch,
            "train_loss": m.get("train/loss_epoch"),
            "spread": m.get("train/spread"),
            "val_knn_acc": m.get("val/knn_acc"),
            "epoch_s": round(elapsed, 1),
            "pairs_per_s": round(seen / max(elapsed, 1e-6), 1),
        }
        old = pd.read_csv(self.path) if self.path.exists() else pd.DataFrame()
        old = old[old["epoch"] < row["epoch"]] if len(old) else old
        pd.concat([old, pd.DataFrame([row])], ignore_index=True).to_csv(self.path, index=False)


def folder_images(folders: list[str], spec: PreprocessSpec, cache_dir: Path) -> np.ndarray:
    """Every readable image file under the folders (recursively), decoded and squared like the pool, cached; the
    unreadable ones are skipped with a warning naming how many."""
    paths = sorted(str(p) for f in folders for p in Path(f).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    df = pd.DataFrame({"abspath": paths})
    target = Path(cache_dir) / f"folders-{cache_key(df, spec)}-{spec.size}.npy"
    if target.exists():
        return np.load(target)
    images, bad = [], 0
    for path in paths:
        try:
            images.append(prepare(path, spec))
        except ImageReadError:
            bad += 1
    if bad:
        log.warning("pretrain.folders: %d of %d files are not readable images; skipped", bad, len(paths))
    if not images:
        raise ValueError(f"pretrain.folders: no readable images under {', '.join(folders)}")
    out = np.stack(images)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    save_atomic(target, out)
    return out


def pretrain(cfg: dict[str, Any], resume: bool = False) -> Path:
    """Run SimSiam pre-training; returns the run directory (holding best.pt, chosen by the k-NN probe)."""
    run_dir, last = prepare_run(cfg, resume)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    spec = PreprocessSpec.from_dict(cfg["preprocess"])
    if spec.lungs != "none":
        raise ValueError("pretrain reads whole images (preprocess.lungs: none)")
    p, d = cfg["pretrain"], cfg["data"]
    df = load_manifest(Path(d["manifest"]))
    cache_dir = Path(d["cache_dir"])
    train_df, val_df = (df[df["split"] == s].reset_index(drop=True) for s in ("train", "val"))
    images = [np.asarray(build_cache(train_df, spec, cache_dir))]
    if p["folders"]:
        images.append(folder_images(p["folders"], spec, cache_dir))
    pool = np.concatenate(images)
    rng = np.random.default_rng(int(cfg["seed"]))
    mem = np.sort(rng.choice(len(train_df), min(p["knn_memory"], len(train_df)), replace=False))
    val_images = np.asarray(build_cache(val_df, spec, cache_dir))
    probe = {
        "memory": torch.from_numpy(images[0][mem]),
        "memory_labels": torch.from_numpy(label_indices(train_df)[mem]).long(),
        "queries": torch.from_numpy(val_images),
        "labels": torch.from_numpy(label_indices(val_df)).long(),
    }
    aug = {**cfg["augment"], "scale": p["scale"], "hflip_p": 0.0}
    loader = DataLoader(
        TwoViews(pool, spec, build_augment(aug, spec.size)),
        batch_size=p["batch_size"],
        shuffle=True,
        drop_last=len(pool) > p["batch_size"],
        num_workers=d["num_workers"],
        persistent_workers=d["num_workers"] > 0,
    )
    log.info("pre-training on %d unlabelled images (%d from the train split)", len(pool), len(train_df))
    best, latest = checkpoint_callbacks(last.parent, monitor="val/knn_acc")
    callbacks = [KnnProbe(probe), best, latest, LearningRateMonitor("step"), PretrainHistory(run_dir)]
    trainer = single_device_trainer(cfg, p["epochs"], run_dir, callbacks)
    module = SimSiam(cfg)
    t0 = time.time()
    trainer.fit(module, loader, ckpt_path=str(last) if resume and last.exists() else None)
    state = torch.load(best.best_model_path or last, map_location="cpu", weights_only=True)["state_dict"]
    backbone = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model = create_model(cfg["model"]["arch"])
    model.load_state_dict(backbone)
    extra = {
        "pretrain": "simsiam",
        "images": int(len(pool)),
        "best_val_knn_acc": float(best.best_model_score or float("nan")),
        "best_checkpoint": Path(best.best_model_path).name if best.best_model_path else "last.ckpt",
        "fit_seconds": round(time.time() - t0),
    }
    save_checkpoint(run_dir / "best.pt", model, cfg, spec, extra)
    load_checkpoint(run_dir / "best.pt")  # what `train model.init_from=` will read
    log.info("pre-trained backbone: %s (k-NN accuracy %.4f)", run_dir / "best.pt", extra["best_val_knn_acc"])
    return run_dir
