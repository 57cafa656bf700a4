"""The Python API: ``Triage``, the public face of ``runtime.predictor.Predictor``, returns ``Prediction``s
(onnxruntime only, no torch).

>>> from cxr_triage import Triage
>>> triage = Triage()                        # the shipped model; Triage("bundle/") for another
>>> p = triage.predict("chest.png")          # or .dcm, .jpg, .tif, ...
>>> p.label, p.decision, p.reasons           # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from cxr_triage.runtime.i18n import check_lang
from cxr_triage.runtime.prediction import ModelInfo, Prediction
from cxr_triage.runtime.predictor import Predictor


class Triage:
    """A loaded model bundle (default: the one shipped in the package) that classifies chest X-rays.

    ``lang`` ("en" or "ko") sets the language of advice and reasons; ``threads`` the onnxruntime threads.
    Unreadable files give a ``Prediction`` with ``decision == "error"`` and the reason in ``error``;
    a wrong array (shape, channels) raises ``ValueError`` saying how to fix it.
    """

    def __init__(self, model: str | Path | None = None, lang: str = "en", threads: int | None = None) -> None:
        self.lang = check_lang(lang)
        self.predictor = Predictor(model, threads=threads)

    def __repr__(self) -> str:
        return f"Triage({str(self.predictor.dir)!r}, model={self.model.name!r} {self.model.version!r})"

    @property
    def model(self) -> ModelInfo:
        """Name, version and sha256 of the model that answers."""
        return self.predictor.model

    @property
    def classes(self) -> list[str]:
        """The class ids, in the order of the probabilities."""
        return list(self.predictor.meta.classes)

    def predict(self, path: str | Path, heatmap: bool = False) -> Prediction:
        """One image file (PNG, JPEG, BMP, TIFF, WebP or DICOM); ``heatmap`` adds the overlay as an RGB array."""
        return next(self.predict_many([path], batch_size=1, heatmaps=heatmap))

    def predict_many(
        self,
        paths: Iterable[str | Path],
        batch_size: int = 32,
        heatmaps: bool = False,
        heatmap_dir: str | Path | None = None,
        progress: bool = False,
    ) -> Iterator[Prediction]:
        """Predictions for many files, in order, one per path, yielded as each batch is scored.

        ``heatmaps`` keeps each overlay as an array, ``heatmap_dir`` writes them as PNGs (``heatmap_path``);
        ``progress`` shows a progress bar on stderr.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        files = [str(p) for p in paths]
        out_dir = Path(heatmap_dir) if heatmap_dir is not None else None
        scored = self.predictor.predict_files(files, self.lang, out_dir, batch_size, heatmaps=heatmaps)
        preds = (s.prediction for s in scored)
        if progress:
            from rich.progress import track

            preds = track(preds, total=len(files), description="predicting", transient=True)
        yield from preds

    def predict_array(self, image: np.ndarray, heatmap: bool = False, name: str = "array") -> Prediction:
        """One image already in memory: a 2-D grey array (any numeric type; 8-bit kept as is, wider min-max
        scaled) or an H x W x 3/4 RGB(A) array, e.g. from ``pydicom``'s ``pixel_array`` or ``PIL``."""
        if not isinstance(image, np.ndarray):
            raise ValueError(f"predict_array needs a numpy array, got {type(image).__name__}; use predict() for files")
        return self.predictor.predict(image, path=name, lang=self.lang, heatmap=heatmap)
