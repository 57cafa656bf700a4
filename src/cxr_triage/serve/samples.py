"""The example chest X-rays shipped in the package (``assets/samples``), with their labels."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cxr_triage.core.preprocess import IMAGE_SUFFIXES


@dataclass(frozen=True)
class Sample:
    """One bundled example: its file name and the label the dataset gives it."""

    name: str
    label: str
    path: Path


def samples_dir() -> Path:
    """The folder of bundled sample images."""
    return Path(str(resources.files("cxr_triage") / "assets" / "samples"))


def list_samples() -> list[Sample]:
    """The bundled samples listed in ``labels.csv`` that exist, in file-name order."""
    folder = samples_dir()
    with open(folder / "labels.csv", newline="", encoding="utf-8") as f:
        labels = {row["file"]: row["label"] for row in csv.DictReader(f)}
    return [
        Sample(name, labels[name], folder / name)
        for name in sorted(labels)
        if Path(name).suffix.lower() in IMAGE_SUFFIXES and Path(name).name == name and (folder / name).is_file()
    ]
