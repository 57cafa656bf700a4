"""Triage advice per class and decision, in English and Korean. Always: not a diagnosis."""

from __future__ import annotations

from cxr_triage.runtime.i18n import LANGS

NOTICE = {
    "en": "This is decision support for research and education, not a diagnosis. A clinician must confirm any finding.",
    "ko": "이 결과는 연구·교육용 의사결정 보조 정보이며 진단이 아닙니다. 모든 소견은 의료진의 확인이 필요합니다.",
}

_BY_CLASS = {
    "covid": {
        "en": "Findings resemble COVID-19. Isolate from others, wear a mask, and get a COVID-19 test at a screening "
        "clinic (call ahead). Seek urgent care if you are short of breath.",
        "ko": "코로나19와 유사한 소견입니다. 다른 사람과의 접촉을 피하고 마스크를 착용한 뒤, 선별진료소에 미리 연락하여 "
        "코로나19 검사를 받으세요. 숨이 차면 즉시 응급 진료를 받으세요.",
    },
    "lung_opacity": {
        "en": "Findings suggest a lung opacity (a non-COVID lung infection or other lung disease). See a respiratory or "
        "pulmonology clinic: expect an examination, possibly blood tests, a follow-up X-ray or a CT scan.",
        "ko": "폐 음영(코로나19가 아닌 폐 감염 또는 다른 폐 질환)이 의심됩니다. 호흡기내과 진료를 받으세요. "
        "진찰과 함께 혈액 검사, 추가 X선 또는 CT 검사를 받을 수 있습니다.",
    },
    "viral_pneumonia": {
        "en": "Findings resemble viral pneumonia. See a respiratory or pulmonology clinic (a paediatrician for a child): "
        "expect an examination and possibly tests for the virus and a follow-up X-ray.",
        "ko": "바이러스성 폐렴과 유사한 소견입니다. 호흡기내과(소아는 소아청소년과) 진료를 받으세요. "
        "진찰과 함께 바이러스 검사나 추가 X선 검사를 받을 수 있습니다.",
    },
    "normal": {
        "en": "No lung finding was detected. If symptoms such as cough, fever or shortness of breath persist or worsen, "
        "see a doctor.",
        "ko": "폐에서 이상 소견이 발견되지 않았습니다. 기침, 발열, 호흡곤란 등의 증상이 계속되거나 악화되면 "
        "의사의 진료를 받으세요.",
    },
}

_BY_DECISION = {
    "uncertain": {
        "en": "The model is not confident about this image: have a radiologist read this image.",
        "ko": "모델이 이 영상에 대해 확신하지 못합니다. 영상의학과 전문의의 판독을 받으세요.",
    },
    "rejected": {
        "en": "This does not look like a frontal chest X-ray, so no result is given. Upload a frontal chest X-ray.",
        "ko": "정면 흉부 X선 영상으로 보이지 않아 결과를 제공하지 않습니다. 정면 흉부 X선 영상을 올려 주세요.",
    },
    "error": {
        "en": "The image could not be read, so no result is given.",
        "ko": "영상을 읽을 수 없어 결과를 제공하지 않습니다.",
    },
}


def advice(label: str, decision: str = "accept", lang: str = "en") -> str:
    """Advice sentence(s) for a predicted class id and decision, followed by the not-a-diagnosis notice."""
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; choose one of {', '.join(LANGS)}")
    if decision == "accept":
        if label not in _BY_CLASS:
            raise ValueError(f"unknown class id {label!r}")
        text = _BY_CLASS[label][lang]
    elif decision in _BY_DECISION:
        text = _BY_DECISION[decision][lang]
    else:
        raise ValueError(f"unknown decision {decision!r}; expected accept, uncertain, rejected or error")
    return f"{text} {NOTICE[lang]}"
