"""Install tiers: which optional extra provides which import, and the one sentence to say when it is missing.

``pip install cxr-triage`` predicts (onnxruntime, no torch); ``[serve]`` adds the web page and API; ``[eval]``
the data and evaluation tools (ingest, eda, evaluate); ``[train]`` adds torch (training, export) and ``[eval]``.
"""

from __future__ import annotations

# extra -> the top-level modules it installs (an extra that includes another lists its modules too)
_SERVE = frozenset({"fastapi", "starlette", "uvicorn", "multipart", "python_multipart", "swagger_ui_bundle"})
_EVAL = frozenset({"pandas", "matplotlib", "jinja2", "sklearn", "imagehash", "openpyxl"})  # scipy: base (lung masks)
_TRAIN = frozenset(
    {"torch", "torchvision", "timm", "lightning", "torchmetrics", "onnx", "onnxscript", "safetensors", "monai"}
)
EXTRAS: dict[str, frozenset[str]] = {
    "serve": _SERVE,
    "eval": _EVAL,
    "train": _TRAIN | _EVAL | {"yaml"},
}
HINTS = {"serve": " (or run `make serve` in a clone)"}


class MissingExtraError(ImportError):
    """A command needs an optional extra that is not installed; the message names it and how to install it."""


def missing_extra_message(module: str, extra: str, needed_by: str) -> str:
    """The sentence for a missing extra, e.g. "`cxr-triage serve` needs the [serve] extra (...): pip install ..."."""
    return (
        f"{needed_by} needs the [{extra}] extra, which is not installed (no module {module!r}): "
        f"pip install 'cxr-triage[{extra}]'{HINTS.get(extra, '')}."
    )


def as_missing_extra(exc: ModuleNotFoundError, extra: str, needed_by: str) -> MissingExtraError | None:
    """A ``MissingExtraError`` if ``exc`` is about a module that ``extra`` installs, else None (a real bug)."""
    top = (exc.name or "").split(".")[0]
    if top not in EXTRAS[extra]:
        return None
    return MissingExtraError(missing_extra_message(top, extra, needed_by))
