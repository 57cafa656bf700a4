"""The one route every image takes: ``Predictor`` (onnxruntime only; never imports torch).

decode (``read``) -> lungs (the bundle's segmenter) -> geometry (the model square) -> forward (``Engine``) ->
decide (``reasons.judge``, once) -> ``Prediction``. ``Predictor.score`` is that route for a batch of decoded images;
the command line, the Python API (``api.Triage``), the web service, the DICOM node, the Ray path and evaluation
all reach it, through ``predict`` (one image), ``predict_files`` (paths, decoded in threads) or ``score`` itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_triage.core.decode import Source
from cxr_triage.core.preprocess import ImageReadError, PreprocessSpec, load_grey, model_square, normalise, square
from cxr_triage.runtime.bundle import Bundle, BundleMeta
from cxr_triage.runtime.engine import Engine, calibrate, ood_scores, pixel_residual, thumbnails
from cxr_triage.runtime.predict import fit, overlay
from cxr_triage.runtime.prediction import ModelInfo, Prediction
from cxr_triage.runtime.reasons import judge
from cxr_triage.runtime.segment import LungSegmenter

NON_FINITE = "the model gave non-finite probabilities (NaN or infinity) for this image; check the model bundle"


@dataclass
class Item:
    """One image on its way through the predictor: its name in the answer, and the decoded image with what the
    loader made of it ahead of the network, or why it could not be read (``error``)."""

    path: str
    grey: np.ndarray | None = None  # the grey image (shrunk by ``fit`` on the file route: overlays need no more)
    colour: float = 0.0  # colourfulness (0 for grey inputs)
    square: np.ndarray | None = None  # the whole-image model square (None for lung-view classifiers)
    seg_square: np.ndarray | None = None  # the segmenter's square (None without a segmenter)
    error: str | None = None


@dataclass(frozen=True)
class Scored:
    """A prediction and the network's numbers behind it (None when the image was not scored): for evaluation."""

    prediction: Prediction
    logits: np.ndarray | None = None  # raw logits of the classifier
    probs: np.ndarray | None = None  # calibrated probabilities, unrounded


class Predictor:
    """A loaded bundle: its classifier session (``Engine``), its lung segmenter (or None) and the decision rule with
    the bundle's typed thresholds. Thread-safe (nothing in it changes after loading)."""

    def __init__(self, bundle: Bundle | str | Path | None = None, threads: int | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.engine = Engine(self.bundle, threads)
        self.segmenter: LungSegmenter | None = self.engine.segmenter

    @property
    def dir(self) -> Path:
        return self.bundle.dir

    @property
    def meta(self) -> BundleMeta:
        return self.bundle.meta

    @property
    def spec(self) -> PreprocessSpec:
        return self.bundle.spec

    @property
    def info(self) -> dict[str, str]:
        return self.bundle.info

    @property
    def model(self) -> ModelInfo:
        """Name, version and sha256 of the model that answers."""
        return ModelInfo(**self.info)

    def decode(self, source: Source, path: str = "", name: str = "", shrink: bool = False) -> Item:
        """Decode one image and make its squares (everything per image that needs no network; loader threads run
        it). ``name`` helps the decoder (bytes); ``shrink`` keeps the grey image only as large as overlays need.
        Raises ImageReadError for unreadable input."""
        info: dict[str, float] = {}
        grey = load_grey(source, name=name, info=info)
        sq = square(grey, self.spec) if self.spec.lungs == "none" else None
        seg_sq = square(grey, self.segmenter.spec) if self.segmenter is not None else None
        return Item(path, fit(grey) if shrink else grey, info.get("colourfulness", 0.0), sq, seg_sq)

    def read(self, source: Source, path: str = "", name: str = "", shrink: bool = False) -> Item:
        """``decode``, with an unreadable input as an Item holding the reason (one bad file never stops a batch)."""
        try:
            return self.decode(source, path, name, shrink)
        except ImageReadError as exc:
            return Item(path, error=str(exc))
        except Exception as exc:  # load_grey raises only ImageReadError; this keeps the batch going whatever happens
            return Item(path, error=f"{path}: cannot read ({type(exc).__name__})")

    def score(self, items: list[Item], lang: str = "en", heatmaps: bool = False, image: bool = False) -> list[Scored]:
        """The route for a batch: lungs, model squares, one forward pass, the decision (once) and the predictions,
        in order (unreadable items: decision 'error'). ``heatmaps`` adds the overlays, ``image`` the grey input."""
        model = self.model
        good = [it for it in items if it.error is None and it.grey is not None]
        scored = iter(self._score(good, model, lang, heatmaps) if good else [])
        out = []
        for it in items:
            if it.error is not None or it.grey is None:
                out.append(Scored(Prediction.unreadable(it.path, it.error or "", model, lang)))
                continue
            s = next(scored)
            if image:
                s = Scored(s.prediction.model_copy(update={"image": fit(it.grey)}), s.logits, s.probs)
            out.append(s)
        return out

    def _score(self, items: list[Item], model: ModelInfo, lang: str, heatmaps: bool) -> list[Scored]:
        greys = [it.grey for it in items]
        seg, spec, extras = self.segmenter, self.spec, self.engine.extras
        small = stats = None  # lung masks at the segmenter's size: statistics and attention need no more
        if seg is not None:
            small, stats = seg.square_lungs(
                [it.seg_square if it.seg_square is not None else square(it.grey, seg.spec) for it in items]
            )
        full: list[np.ndarray | None] = [None] * len(items)  # at each image's size: lung views and overlays only
        if small is not None and (spec.lungs != "none" or heatmaps):
            full = [seg.to_image(m, g.shape) for m, g in zip(small, greys, strict=True)]
        squares = [it.square for it in items]
        if spec.lungs != "none" or any(q is None for q in squares):
            squares = [model_square(g, spec, m) for g, m in zip(greys, full, strict=True)]
        x = normalise(np.stack(squares), spec)
        logits, feats = self.engine.forward(x)
        probs = calibrate(logits, self.meta.calibration)
        ood = ood_scores(feats.mean(axis=(2, 3)), extras)
        pix = pixel_residual(thumbnails(x), extras)
        cams: list = [None] * len(items)  # class-activation maps: for lung attention and heatmaps only
        if small is not None or heatmaps:
            cams = [self.engine.cam(f, int(p.argmax())) for f, p in zip(feats, probs, strict=True)]
        out = []
        for i, (it, grey) in enumerate(zip(items, greys, strict=True)):
            lungs = stats[i] if stats is not None else None
            decision, found = judge(self.meta, float(probs[i].max()), float(ood[i]), float(pix[i]), it.colour, lungs)
            if decision == "error":  # non-finite probabilities: never a label, never accept
                out.append(Scored(Prediction.unreadable(it.path, NON_FINITE, model, lang), logits[i], probs[i]))
                continue
            extra: dict = {}
            if small is not None:
                extra["lung_attention"] = round(seg.attention(cams[i], small[i], grey.shape, spec), 3)
            pred = Prediction.answer(it.path, probs[i], decision, found, float(ood[i]), model, lang, **extra)
            if heatmaps and decision != "rejected":
                pred = pred.model_copy(update={"heatmap": overlay(grey, cams[i], spec, lungs=full[i])})
            out.append(Scored(pred, logits[i], probs[i]))
        return out

    def predict(
        self,
        source: Source,
        path: str = "upload",
        name: str = "",
        lang: str = "en",
        heatmap: bool = False,
        image: bool = False,
    ) -> Prediction:
        """One image (a file path, bytes, an array); ``image`` adds it, shrunk for display, to the prediction.
        Raises ImageReadError for unreadable input."""
        return self.score([self.decode(source, path, name)], lang, heatmap, image)[0].prediction

    def predict_files(
        self,
        paths: list[str],
        lang: str = "en",
        heatmap_dir: Path | None = None,
        batch_size: int = 32,
        workers: int = 2,
        heatmaps: bool = False,
    ) -> Iterator[Scored]:
        """Every path scored, in order (unreadable files: decision 'error'); decoding runs in threads while the
        previous batch is scored. ``heatmap_dir``: write overlay PNGs there; ``heatmaps``: keep them as arrays."""
        if heatmap_dir is not None:
            heatmap_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
            pending = pool.map(lambda b: [self.read(p, p, shrink=True) for p in b], batches)
            for idx, items in enumerate(pending):
                for j, s in enumerate(self.score(items, lang, heatmaps or heatmap_dir is not None)):
                    pred = s.prediction
                    if heatmap_dir is not None and pred.heatmap is not None:
                        target = heatmap_dir / f"{idx * batch_size + j:05d}_{Path(pred.path).stem}_heatmap.png"
                        Image.fromarray(pred.heatmap).save(target)
                        keep = pred.heatmap if heatmaps else None
                        pred = pred.model_copy(update={"heatmap_path": str(target), "heatmap": keep})
                        s = Scored(pred, s.logits, s.probs)
                    yield s
