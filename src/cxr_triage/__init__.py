"""cxr-triage: chest X-ray triage (COVID-19, Lung Opacity, Normal, Viral Pneumonia) with heatmaps and advice.

Decision support for research and education only; not a medical device.

    from cxr_triage import Triage
    p = Triage().predict("chest.png")   # -> cxr_triage.Prediction

``import cxr_triage`` stays light: ``Triage`` and ``Prediction`` (and onnxruntime, numpy, pydantic behind them)
are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cxr_triage._version import __version__

__all__ = ["ModelInfo", "Prediction", "Reason", "Triage", "__version__"]

_LAZY = {
    "Triage": "cxr_triage.api",
    "Prediction": "cxr_triage.runtime.prediction",
    "ModelInfo": "cxr_triage.runtime.prediction",
    "Reason": "cxr_triage.runtime.prediction",
}

if TYPE_CHECKING:
    from cxr_triage.api import Triage
    from cxr_triage.runtime.prediction import ModelInfo, Prediction, Reason


def __getattr__(name: str) -> Any:
    """Import the public classes on first access (PEP 562)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cxr_triage' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
