"""Every human string of a result, in English and Korean: class names, decisions, reasons, table headers.

Advice sentences and the not-a-diagnosis notice live in ``advice.py``; everything else a person reads about a
prediction (in the CLI table, CSV/JSON, the HTTP API and the web page) comes from here, so the renderings
cannot disagree.
"""

from __future__ import annotations

from typing import Any, Literal

from cxr_triage.core.classes import CLASS_IDS, DISPLAY_NAMES

Lang = Literal["en", "ko"]
LANGS: tuple[str, ...] = ("en", "ko")

CLASS_NAMES: dict[str, dict[str, str]] = {
    "en": dict(DISPLAY_NAMES),
    "ko": {"covid": "코로나19", "lung_opacity": "폐 음영", "normal": "정상", "viral_pneumonia": "바이러스성 폐렴"},
}

DECISION_NAMES: dict[str, dict[str, str]] = {
    "en": {
        "accept": "Confident",
        "uncertain": "Uncertain: needs a radiologist",
        "rejected": "Not a chest X-ray",
        "error": "Unreadable",
    },
    "ko": {
        "accept": "확실",
        "uncertain": "불확실: 전문의 판독 필요",
        "rejected": "흉부 X선 아님",
        "error": "읽을 수 없음",
    },
}

TABLE_HEADERS: dict[str, dict[str, str]] = {
    "en": {
        "image": "image",
        "result": "result",
        "confidence": "confidence",
        "decision": "decision",
        "why": "why",
        "advice": "next step",
    },
    "ko": {
        "image": "영상",
        "result": "결과",
        "confidence": "신뢰도",
        "decision": "판정",
        "why": "사유",
        "advice": "다음 단계",
    },
}

# {a} or {b}: the two most likely classes of an uncertain answer
EITHER: dict[str, str] = {"en": "{a} or {b}", "ko": "{a} 또는 {b}"}

_UNLIKE = {"en": "looks unlike a chest X-ray: ", "ko": "흉부 X선 영상으로 보이지 않습니다: "}
REASONS: dict[str, dict[str, str]] = {
    "low_confidence": {
        "en": "confidence {value} is below the {limit} cut-off",
        "ko": "신뢰도({value})가 기준값({limit})보다 낮습니다",
    },
    "unfamiliar_features": {
        "en": _UNLIKE["en"] + "what the network sees is far from every training X-ray "
        "(distance {value}, limit {limit})",
        "ko": _UNLIKE["ko"] + "신경망이 본 특징이 학습한 X선 영상과 거리가 멉니다 (거리 {value}, 한계 {limit})",
    },
    "unfamiliar_layout": {
        "en": _UNLIKE["en"] + "the picture's layout differs from a frontal chest X-ray "
        "(residual {value}, limit {limit})",
        "ko": _UNLIKE["ko"] + "영상의 구도가 정면 흉부 X선과 다릅니다 (잔차 {value}, 한계 {limit})",
    },
    "colour": {
        "en": _UNLIKE["en"] + "it is in colour (colourfulness {value}, limit {limit}); X-rays are grey",
        "ko": _UNLIKE["ko"] + "컬러 영상입니다 (채도 {value}, 한계 {limit}). X선 영상은 흑백입니다",
    },
    "no_lungs": {
        "en": _UNLIKE["en"] + "no lung fields were found (lung area {value} of the image, limit {limit})",
        "ko": _UNLIKE["ko"] + "폐 영역을 찾지 못했습니다 (폐 면적 비율 {value}, 한계 {limit})",
    },
    "lung_layout": {
        "en": _UNLIKE["en"] + "the lung fields found are not where a chest X-ray's lungs are "
        "(overlap with the usual lung position {value}, limit {limit})",
        "ko": _UNLIKE["ko"] + "찾은 폐 영역이 흉부 X선의 폐 위치와 다릅니다 "
        "(일반적인 폐 위치와의 겹침 {value}, 한계 {limit})",
    },
    "one_lung": {
        "en": "only one lung field was found",
        "ko": "한쪽 폐 영역만 찾았습니다",
    },
    "lung_area": {
        "en": "the lung fields cover an implausible share of the image ({value}, limit {limit})",
        "ko": "폐 영역이 영상에서 차지하는 비율이 비정상적입니다 ({value}, 한계 {limit})",
    },
    "unusual_framing": {
        "en": "the picture's framing is unusual for a chest X-ray (residual {value}, limit {limit}), though both "
        "lungs were found where they belong: please check the image",
        "ko": "영상의 구도가 흉부 X선으로서는 드뭅니다 (잔차 {value}, 한계 {limit}). 두 폐는 제 위치에서 "
        "확인되었으니 영상을 확인해 주세요",
    },
    "unreadable": {
        "en": "the file could not be read: {detail}",
        "ko": "파일을 읽을 수 없습니다: {detail}",
    },
}


def check_lang(lang: str) -> str:
    """``lang`` if supported, else a ValueError naming the choices."""
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; choose one of {', '.join(LANGS)}")
    return lang


def class_name(class_id: str, lang: str = "en") -> str:
    """Display name of a class id ("covid" -> "COVID-19" / "코로나19")."""
    return CLASS_NAMES[check_lang(lang)][class_id]


def decision_name(decision: str, lang: str = "en") -> str:
    """Display name of a decision ("uncertain" -> "Uncertain: needs a radiologist")."""
    return DECISION_NAMES[check_lang(lang)][decision]


# decimals to show per reason code (more where needed to tell the value from its limit)
_DECIMALS = {
    "low_confidence": 2,
    "unfamiliar_features": 1,
    "unfamiliar_layout": 3,
    "unusual_framing": 3,
    "colour": 2,
    "no_lungs": 3,
    "lung_layout": 2,
    "lung_area": 2,
}


def _numbers(value: float, limit: float, decimals: int) -> tuple[str, str]:
    """value and limit as text, with enough decimals (up to 6) that they read differently."""
    while decimals < 6 and f"{value:.{decimals}f}" == f"{limit:.{decimals}f}" and value != limit:
        decimals += 1
    return f"{value:.{decimals}f}", f"{limit:.{decimals}f}"


def reason_text(
    code: str, lang: str = "en", value: float | None = None, limit: float | None = None, detail: str = ""
) -> str:
    """One reason in words, e.g. "confidence 0.62 is below the 0.98 cut-off"."""
    template = REASONS[code][check_lang(lang)]
    shown = ("", "")
    if value is not None and limit is not None:
        shown = _numbers(value, limit, _DECIMALS.get(code, 2))
    return template.format(value=shown[0], limit=shown[1], detail=detail)


def page_strings() -> dict[str, dict[str, Any]]:
    """The strings the web page shows for a result, per language (embedded in the page as JSON)."""
    return {
        lang: {
            "names": {c: CLASS_NAMES[lang][c] for c in CLASS_IDS},
            "decisions": dict(DECISION_NAMES[lang]),
            "or": EITHER[lang].replace("{a}", "").replace("{b}", "").strip(),
        }
        for lang in LANGS
    }
