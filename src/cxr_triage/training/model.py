"""The network: a timm backbone with global average pooling + one linear layer, and safe checkpoint I/O."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from cxr_triage.core.classes import CLASS_IDS, NUM_CLASSES
from cxr_triage.core.preprocess import PreprocessSpec

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message says why."""


def create_model(
    arch: str, pretrained: bool = False, pretrained_file: str | None = None, drop_rate: float = 0.0
) -> nn.Module:
    """timm model with 1 input channel and 4 outputs; checks its head is GAP + linear (needed for CAMs)."""
    kwargs: dict[str, Any] = {"in_chans": 1, "num_classes": NUM_CLASSES, "drop_rate": drop_rate}
    if pretrained_file:
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    try:
        model = timm.create_model(arch, pretrained=bool(pretrained or pretrained_file), **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"unknown timm architecture {arch!r}; see timm.list_models()") from None
        raise
    if not isinstance(model.get_classifier(), nn.Linear):
        raise ValueError(f"{arch} does not end in one linear layer; heatmaps need GAP + linear (e.g. resnet18)")
    return model


class FeatureExport(nn.Module):
    """Wraps a timm model so that it returns (logits, last feature map): the ONNX export's two outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.forward_features(x)
        return self.model.forward_head(feats), feats


class Ensemble(nn.Module):
    """Networks with GAP + linear heads, averaged in logit space, as one GAP + linear network.

    The members' feature maps are concatenated and the head holds every member's weights divided by their number, so
    the logits are the members' mean and heatmaps, the feature gate and the export treat it as a single network."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        heads = [m.get_classifier() for m in members]
        self.num_features = sum(h.in_features for h in heads)
        self.head = nn.Linear(self.num_features, NUM_CLASSES)
        with torch.no_grad():
            self.head.weight.copy_(torch.cat([h.weight for h in heads], 1) / len(heads))
            self.head.bias.copy_(torch.stack([h.bias for h in heads]).mean(0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.forward_features(x) for m in self.members], 1)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        return self.head


def save_checkpoint(
    path: Path,
    model: nn.Module,
    config: dict[str, Any],
    spec: PreprocessSpec,
    extra: dict[str, Any] | None = None,
) -> None:
    """Plain state_dict + config: loadable with ``torch.load(weights_only=True)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": "cxr-triage-checkpoint/1",
        "classes": list(CLASS_IDS),
        "arch": config["model"]["arch"],
        "config": config,
        "preprocess": spec.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, raw: bool = False) -> tuple[nn.Module, dict[str, Any], PreprocessSpec]:
    """Load a cxr-triage checkpoint (or a Lightning .ckpt of this project) without unpickling code.

    A Lightning checkpoint of a run with weight EMA holds both weight sets: the EMA ones unless ``raw``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a safe cxr-triage checkpoint ({type(exc).__name__}: {exc})") from None
    if "state_dict" in payload and "hyper_parameters" in payload:  # Lightning checkpoint
        cfg = payload["hyper_parameters"]["config"]
        sd = payload["state_dict"]
        has_ema = any(k.startswith("ema.module.") for k in sd)
        prefix = "ema.module." if has_ema and not raw else "model."
        state = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
        spec = PreprocessSpec.from_dict(cfg["preprocess"])
    elif payload.get("format") == "cxr-triage-checkpoint/1":
        if list(payload.get("classes", [])) != list(CLASS_IDS):
            raise CheckpointError(f"{path}: class list {payload.get('classes')} differs from {list(CLASS_IDS)}")
        cfg, state = payload["config"], payload["state_dict"]
        spec = PreprocessSpec.from_dict(payload["preprocess"])
    else:
        raise CheckpointError(f"{path} is not a cxr-triage checkpoint (no config/state_dict)")
    model = create_model(cfg["model"]["arch"], drop_rate=cfg["model"].get("drop_rate", 0.0))
    model.load_state_dict(state)
    model.eval()
    return model, cfg, spec


def load_ensemble(paths: list[Path]) -> tuple[nn.Module, list[dict[str, Any]], PreprocessSpec]:
    """One checkpoint, or several trained with the same preprocessing as an ``Ensemble``; (model, configs, spec)."""
    if not paths:
        raise CheckpointError("no checkpoint given")
    loaded = [load_checkpoint(Path(p)) for p in paths]
    spec = loaded[0][2]
    for p, (_, _, other) in zip(paths[1:], loaded[1:], strict=True):
        if other != spec:
            raise CheckpointError(f"{p} was trained with other preprocessing ({other}) than {paths[0]} ({spec})")
    configs = [cfg for _, cfg, _ in loaded]
    if len(loaded) == 1:
        return loaded[0][0], configs, spec
    return Ensemble([m for m, _, _ in loaded]).eval(), configs, spec
