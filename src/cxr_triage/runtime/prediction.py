"""``Prediction``: the one typed result that the Python API, every CLI format and the HTTP API return.

A pydantic model, so it has a JSON schema (``Prediction.model_json_schema()``, also in the service's OpenAPI
document) and one JSON form (``model_dump(mode="json")``). The CSV row (``csv_row``) and the CLI table are
derived from it, never built beside it. Rejected and unreadable inputs carry no label and no confidence; their
probabilities (when the network ran) stay under ``p_<class>`` for those who want them.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, WithJsonSchema

from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.runtime import i18n
from cxr_triage.runtime.advice import advice
from cxr_triage.runtime.reasons import Finding

ClassId = Literal["covid", "lung_opacity", "normal", "viral_pneumonia"]
Decision = Literal["accept", "uncertain", "rejected", "error"]
ReasonCode = Literal[
    "low_confidence",
    "unfamiliar_features",
    "unfamiliar_layout",
    "colour",
    "no_lungs",
    "lung_layout",
    "one_lung",
    "lung_area",
    "unusual_framing",
    "unreadable",
]
PROB_COLUMNS = [f"p_{c}" for c in CLASS_IDS]
# CSV: the DESIGN.md columns first and in order, then the rest of the contract (model flattened, reasons joined)
CSV_COLUMNS = [
    "path",
    "label",
    "confidence",
    *PROB_COLUMNS,
    "decision",
    "error",
    "advice",
    "ood_score",
    "reasons",
    "lung_attention",
    "heatmap_path",
    "model_name",
    "model_version",
    "model_sha256",
]
NOT_IN_CSV = {"lang": "the language of advice and reasons", "heatmap": "an image", "image": "an image"}


def png_bytes(rgb: np.ndarray) -> bytes:
    """A uint8 grey (H, W) or RGB (H, W, 3) array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _as_image(value: Any) -> np.ndarray:
    """An image field from an array or a base64 PNG (the JSON form)."""
    if isinstance(value, str):
        try:
            with Image.open(io.BytesIO(base64.b64decode(value, validate=True))) as im:
                value = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
        except (binascii.Error, OSError) as exc:
            raise ValueError(f"not a base64 PNG ({exc})") from None
    arr = np.asarray(value)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"expected a uint8 (H, W) or (H, W, 3) array, got {arr.dtype} {arr.shape}")
    return arr


ImageArray = Annotated[
    np.ndarray,
    PlainValidator(_as_image),
    PlainSerializer(lambda a: base64.b64encode(png_bytes(a)).decode("ascii"), when_used="json"),
    WithJsonSchema({"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png"}),
]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class ModelInfo(BaseModel):
    """Which model answered."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    sha256: str = Field(description="sha256 of the bundle's model.onnx")


class Reason(BaseModel):
    """Why an answer is uncertain, rejected or missing, in words and in numbers."""

    model_config = ConfigDict(frozen=True)

    code: ReasonCode
    text: str = Field(description="the reason in words, in the prediction's language")
    value: float | None = Field(None, description="the measured value (confidence, distance, residual, colour)")
    limit: float | None = Field(None, description="the cut-off it was compared with")


class Prediction(BaseModel):
    """One chest X-ray's answer: class, probabilities, decision, reasons and advice. Not a diagnosis."""

    # every field is always in the JSON form, so the (serialization) schema marks them all required
    model_config = ConfigDict(frozen=True, json_schema_serialization_defaults_required=True)

    path: str = Field(description="the input's path or name")
    label: ClassId | None = Field(description="the most likely class; null when rejected or unreadable")
    confidence: Probability | None = Field(description="probability of `label`; null when there is no label")
    p_covid: Probability | None = Field(description="calibrated probability; null when unreadable")
    p_lung_opacity: Probability | None
    p_normal: Probability | None
    p_viral_pneumonia: Probability | None
    decision: Decision = Field(description="accept; uncertain (read by a radiologist); rejected (not a chest X-ray)")
    error: str | None = Field(None, description="why the input could not be read (decision 'error')")
    advice: str = Field(description="what to do next, then the not-a-diagnosis notice, in `lang`")
    ood_score: float | None = Field(None, description="distance from the training images; large = unfamiliar")
    reasons: list[Reason] = Field(default_factory=list, description="why the answer is not 'accept' (empty if it is)")
    lung_attention: Probability | None = Field(
        None, description="share of the heatmap's mass inside the lung fields (null without a lung segmenter)"
    )
    heatmap_path: str | None = Field(None, description="where the heatmap overlay PNG was written, if asked")
    model: ModelInfo
    lang: i18n.Lang = "en"
    heatmap: ImageArray | None = Field(None, description="class activation map over the image (RGB), if asked")
    image: ImageArray | None = Field(None, description="the grey input as the model read it, if asked")

    @classmethod
    def answer(
        cls,
        path: str,
        probs: np.ndarray,
        decision: str,
        found: list[Finding],
        ood: float,
        model: ModelInfo,
        lang: str = "en",
        **extra: Any,
    ) -> Prediction:
        """The prediction for calibrated probabilities, the decision and the findings that made it
        (``reasons.judge``); ``extra`` sets the optional fields (heatmap, image, heatmap_path)."""
        k = int(np.argmax(probs))
        labelled = decision != "rejected"
        return cls(
            path=path,
            label=CLASS_IDS[k] if labelled else None,
            confidence=round(float(probs[k]), 6) if labelled else None,
            **{col: round(float(p), 6) for col, p in zip(PROB_COLUMNS, probs, strict=True)},
            decision=decision,
            advice=advice(CLASS_IDS[k], decision, lang),
            ood_score=round(float(ood), 3),
            reasons=[_reason(f.code, lang, f.value, f.limit) for f in found],
            model=model,
            lang=lang,
            **extra,
        )

    @classmethod
    def unreadable(cls, path: str, error: str, model: ModelInfo, lang: str = "en") -> Prediction:
        """The prediction for an input that could not be read: no label, no probabilities, the reason."""
        return cls(
            path=path,
            label=None,
            confidence=None,
            **dict.fromkeys(PROB_COLUMNS),
            decision="error",
            error=error,
            advice=advice("", "error", lang),
            reasons=[_reason("unreadable", lang, detail=error)],
            model=model,
            lang=lang,
        )

    @property
    def probabilities(self) -> dict[str, float]:
        """Class id -> probability, in the class order (empty when unreadable)."""
        values = {c: getattr(self, f"p_{c}") for c in CLASS_IDS}
        return {} if None in values.values() else values

    def top(self, n: int = 2) -> list[tuple[str, float]]:
        """The ``n`` most likely (class id, probability) pairs, most likely first."""
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:n]

    def in_lang(self, lang: str) -> Prediction:
        """The same prediction with advice and reasons in another language."""
        top = self.label or (self.top(1)[0][0] if self.probabilities else "")
        reasons = [_reason(r.code, lang, r.value, r.limit, self.error or "") for r in self.reasons]
        return self.model_copy(update={"lang": lang, "advice": advice(top, self.decision, lang), "reasons": reasons})

    def csv_row(self) -> dict[str, Any]:
        """The CSV columns (``CSV_COLUMNS``): the JSON form flattened; reasons joined by '; ', no images."""
        data = self.model_dump(mode="python", exclude=set(NOT_IN_CSV))
        model = data.pop("model")
        data["reasons"] = "; ".join(r["text"] for r in data["reasons"])
        data.update({f"model_{k}": v for k, v in model.items()})
        return {col: data[col] for col in CSV_COLUMNS}

    def __repr_args__(self) -> Any:
        """A short repr: path, label, decision and confidence (the images and advice are long)."""
        return [(k, getattr(self, k)) for k in ("path", "label", "decision", "confidence")]


def _reason(code: str, lang: str, value: float | None = None, limit: float | None = None, detail: str = "") -> Reason:
    text = i18n.reason_text(code, lang, value, limit, detail)
    return Reason(code=code, text=text, value=None if value is None else round(value, 6), limit=limit)
