"""The one ordered class list. Every model output, table and file follows this order."""

from __future__ import annotations

import re

CLASS_IDS: tuple[str, ...] = ("covid", "lung_opacity", "normal", "viral_pneumonia")
DISPLAY_NAMES: dict[str, str] = {
    "covid": "COVID-19",
    "lung_opacity": "Lung Opacity",
    "normal": "Normal",
    "viral_pneumonia": "Viral Pneumonia",
}
NUM_CLASSES = len(CLASS_IDS)

# Normalised folder / label spellings (lower case, runs of space, '-' and '_' collapsed to '_').
_ALIASES: dict[str, str] = {
    "covid": "covid",
    "covid_19": "covid",
    "covid19": "covid",
    "lung_opacity": "lung_opacity",
    "lungopacity": "lung_opacity",
    "normal": "normal",
    "viral_pneumonia": "viral_pneumonia",
    "viralpneumonia": "viral_pneumonia",
}


def normalise_name(name: str) -> str:
    """Lower-case a folder or label name and collapse spaces, '-' and '_' into single '_'."""
    return re.sub(r"[\s_\-]+", "_", name.strip().lower()).strip("_")


def class_from_name(name: str) -> str | None:
    """Map a folder name or label ("Viral Pneumonia", "LUNG-OPACITY", "covid") to a class id, or None."""
    return _ALIASES.get(normalise_name(name))
