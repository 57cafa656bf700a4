"""predict / engine / advice / calibration: rows, errors, heatmaps, CLI exit codes, torch-free path."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxr_triage.cli import app
from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.core.preprocess import PreprocessSpec, load_grey
from cxr_triage.evaluation.calibrate import abstain_threshold, ece, fit_logit_bias, fit_temperature
from cxr_triage.runtime.advice import advice
from cxr_triage.runtime.bundle import Abstain, BundleMeta, Gates
from cxr_triage.runtime.engine import softmax
from cxr_triage.runtime.formats import write_rows
from cxr_triage.runtime.predict import collect_inputs, heat_field, overlay
from cxr_triage.runtime.prediction import CSV_COLUMNS
from cxr_triage.runtime.predictor import Predictor
from cxr_triage.runtime.reasons import judge


@pytest.fixture
def image_folder(tmp_path: Path, class_image) -> Path:
    rng = np.random.default_rng(3)
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for i, cid in enumerate(CLASS_IDS):
        Image.fromarray(class_image(cid, 80, 100 + 10 * i, rng)).save(d / f"{cid}.png")
    Image.fromarray(class_image("normal", 90, 70, rng)).save(d / "sub" / "nested.jpg")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (d / "notes.txt").write_text("not an image")
    return d


def test_collect_inputs_recurses_globs_and_keeps_missing(image_folder: Path):
    files = collect_inputs([str(image_folder), str(image_folder / "*.png"), "missing.png"])
    names = [Path(f).name for f in files]
    assert "nested.jpg" in names and "notes.txt" not in names and names[-1] == "missing.png"
    assert len(files) == len(set(files))


def test_rows_errors_and_heatmaps(tiny_bundle: Path, image_folder: Path, tmp_path: Path):
    engine = Predictor(tiny_bundle)
    paths = collect_inputs([str(image_folder)]) + [str(tmp_path / "missing.png")]
    rows = list(s.prediction for s in engine.predict_files(paths, heatmap_dir=tmp_path / "heat", batch_size=2))
    assert [r.path for r in rows] == paths
    bad = {Path(r.path).name: r for r in rows if r.decision == "error"}
    assert set(bad) == {"broken.png", "missing.png"}
    assert "no such file" in bad["missing.png"].error and "corrupt" in bad["broken.png"].error
    for r in bad.values():
        assert r.label is None and r.confidence is None and r.probabilities == {}
        assert [x.code for x in r.reasons] == ["unreadable"] and r.error in r.reasons[0].text
    for r in rows:
        if r.decision == "error":
            continue
        p = np.array([r.probabilities[c] for c in CLASS_IDS])
        assert abs(p.sum() - 1) < 1e-4 and r.top(1)[0][0] == CLASS_IDS[int(p.argmax())]
        assert r.decision in ("accept", "uncertain", "rejected")
        assert r.label == (None if r.decision == "rejected" else CLASS_IDS[int(p.argmax())])
        if r.decision != "rejected":
            w, h = Image.open(r.heatmap_path).size
            src = Image.open(r.path).size
            assert (w, h) == src  # overlay keeps the original size (< 512 px here)
            assert r.heatmap is None  # written to a file, not kept
    buf = io.StringIO()
    write_rows(rows, "csv", buf)
    parsed = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert list(parsed[0]) == CSV_COLUMNS and len(parsed) == len(rows)


def test_predictions_are_deterministic(tiny_bundle: Path, image_folder: Path):
    engine = Predictor(tiny_bundle)
    paths = collect_inputs([str(image_folder)])
    a = list(s.prediction for s in engine.predict_files(paths))
    b = list(s.prediction for s in Predictor(tiny_bundle).predict_files(paths, batch_size=1))
    for x, y in zip(a, b, strict=True):
        assert x.label == y.label and x.decision == y.decision
        if x.decision != "error":
            assert abs(x.p_covid - y.p_covid) < 1e-5


def test_cli_predict_formats_and_exit_codes(tiny_bundle: Path, image_folder: Path):
    runner = CliRunner()
    good = str(image_folder / "covid.png")
    res = runner.invoke(app, ["predict", good, "--model", str(tiny_bundle), "--format", "csv"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert rows[0]["path"] == good and rows[0]["decision"] in ("accept", "uncertain", "rejected")
    res = runner.invoke(app, ["predict", str(image_folder), "--model", str(tiny_bundle), "--format", "json"])
    assert res.exit_code == 3  # broken.png
    data = json.loads(res.stdout)
    assert any(r["decision"] == "error" for r in data) and all("advice" in r for r in data if r["label"])
    res = runner.invoke(app, ["predict", good, "--model", str(tiny_bundle), "--format", "xml"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["predict", good, "--model", str(image_folder)])
    assert res.exit_code == 2 and "model.json" in res.output
    res = runner.invoke(app, ["predict", good, "--model", str(tiny_bundle), "--lang", "ko"])
    assert res.exit_code == 0 and any("\uac00" <= ch <= "\ud7a3" for ch in res.stdout)


def test_predict_path_does_not_import_torch(tiny_bundle: Path, image_folder: Path):
    code = (
        "import sys; from cxr_triage.cli import app; from cxr_triage.runtime.predictor import Predictor;"
        f"scored = Predictor({str(tiny_bundle)!r}).predict_files([{str(image_folder / 'covid.png')!r}]);"
        "rows = [s.prediction for s in scored];"
        "assert rows[0].decision != 'error'; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_advice_languages_and_decisions():
    for cid in CLASS_IDS:
        en, ko = advice(cid, "accept", "en"), advice(cid, "accept", "ko")
        assert "not a diagnosis" in en and any("\uac00" <= ch <= "\ud7a3" for ch in ko)
    assert "COVID-19 test" in advice("covid")
    assert "pulmonology" in advice("lung_opacity")
    assert "radiologist" in advice("covid", "uncertain")
    assert "chest X-ray" in advice("normal", "rejected")
    with pytest.raises(ValueError, match="language"):
        advice("covid", lang="fr")
    with pytest.raises(ValueError, match="decision"):
        advice("covid", "maybe")


def test_judge_thresholds():
    meta = BundleMeta.model_construct(abstain=Abstain(threshold=0.8), ood=Gates(threshold=10.0))
    assert judge(meta, 0.9, 1.0)[0] == "accept"
    assert judge(meta, 0.7, 1.0)[0] == "uncertain"
    assert judge(meta, 0.99, 11.0)[0] == "rejected"
    meta = meta.model_copy(update={"ood": Gates(threshold=10.0, pixel_threshold=0.5, colour_threshold=0.08)})
    assert judge(meta, 0.99, 1.0, pixel=0.6)[0] == "rejected"
    assert judge(meta, 0.99, 1.0, pixel=0.4, colour=0.3)[0] == "rejected"
    assert judge(meta, 0.99, 1.0, pixel=0.4, colour=0.01)[0] == "accept"


def test_colour_pictures_are_rejected_grey_copies_are_not(tiny_bundle: Path, class_image, tmp_path: Path):
    rng = np.random.default_rng(0)
    grey = class_image("covid", 96, 96, rng)
    Image.fromarray(np.stack([grey] * 3, axis=2)).save(tmp_path / "grey_rgb.png")
    tinted = np.stack([grey, grey // 3, 255 - grey], axis=2).astype(np.uint8)
    Image.fromarray(tinted).save(tmp_path / "colour.png")
    rows = {
        Path(r.path).name: r
        for r in (s.prediction for s in Predictor(tiny_bundle).predict_files(collect_inputs([str(tmp_path)])))
    }
    assert rows["colour.png"].decision == "rejected" and rows["colour.png"].label is None
    assert "colour" in [r.code for r in rows["colour.png"].reasons]
    info_grey: dict = {}
    info_colour: dict = {}
    load_grey(tmp_path / "grey_rgb.png", info=info_grey)
    load_grey(tmp_path / "colour.png", info=info_colour)
    assert info_grey["colourfulness"] == 0.0 and info_colour["colourfulness"] > 0.08


def test_calibration_fits():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 4000)
    true_logits = rng.normal(0, 1, (4000, 4)) + 2.5 * np.eye(4)[labels]
    # draw labels from softmax(true_logits) so that T=1 is right for true_logits; then scale by 3
    probs = softmax(true_logits)
    labels = np.array([rng.choice(4, p=p) for p in probs])
    t = fit_temperature(true_logits * 3, labels)
    assert 2.5 < t < 3.5
    assert ece(softmax(true_logits), labels) < 0.03 < ece(softmax(true_logits * 3), labels)
    thr, cov = abstain_threshold(probs, labels, 0.9)
    accepted = probs.max(1) >= thr
    assert (probs[accepted].argmax(1) == labels[accepted]).mean() >= 0.9 and 0 < cov < 1
    # a constant bias against class 0 is undone by the fitted logit bias
    shifted = np.log(probs) - np.array([3.0, 0, 0, 0])
    bias = fit_logit_bias(shifted, labels)
    assert bias[0] - bias[1:].mean() > 1.5


@pytest.mark.parametrize("resize", ["stretch", "crop", "pad"])
def test_heatmap_covers_the_whole_image(resize: str):
    """The trimmed border (and a cropped-away side) gets the map's nearest values: no square frame is left."""
    spec = PreprocessSpec(size=64, resize=resize, border=0.06)
    flat = overlay(np.full((200, 300), 100, np.uint8), np.ones((5, 5), np.float32), spec)
    assert flat.shape == (200, 300, 3) and (flat == flat[100, 150]).all()  # one colour, edge to edge
    ramp = np.tile(np.linspace(0, 1, 5, dtype=np.float32), (5, 1))  # 0 on the left, 1 on the right
    heat = heat_field(200, 300, ramp, spec)
    assert heat.shape == (200, 300) and np.allclose(heat[:, -1], 1) and np.allclose(heat[:, 0], 0)
    assert np.abs(np.diff(heat, axis=1)).max() < 0.05  # continuous: no step at the trimmed border
    assert np.allclose(heat, heat[:1])  # constant down every column, borders included
