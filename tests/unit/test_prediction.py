"""The result contract: Prediction, its reasons and languages, and the CSV / JSON / table / HTTP renderings of it."""

from __future__ import annotations

import csv
import io
import json
import re
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxr_triage import Prediction, Triage
from cxr_triage.cli import app
from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.core.safe_text import csv_cell
from cxr_triage.runtime import i18n
from cxr_triage.runtime.advice import NOTICE
from cxr_triage.runtime.bundle import Abstain, BundleMeta, Gates
from cxr_triage.runtime.formats import table_cells, table_headers, write_csv
from cxr_triage.runtime.prediction import CSV_COLUMNS, NOT_IN_CSV, ModelInfo, ReasonCode
from cxr_triage.runtime.reasons import GATES, Finding, decision_of, findings, judge

HANGUL = re.compile(r"[\uac00-\ud7a3]")
DESIGN_COLUMNS = "path,label,confidence,p_covid,p_lung_opacity,p_normal,p_viral_pneumonia,decision,error".split(",")
MODEL = ModelInfo(name="m", version="1", sha256="0" * 64)
META = BundleMeta.model_construct(
    abstain=Abstain(threshold=0.98), ood=Gates(threshold=30.0, pixel_threshold=0.5, colour_threshold=0.08)
)
CUT = META.abstain.threshold


def answer(probs: list[float], found: list[Finding], lang: str = "en", **extra: object) -> Prediction:
    decision = decision_of(found)
    return Prediction.answer("x.png", np.array(probs, np.float32), decision, found, 12.0, MODEL, lang, **extra)


# --- the model and its reasons (no network needed) ---


def test_findings_are_the_decision_rule():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        conf, ood, pix, col = rng.uniform(0.2, 1.0), rng.uniform(0, 60), rng.uniform(0, 1), rng.uniform(0, 0.2)
        found = findings(conf, ood, META.ood, CUT, pix, col)
        assert judge(META, conf, ood, pix, col) == (decision_of(found), found)
        assert all(f.value > f.limit for f in found if f.code != "low_confidence")
    assert findings(0.99, 1.0, META.ood, CUT) == []
    assert findings(0.62, 1.0, META.ood, CUT) == [Finding("low_confidence", 0.62, 0.98)]
    gates = findings(
        0.99, 40.0, META.ood, CUT, 0.7, 0.3
    )  # every failed gate is a reason; confidence is not judged then
    assert [f.code for f in gates] == [code for code, _ in GATES]


def test_reason_texts_say_why_in_both_languages():
    assert i18n.reason_text("low_confidence", "en", 0.62, 0.98) == "confidence 0.62 is below the 0.98 cut-off"
    assert i18n.reason_text("low_confidence", "en", 0.976, 0.98) == "confidence 0.976 is below the 0.980 cut-off"
    assert i18n.reason_text("colour", "en", 0.31, 0.08).startswith("looks unlike a chest X-ray: it is in colour")
    assert set(typing.get_args(ReasonCode)) == set(i18n.REASONS)
    for code, texts in i18n.REASONS.items():
        assert set(texts) == set(i18n.LANGS), code
        assert HANGUL.search(i18n.reason_text(code, "ko", 1.0, 0.5, "x")), code
    for table in (i18n.CLASS_NAMES, i18n.DECISION_NAMES, i18n.TABLE_HEADERS):
        assert set(table) == set(i18n.LANGS) and table["en"].keys() == table["ko"].keys()
        assert all(HANGUL.search(v) for v in table["ko"].values())
    with pytest.raises(ValueError, match="language"):
        i18n.class_name("covid", "fr")


def test_uncertain_rejected_and_unreadable_answers():
    unsure = answer([0.44, 0.50, 0.05, 0.01], [Finding("low_confidence", 0.5, 0.98)])
    assert (unsure.label, unsure.decision, unsure.confidence) == ("lung_opacity", "uncertain", 0.5)
    assert unsure.reasons[0].text == "confidence 0.50 is below the 0.98 cut-off" and "radiologist" in unsure.advice
    assert unsure.top(2) == [("lung_opacity", 0.5), ("covid", pytest.approx(0.44))]
    rejected = answer([0.68, 0.1, 0.2, 0.02], [Finding("colour", 0.3, 0.08)])
    assert rejected.label is None and rejected.confidence is None and rejected.decision == "rejected"
    assert rejected.p_covid == pytest.approx(0.68)  # kept under its own key for those who want it
    assert "looks unlike a chest X-ray" in rejected.reasons[0].text and "chest X-ray" in rejected.advice
    bad = Prediction.unreadable("y.png", "y.png: file is empty (0 bytes)", MODEL)
    assert bad.label is None and bad.probabilities == {} and bad.decision == "error"
    assert bad.reasons[0].text == "the file could not be read: y.png: file is empty (0 bytes)"
    ok = answer([0.01, 0.01, 0.97, 0.01], [])
    assert ok.decision == "accept" and ok.label == "normal" and ok.reasons == []


def test_in_lang_rerenders_every_human_string():
    unsure = answer([0.44, 0.50, 0.05, 0.01], [Finding("low_confidence", 0.5, 0.98)])
    ko = unsure.in_lang("ko")
    assert ko.lang == "ko" and NOTICE["ko"] in ko.advice and HANGUL.search(ko.reasons[0].text)
    assert ko.reasons[0].value == 0.5 and ko.in_lang("en") == unsure
    bad = Prediction.unreadable("y.png", "y.png: no such file", MODEL).in_lang("ko")
    assert "y.png: no such file" in bad.reasons[0].text and HANGUL.search(bad.reasons[0].text)


def test_schema_and_json_round_trip_with_images():
    schema = Prediction.model_json_schema(mode="serialization")
    assert set(schema["required"]) == set(Prediction.model_fields)  # every field is always in the JSON
    assert {"type": "null"} in schema["properties"]["label"]["anyOf"]
    heat = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    p = answer([0.9, 0.05, 0.03, 0.02], [Finding("low_confidence", 0.9, 0.98)], heatmap=heat)
    data = json.loads(p.model_dump_json())
    assert isinstance(data["heatmap"], str) and data["image"] is None  # base64 PNG in JSON
    back = Prediction.model_validate_json(p.model_dump_json())
    assert np.array_equal(back.heatmap, heat) and back.reasons == p.reasons and back.model == MODEL
    with pytest.raises(ValueError, match="uint8"):
        answer([0.9, 0.05, 0.03, 0.02], [], heatmap=np.zeros((4, 4), np.float32))


def test_csv_columns_cover_the_contract():
    assert CSV_COLUMNS[: len(DESIGN_COLUMNS)] == DESIGN_COLUMNS  # the DESIGN.md columns first, in order
    assert {"advice", "ood_score", "reasons"} <= set(CSV_COLUMNS[len(DESIGN_COLUMNS) :])
    flattened = {c for c in CSV_COLUMNS if c.startswith("model_")}
    assert {f"model_{k}" for k in ModelInfo.model_fields} == flattened
    # every field is a CSV column, the flattened model, or left out with a reason
    assert set(Prediction.model_fields) == (set(CSV_COLUMNS) - flattened) | {"model"} | set(NOT_IN_CSV)
    rejected = answer([0.68, 0.1, 0.2, 0.02], [Finding("colour", 0.3, 0.08), Finding("unfamiliar_layout", 0.9, 0.5)])
    buf = io.StringIO()
    write_csv([rejected], buf)
    row = next(csv.DictReader(io.StringIO(buf.getvalue())))
    assert list(row) == CSV_COLUMNS and row["label"] == "" and row["confidence"] == ""
    assert row["reasons"] == "; ".join(r.text for r in rejected.reasons) and row["model_sha256"] == "0" * 64
    assert row["p_covid"] == str(rejected.p_covid) and row["ood_score"] == "12.0"  # numbers as str() writes them


def test_table_cells_in_korean_and_english():
    unsure = answer([0.44, 0.50, 0.05, 0.01], [Finding("low_confidence", 0.5, 0.98)])
    en = table_cells(unsure, "en")
    assert en[1:4] == ["Lung Opacity or COVID-19", "50.0% / 44.0%", "Uncertain: needs a radiologist"]
    assert en[4] == "confidence 0.50 is below the 0.98 cut-off" and NOTICE["en"] not in en[5]
    ko = table_cells(unsure, "ko")
    assert ko[1] == "폐 음영 또는 코로나19" and ko[3] == "불확실: 전문의 판독 필요" and HANGUL.search(ko[4])
    assert table_headers("ko") == ["영상", "결과", "신뢰도", "판정", "사유", "다음 단계"]
    rejected = table_cells(answer([0.68, 0.1, 0.2, 0.02], [Finding("colour", 0.3, 0.08)]), "en")
    assert rejected[1:4] == ["", "", "Not a chest X-ray"]


# --- one prediction, every rendering (the tiny test bundle) ---


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from tests.conftest import class_image

    d = tmp_path_factory.mktemp("contract")
    rng = np.random.default_rng(5)
    for cid in CLASS_IDS:
        Image.fromarray(class_image(cid, 90, 100, rng)).save(d / f"{cid}.png")
    grey = class_image("covid", 96, 96, rng)
    Image.fromarray(np.stack([grey, grey // 3, 255 - grey], axis=2).astype(np.uint8)).save(d / "colour.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return sorted(d.iterdir())


def cli(bundle: Path, paths: list[Path], *args: str) -> str:
    res = CliRunner().invoke(app, ["predict", *map(str, paths), "--model", str(bundle), "--batch-size", "1", *args])
    assert res.exit_code == 3, res.output  # broken.png
    return res.stdout


def web_client(bundle: Path):
    """FastAPI's TestClient on the service for ``bundle`` (a trusted Host), or a skip without the [serve] extra."""
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (the [dev] extra)")
    from fastapi.testclient import TestClient

    from cxr_triage.serve.app import create_app

    return TestClient(create_app(bundle), base_url="http://127.0.0.1")


def test_python_and_cli_give_the_same_prediction(tiny_bundle: Path, inputs: list[Path]):
    preds = list(Triage(tiny_bundle).predict_many(inputs, batch_size=1))
    expected = [p.model_dump(mode="json") for p in preds]
    assert {p.decision for p in preds} >= {"rejected", "error"}  # colour.png, broken.png
    assert json.loads(cli(tiny_bundle, inputs, "--format", "json")) == expected
    rows = list(csv.DictReader(io.StringIO(cli(tiny_bundle, inputs, "--format", "csv"))))
    assert rows == [{k: "" if v is None else str(csv_cell(v)) for k, v in p.csv_row().items()} for p in preds]
    table = cli(tiny_bundle, inputs)
    for p in preds:
        for cell in table_cells(p, "en"):
            assert all(word in table for word in cell.split()), cell  # Rich folds long cells across lines


def test_http_gives_the_same_prediction_as_python(tiny_bundle: Path, inputs: list[Path]):
    expected = [p.model_dump(mode="json") for p in Triage(tiny_bundle).predict_many(inputs, batch_size=1)]
    with web_client(tiny_bundle) as client:
        for path, want in zip(inputs, expected, strict=True):
            r = client.post("/api/v1/predict", files={"file": (path.name, path.read_bytes(), "image/png")})
            if want["decision"] == "error":
                assert r.status_code == 422 and "could not be read" in r.json()["error"]
            else:
                assert r.status_code == 200 and r.json() == {**want, "path": path.name}


def test_korean_renders_every_human_string(tiny_bundle: Path, inputs: list[Path]):
    table = cli(tiny_bundle, inputs, "--lang", "ko")
    for text in [*i18n.TABLE_HEADERS["ko"].values(), "흉부 X선 아님", "읽을 수 없음", NOTICE["ko"]]:
        assert all(word in table for word in text.split()), text
    for english in ("next step", "decision", "Confident", "Not a chest X-ray", "Unreadable", "looks unlike"):
        assert english not in table, english
    data = json.loads(cli(tiny_bundle, inputs, "--format", "json", "--lang", "ko"))
    assert all(d["lang"] == "ko" and HANGUL.search(d["advice"]) for d in data)
    assert all(HANGUL.search(r["text"]) for d in data for r in d["reasons"])


def test_rejected_upload_has_no_label(tiny_bundle: Path, inputs: list[Path], class_image: Callable):
    colour = next(p for p in inputs if p.name == "colour.png")
    with web_client(tiny_bundle) as client:
        r = client.post("/api/v1/predict", params={"heatmap": "true"}, files={"file": ("c.png", colour.read_bytes())})
    body = r.json()
    assert r.status_code == 200 and body["decision"] == "rejected"
    assert body["label"] is None and body["confidence"] is None and body["heatmap"] is None
    assert abs(sum(body[f"p_{c}"] for c in CLASS_IDS) - 1) < 1e-4
    assert "colour" in [x["code"] for x in body["reasons"]]
