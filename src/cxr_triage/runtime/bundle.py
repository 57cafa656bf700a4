"""The model bundle's contract: one typed schema for model.json (shared by export and the engine) and a seal.

A bundle is a folder holding ``model.json``, ``model.onnx``, ``extras.npz`` and ``SHA256SUMS``, the seal: the sha256
of every other file, ``model.json`` included, in ``sha256sum`` format (``sha256sum -c SHA256SUMS`` checks it too).
Loading checks the seal first, then the schema (ranges included: temperature > 0, thresholds in [0, 1], the package's
class list), then the arrays of ``extras.npz``; any violation is a ``BundleError`` with one sentence.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cxr_triage.core.classes import CLASS_IDS, NUM_CLASSES
from cxr_triage.core.lungs import LUNG_GATE
from cxr_triage.core.preprocess import PreprocessSpec

BUNDLE_FORMAT = "cxr-triage-bundle/1"
MANIFEST = "SHA256SUMS"
FILES = ("extras.npz", "model.json", "model.onnx")
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](\S.*)$")


class BundleError(ValueError):
    """A model bundle is missing, altered or inconsistent; the message says what to do."""


Finite = Annotated[float, Field(allow_inf_nan=False)]
Unit = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow")


class Calibration(_Section):
    """softmax((logits + logit_bias) / temperature)."""

    temperature: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = 1.0
    logit_bias: Annotated[list[Finite], Field(min_length=NUM_CLASSES, max_length=NUM_CLASSES)] = [0.0] * NUM_CLASSES


class Abstain(_Section):
    """Below this confidence a prediction is 'uncertain'; the validation accuracy it was chosen for and the share
    of validation images it accepted (both recorded by export, None when not)."""

    threshold: Unit = 0.0
    target_accuracy: Unit | None = None
    val_coverage: Unit | None = None


class Gates(_Section):
    """Above any of these scores an input is 'rejected' (not a chest X-ray)."""

    threshold: NonNegative | None = None
    pixel_threshold: NonNegative | None = None
    colour_threshold: Unit | None = None


class SegmenterRef(_Section):
    """The lung segmenter the bundle carries: a sub-folder (a segmenter bundle) and the sha256 of its graph."""

    path: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")] = "lungs"
    sha256: Sha256


class LungGate(_Section):
    """Lung area share (of the image) below which an input is 'rejected', above which 'uncertain'; the lung layout
    (overlap with the segmenter's atlas) below which it is 'rejected' (two or more fields / one single field), and
    at or above which two lung fields vouch for a chest X-ray (``reasons.lungs_vouch``; None: never)."""

    min_area: Unit = LUNG_GATE["min_area"]
    max_area: Unit = LUNG_GATE["max_area"]
    min_layout: Unit | None = LUNG_GATE["min_layout"]
    min_layout_one_field: Unit | None = LUNG_GATE["min_layout_one_field"]
    vouch_layout: Unit | None = None  # two lung fields at this layout or more: the pixel-layout gate only abstains


class BundleMeta(_Section):
    """model.json: the fields the engine reads are typed and ranged; the rest (training, metrics...) is kept as is."""

    format: Literal["cxr-triage-bundle/1"]
    name: str = "cxr-triage"
    version: str = ""
    classes: list[str]
    preprocess: dict[str, Any]
    calibration: Calibration = Calibration()
    abstain: Abstain = Abstain()
    ood: Gates = Gates()
    onnx_sha256: Sha256
    extras_sha256: Sha256
    segmenter: SegmenterRef | None = None
    lung_gate: LungGate | None = None

    @field_validator("classes")
    @classmethod
    def _package_classes(cls, value: list[str]) -> list[str]:
        if list(value) != list(CLASS_IDS):
            raise ValueError(f"must be {list(CLASS_IDS)}, the classes of this package")
        return value

    @field_validator("preprocess")
    @classmethod
    def _spec(cls, value: dict[str, Any]) -> dict[str, Any]:
        PreprocessSpec.from_dict(value)  # its checks: size, channels, resize rule, border, std
        return value


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sentence(where: Path, exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "the top level"
    got = repr(err.get("input"))
    got = got if len(got) <= 40 else got[:37] + "..."
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {loc}: {msg} (got {got}); export the bundle again"


def validate_meta(meta: Any, where: Path | str = "model.json") -> BundleMeta:
    """The typed model.json, or a BundleError naming the first field that is wrong."""
    try:
        return BundleMeta.model_validate(meta)
    except ValidationError as exc:
        raise BundleError(_sentence(Path(where), exc)) from None


def read_manifest(folder: Path) -> dict[str, str]:
    """SHA256SUMS as {file name: sha256}; it must cover every bundle file."""
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"{folder} is not sealed (no {MANIFEST}); check its model.json, then run `cxr-triage seal {folder}`, "
            "or export the bundle again"
        )
    sums: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        m = _LINE.match(line.strip())
        name = m.group(2) if m else ""
        if line.strip() and (not m or name.startswith("/") or ".." in name.split("/") or name.count("/") > 1):
            raise BundleError(f"{path}: line {n} is not '<sha256>  <file name>'; export the bundle again")
        if m:
            sums[m.group(2)] = m.group(1)
    if missing := [f for f in FILES if f not in sums]:
        raise BundleError(f"{path} does not cover {', '.join(missing)}; export the bundle again")
    return sums


def verify_seal(folder: Path) -> dict[str, str]:
    """Every file listed in SHA256SUMS exists and matches; returns the listing."""
    sums = read_manifest(folder)
    if unsealed := [f for f in _sub_files(folder) if f not in sums]:
        raise BundleError(f"{folder}: {', '.join(unsealed)} not covered by its {MANIFEST}; export the bundle again")
    for name, digest in sums.items():
        f = folder / name
        if not f.is_file():
            raise BundleError(f"{folder} lacks {name}, which its {MANIFEST} lists; the bundle is incomplete")
        if sha256_file(f) != digest:
            raise BundleError(f"{f} does not match its sha256 in {MANIFEST}: the bundle was altered or is incomplete")
    return sums


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({type(exc).__name__}); export the bundle again") from None


def _check_file_hashes(folder: Path, meta: BundleMeta) -> None:
    for name, digest in (("model.onnx", meta.onnx_sha256), ("extras.npz", meta.extras_sha256)):
        if not (folder / name).is_file():
            raise BundleError(f"{folder} lacks {name}")
        if sha256_file(folder / name) != digest:
            raise BundleError(f"{folder / name} does not match the sha256 in model.json: the bundle was altered")


def read_bundle_meta(bundle_dir: Path | str) -> dict[str, Any]:
    """model.json of a sealed, valid bundle (as a dict): the seal, then the schema, then the file hashes."""
    folder = Path(bundle_dir)
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise BundleError(f"{folder} is not a model bundle (no model.json); export one with `cxr-triage export`")
    verify_seal(folder)
    raw = _load_json(meta_path)
    _check_file_hashes(folder, validate_meta(raw, meta_path))
    return raw


def default_bundle_dir() -> Path:
    """The bundle shipped inside the package (``cxr_triage/assets/model``)."""
    return Path(str(resources.files("cxr_triage") / "assets" / "model"))


@dataclass(frozen=True)
class Bundle:
    """A sealed, valid bundle's metadata: typed (``meta``), as written (``raw``, served as is), input geometry."""

    dir: Path
    meta: BundleMeta
    raw: dict[str, Any]
    spec: PreprocessSpec

    @classmethod
    def load(cls, bundle_dir: str | Path | None = None) -> Bundle:
        """The bundle in ``bundle_dir`` (None: the shipped one): seal, schema, file hashes checked; or BundleError."""
        folder = Path(bundle_dir) if bundle_dir else default_bundle_dir()
        raw = read_bundle_meta(folder)
        return cls(folder, validate_meta(raw, folder / "model.json"), raw, PreprocessSpec.from_dict(raw["preprocess"]))

    @property
    def info(self) -> dict[str, str]:
        """Name, version and sha256 of model.onnx: which model answers."""
        return {"name": self.meta.name, "version": self.meta.version, "sha256": self.meta.onnx_sha256}


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def seal(bundle_dir: Path | str) -> None:
    """Check model.json (schema, and its sha256 of model.onnx and extras.npz), then write SHA256SUMS over all files."""
    folder = Path(bundle_dir)
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise BundleError(f"{folder} is not a model bundle (no model.json)")
    _check_file_hashes(folder, validate_meta(_load_json(meta_path), meta_path))
    names = [*FILES, *_sub_files(folder)]
    _atomic_write(folder / MANIFEST, "".join(f"{sha256_file(folder / n)}  {n}\n" for n in names))


def _sub_files(folder: Path) -> list[str]:
    """Files of the bundle's sub-bundles (the lung segmenter in ``lungs/``), as 'lungs/model.onnx'..."""
    return sorted(f"{d.name}/{f.name}" for d in folder.iterdir() if d.is_dir() for f in d.iterdir() if f.is_file())


def write_meta(bundle_dir: Path | str, meta: dict[str, Any]) -> None:
    """Validate ``meta``, write it as model.json (atomically) and re-seal the bundle."""
    folder = Path(bundle_dir)
    validate_meta(meta, folder / "model.json")
    _atomic_write(folder / "model.json", json.dumps(meta, indent=2) + "\n")
    seal(folder)


def check_extras(extras: dict[str, np.ndarray], features: int | None = None, thumb_dim: int | None = None) -> None:
    """extras.npz holds finite arrays of consistent shapes: cam_weight (classes x C), the optional OOD statistics
    (ood_means K x C with ood_precision C x C; pix_mean D with pix_components k x D)."""
    cam = extras.get("cam_weight")
    if cam is None or cam.ndim != 2 or cam.shape[0] != NUM_CLASSES:
        raise BundleError(f"extras.npz: cam_weight must be a {NUM_CLASSES} x C array; export the bundle again")
    c = cam.shape[1] if features is None else features
    shapes = {"cam_weight": (NUM_CLASSES, c), "cam_bias": (NUM_CLASSES,), "ood_precision": (c, c)}
    if "ood_means" in extras:
        shapes["ood_means"] = (extras["ood_means"].shape[0], c)
    if "pix_mean" in extras:
        d = extras["pix_mean"].shape[-1] if thumb_dim is None else thumb_dim
        shapes |= {"pix_mean": (d,), "pix_components": (extras.get("pix_components", cam).shape[0], d)}
    for pair in (("ood_means", "ood_precision"), ("pix_mean", "pix_components")):
        if (pair[0] in extras) != (pair[1] in extras):
            raise BundleError(f"extras.npz has {pair[0]} or {pair[1]} without the other; export the bundle again")
    for key, arr in extras.items():
        if key in shapes and arr.shape != shapes[key]:
            raise BundleError(f"extras.npz: {key} has shape {arr.shape}, expected {shapes[key]}; export again")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise BundleError(f"extras.npz: {key} holds NaN or infinite values; export the bundle again")
