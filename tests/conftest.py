"""Shared fixtures: a tiny synthetic dataset in the Kaggle folder layout, with every trap we know of.

Each class has its own visual pattern (a bright blob top-left / bottom-right, horizontal / vertical stripes)
on a random smooth background with noise, so a tiny model can learn the classes, while no two distinct
images are near-duplicates of each other. The dataset also holds one byte-identical pair, one near-duplicate
(re-encoded with a little noise), an unreadable ``.png``, an empty ``.jpg``, ``masks`` folders, a stray text
file and a ``sources.csv`` with origins for some files.

Use ``synthetic_dataset`` (a fresh copy per test), ``shared_dataset`` (one per session: do not modify it) or
``make_dataset(folder, n_per_class=..., seed=...)`` for a custom one. ``class_image(class_id, h, w, rng)``
draws one more image of a class.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# class id -> (folder holding the images, relative to the root; file name prefix)
LAYOUT: dict[str, tuple[str, str]] = {
    "covid": ("COVID/images", "COVID"),
    "lung_opacity": ("Lung_Opacity/images", "Lung_Opacity"),
    "normal": ("Normal/images", "Normal"),
    "viral_pneumonia": ("viral pneumonia", "Viral Pneumonia"),  # variant spelling, no images/ level
}
ORIGINS = {
    "covid": ("mixed-public-covid", "299"),
    "viral_pneumonia": ("kermany-paediatric", "256"),
    "normal": ("rsna-adult", "224"),
}


@dataclass(frozen=True)
class SyntheticDataset:
    """A synthetic dataset on disk and the facts the tests check against (all paths relative to root)."""

    root: Path
    files: dict[str, str]  # every readable image (duplicates included) -> class id
    exact_duplicates: tuple[str, str]  # the same bytes under two names
    near_duplicates: tuple[str, str]  # the same picture re-encoded with a little noise
    unreadable: dict[str, str]  # image-suffixed files that cannot be read -> a fragment of the reason
    ignored: tuple[str, ...]  # masks and stray files that must not reach the manifest
    origins: dict[str, str] = field(default_factory=dict)  # files listed in sources.csv -> origin
    copy_px: dict[str, str] = field(default_factory=dict)  # files listed in sources.csv -> copy_px

    @property
    def counts(self) -> dict[str, int]:
        """Readable images per class id."""
        return {c: sum(1 for v in self.files.values() if v == c) for c in LAYOUT}

    @property
    def n_images(self) -> int:
        return len(self.files)

    def path(self, rel: str) -> Path:
        return self.root / rel


def _smooth_field(h: int, w: int, rng: np.random.Generator, cells: int = 4) -> np.ndarray:
    """A random low-frequency field in [0, 1] of shape (h, w)."""
    small = rng.random((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)).clip(0, 1)


def class_image(class_id: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One grey uint8 image (h, w) with the class's pattern.

    covid: bright blob top-left; lung_opacity: bright blob bottom-right; normal: horizontal stripes;
    viral_pneumonia: vertical stripes. Each on a random smooth background with noise.
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / (h - 1), xx / (w - 1)
    img = 30 + 90 * _smooth_field(h, w, rng) + rng.normal(0, 6, (h, w))
    if class_id in ("covid", "lung_opacity"):
        cy, cx = (0.3, 0.3) if class_id == "covid" else (0.7, 0.7)
        cy, cx = cy + rng.uniform(-0.07, 0.07), cx + rng.uniform(-0.07, 0.07)
        sigma = rng.uniform(0.1, 0.14)
        img += rng.uniform(110, 130) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    elif class_id in ("normal", "viral_pneumonia"):
        coord = yy if class_id == "normal" else xx
        img += 45 * np.sin(2 * np.pi * rng.uniform(3.5, 4.5) * coord + rng.uniform(0, 2 * np.pi))
    else:
        raise ValueError(f"unknown class id {class_id!r}")
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _mask(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    lungs = sum(((xx - cx) ** 2 / 0.03 + (yy - 0.5) ** 2 / 0.12 < 1) for cx in (0.3, 0.7)) > 0
    return (lungs * 255).astype(np.uint8)


def make_dataset(root: Path, n_per_class: int = 10, seed: int = 0) -> SyntheticDataset:
    """Write the synthetic dataset under ``root`` (created) and return its facts."""
    if n_per_class < 3:
        raise ValueError("n_per_class must be >= 3 (the duplicates copy images 2 and 3)")
    root = Path(root)
    rng = np.random.default_rng(seed)
    files: dict[str, str] = {}
    pictures: dict[str, np.ndarray] = {}
    for cid, (folder, prefix) in LAYOUT.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(1, n_per_class + 1):
            h, w = (int(v) for v in rng.integers(64, 97, size=2))
            fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
            rel = f"{folder}/{prefix}-{i}.{ext}"
            arr = class_image(cid, h, w, rng)
            (root / rel).write_bytes(_encode(arr, fmt))
            files[rel], pictures[rel] = cid, arr

    def add(rel: str, data: bytes, cid: str | None = None) -> str:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        if cid is not None:
            files[rel] = cid
        return rel

    n = n_per_class
    # byte-identical copy of a COVID PNG under the next number
    exact_src = "COVID/images/COVID-3.png"
    exact = (exact_src, add(f"COVID/images/COVID-{n + 1}.png", (root / exact_src).read_bytes(), "covid"))
    # the second Viral Pneumonia picture, with a little noise, re-encoded as JPEG
    near_src = "viral pneumonia/Viral Pneumonia-2.jpg"
    src = pictures[near_src].astype(np.int16)
    noisy = np.clip(src + rng.integers(-2, 3, src.shape), 0, 255)
    near = (
        near_src,
        add(
            f"viral pneumonia/Viral Pneumonia-{n + 1}.jpg",
            _encode(noisy.astype(np.uint8), "JPEG"),
            "viral_pneumonia",
        ),
    )
    unreadable = {
        add(
            f"Lung_Opacity/images/Lung_Opacity-{n + 1}.png", rng.integers(0, 256, 600, np.uint8).tobytes()
        ): "not a recognised image",
        add(f"Normal/images/Normal-{n + 1}.jpg", b""): "empty",
    }
    ignored = (
        add("COVID/masks/COVID-1.png", _encode(_mask(80, 80), "PNG")),
        add("Normal/masks/Normal-1.png", _encode(_mask(90, 70), "PNG")),
        add("viral pneumonia/masks/Viral Pneumonia-1.png", _encode(_mask(70, 90), "PNG")),
        add("COVID/images/notes.txt", b"exported 2020-05-01; see sources.csv\n"),
        add("notes.txt", b"synthetic test dataset\n"),
    )
    origins: dict[str, str] = {}
    copy_px: dict[str, str] = {}
    for rel, cid in files.items():
        if cid in ORIGINS and (cid != "normal" or int(rel.rsplit("-", 1)[1].split(".")[0]) <= n // 2):
            origins[rel], copy_px[rel] = ORIGINS[cid]
    lines = ["file,label,origin,copy_px"]
    lines += [f"{rel},{files[rel]},{origins[rel]},{copy_px[rel]}" for rel in sorted(origins)]
    lines.append("COVID/images/COVID-999.png,covid,mixed-public-covid,299")  # a listed file that is absent
    (root / "sources.csv").write_text("\n".join(lines) + "\n")
    return SyntheticDataset(
        root=root,
        files=files,
        exact_duplicates=exact,
        near_duplicates=near,
        unreadable=unreadable,
        ignored=ignored,
        origins=origins,
        copy_px=copy_px,
    )


@pytest.fixture(name="make_dataset")
def make_dataset_fixture() -> Callable[..., SyntheticDataset]:
    """The factory: ``make_dataset(folder, n_per_class=10, seed=0) -> SyntheticDataset``."""
    return make_dataset


@pytest.fixture(name="class_image")
def class_image_fixture() -> Callable[..., np.ndarray]:
    """``class_image(class_id, h, w, rng) -> uint8 (h, w)``: one more image with a class's pattern."""
    return class_image


@pytest.fixture
def synthetic_dataset(tmp_path: Path) -> SyntheticDataset:
    """A fresh synthetic dataset under tmp_path/dataset; tests may modify it."""
    return make_dataset(tmp_path / "dataset")


@pytest.fixture(scope="session")
def shared_dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    """One synthetic dataset for the whole session; read it, never modify it."""
    return make_dataset(tmp_path_factory.mktemp("shared") / "dataset")


# --- a tiny hand-made bundle (no torch, no training): for tests that need *a* bundle, not a trained one ---


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sealed bundle with a hand-made classifier and a fixed-mask lung segmenter (``tests/tiny_bundle.py``), built in
    under a second without torch: for plumbing (shapes, errors, formats, CLI/HTTP contracts, heatmaps, gates). Its
    answers do not follow the classes; tests of a trained model's behaviour use ``smoke_bundle``. Do not modify it:
    copy it first."""
    from tests.tiny_bundle import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle") / "bundle")


# --- the web service's apps in one test module sharing one loaded predictor (needs the [serve] extra) ---


@pytest.fixture(scope="module")
def one_predictor() -> Iterator[None]:
    """Every app a module creates with ``create_app`` shares one loaded shipped-bundle predictor (loading it is the
    slow part of ``create_app``). Use with ``pytestmark = pytest.mark.usefixtures("one_predictor")``."""
    from cxr_triage.runtime.predictor import Predictor
    from cxr_triage.serve import app as service

    predictor = Predictor()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(service, "Predictor", lambda bundle_dir=None: predictor)
        yield


# --- a seconds-long smoke model: ingest -> train -> export on the synthetic dataset (needs the [train] extra) ---

REPO = Path(__file__).resolve().parents[1]
SMOKE_OVERRIDES = [
    "preprocess.size=64",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.epoch_samples=64",
    "trainer.max_epochs=2",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.patience=5",
    "model.drop_rate=0.0",
]


def smoke_config(work: Path, manifest: Path, name: str = "smoke", extra: list[str] | None = None) -> dict:
    """The default config shrunk to a seconds-long CPU run writing under ``work``."""
    from cxr_triage.core.config import load_config

    return load_config(
        REPO / "configs" / "default.yaml",
        [
            *SMOKE_OVERRIDES,
            f"out_dir={work}",
            f"name={name}",
            f"data.manifest={manifest}",
            f"data.cache_dir={work / 'cache'}",
            *(extra or []),
        ],
    )


@pytest.fixture(scope="session")
def smoke_manifest(shared_dataset: SyntheticDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cxr_triage.data.manifest import ingest, write_outputs

    out = tmp_path_factory.mktemp("smoke_data")
    write_outputs(ingest(shared_dataset.root, val=0.25, test=0.25, seed=0, workers=1), shared_dataset.root, out, {})
    return out / "manifest.csv"


@pytest.fixture(scope="session")
def smoke_run(smoke_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained smoke run directory (holds best.pt)."""
    pytest.importorskip("torch")
    from cxr_triage.training.train import train

    work = tmp_path_factory.mktemp("smoke_run")
    return train(smoke_config(work, smoke_manifest))


@pytest.fixture(scope="session")
def smoke_bundle(smoke_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle exported from the smoke run. Tests must not modify it: copy it first."""
    from cxr_triage.training.export import export_bundle

    out = tmp_path_factory.mktemp("smoke_bundle") / "bundle"
    # int8, like the shipped bundle; a near-random smoke model has no accuracy to keep, so no drop limit
    export_bundle(smoke_run / "best.pt", out, quantize="int8", max_accuracy_drop=1.0)
    # The smoke model's rejection gates are fitted on ~10 validation images, so they reject any slightly new
    # synthetic image. Widen them (and seal the bundle again) so UI and heatmap tests see accepted images;
    # the colour gate is a fixed threshold and stays as exported.
    from cxr_triage.runtime.bundle import write_meta

    meta = json.loads((out / "model.json").read_text())
    meta["ood"]["threshold"] *= 3
    meta["ood"]["pixel_threshold"] *= 3
    write_meta(out, meta)
    return out


@pytest.fixture(scope="session")
def smoke_bundle_fp16(smoke_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke run exported without quantisation (fp16-stored weights, fp32 compute)."""
    from cxr_triage.training.export import export_bundle

    out = tmp_path_factory.mktemp("smoke_bundle_fp16") / "bundle"
    export_bundle(smoke_run / "best.pt", out, quantize="none")
    return out


# --- a base install (`pip install .` plus pytest): test modules that need an extra are skipped, saying which ---

# a module a test file may import -> the extra that installs it
EXTRA_OF = {
    **dict.fromkeys(("torch", "torchvision", "timm", "lightning", "monai", "onnx", "onnxscript", "yaml"), "train"),
    **dict.fromkeys(("pandas", "imagehash", "matplotlib", "jinja2", "sklearn", "openpyxl"), "eval"),
    **dict.fromkeys(("fastapi", "uvicorn", "multipart", "fastapi_offline"), "serve"),
    **dict.fromkeys(("pynetdicom", "highdicom"), "dicom"),
    **dict.fromkeys(("ray", "pyarrow"), "scale"),
    **dict.fromkeys(("httpx", "playwright", "skimage", "hypothesis", "schemathesis"), "dev"),
}


class _ExtraModule(pytest.Module):
    """A test module whose import fails for want of an extra's package is skipped with the extra's name, unless CI
    is set (CI installs every extra: there a missing package is an error)."""

    def _getobj(self):
        try:
            return super()._getobj()
        except self.CollectError as exc:
            cause = exc.__cause__
            name = (getattr(cause, "name", None) or "").split(".")[0]
            if not isinstance(cause, ModuleNotFoundError) or name not in EXTRA_OF or os.environ.get("CI"):
                raise
            reason = f"{self.path.name} needs {name}: the [{EXTRA_OF[name]}] extra is not installed"
            raise pytest.skip.Exception(reason, allow_module_level=True) from None


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if module_path.name == "__init__.py":
        return None  # the package's own module: pytest's default
    return _ExtraModule.from_parent(parent, path=module_path)


# --- say loudly when the browser tests did not run ---


def pytest_unconfigure(config: pytest.Config) -> None:
    """A banner, as the very last lines of the run, when browser tests were skipped (no Chromium or Playwright):
    a green run then did not test the page."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = [
        r
        for r in reporter.stats.get("skipped", [])
        if "test_browser" in getattr(r, "nodeid", "") or "browser" in getattr(r, "keywords", {})
    ]
    if not skipped:
        return
    reasons = sorted({str(r.longrepr[-1]) if isinstance(r.longrepr, tuple) else str(r.longrepr) for r in skipped})
    reporter.write_sep("!", f"BROWSER TESTS SKIPPED ({len(skipped)}): THE WEB PAGE WAS NOT TESTED", red=True)
    for reason in reasons:
        reporter.write_line(f"  reason: {reason}", red=True)
    reporter.write_line(
        "  install Debian's chromium and fonts-noto-cjk and the [dev] extra (playwright); with CI=true they fail",
        red=True,
    )
