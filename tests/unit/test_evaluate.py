"""evaluate: metrics against independent computations, per-origin tables, calibration, abstention, the OOD
check, the self-contained report, labels.csv folders, recording into a bundle, and errors.

On the tiny bundle (tests/tiny_bundle.py: no torch, no training), so an install without the [train] extra runs them.
Its answers only roughly follow the classes, so every check compares evaluate's numbers with that bundle's own
predictions (predictions.csv, the Predictor, its model.json), never with what a trained model would get right.
Evaluating a checkpoint (exported with torch first) is in tests/integration/test_evaluate.py."""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

from cxr_triage.core.classes import CLASS_IDS, DISPLAY_NAMES
from cxr_triage.data.manifest import DatasetError, ingest, write_outputs
from cxr_triage.evaluation.calibrate import ece
from cxr_triage.evaluation.evaluate import evaluate, load_data, ood_check, record_metrics
from cxr_triage.evaluation.metrics import bootstrap_ci
from cxr_triage.runtime.bundle import write_meta
from cxr_triage.runtime.engine import DECISIONS, BundleError, softmax
from cxr_triage.runtime.predictor import Predictor
from tests.conftest import class_image, make_dataset

P_COLS = [f"p_{c}" for c in CLASS_IDS]
SECTIONS = (
    "headline",
    "confusion",
    "roc",
    "per-class",
    "origins",
    "copy-px",
    "calibration",
    "abstention",
    "ood",
    "gallery",
    "lungs",
)
# what export fits on validation images (the tiny bundle's own: temperature 1, no bias, threshold 0, a wide gate)
CALIBRATION = {"temperature": 1.5, "logit_bias": [0.3, -0.2, 0.0, 0.1]}
ABSTAIN = {"threshold": 0.6, "target_accuracy": 0.9, "val_coverage": 0.5}
OOD_THRESHOLD = 2.6  # the evaluated folder's feature scores run from about 0.9 to 3.8


@pytest.fixture(scope="module")
def fitted_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny bundle, sealed again, with a temperature and class bias that change the probabilities, a
    confidence threshold that leaves some images uncertain and a feature gate that rejects some synthetic images:
    raw and calibrated probabilities then differ, and accept, uncertain, rejected and error all occur."""
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("fitted") / "bundle"))
    meta = json.loads((bundle / "model.json").read_text())
    meta |= {"calibration": CALIBRATION, "abstain": ABSTAIN}
    meta["ood"]["threshold"] = OOD_THRESHOLD
    write_meta(bundle, meta)
    return bundle


@pytest.fixture(scope="module")
def evaluated(fitted_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    """One evaluation of the fitted tiny bundle on a small Kaggle-layout folder: (metrics, out_dir, dataset)."""
    ds = make_dataset(tmp_path_factory.mktemp("evalds") / "dataset", n_per_class=4, seed=1)
    out = tmp_path_factory.mktemp("evalout")
    metrics = evaluate(fitted_bundle, ds.root, out_dir=out, bootstrap=200, seed=0, gallery=5, ood=True)
    return metrics, out, ds


def _labelled(out: Path) -> pd.DataFrame:
    """The labelled readable rows of predictions.csv, numbers as floats."""
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False, dtype={"copy_px": str})
    lab = preds[(preds["true"] != "") & (preds["decision"] != "error")].copy()
    numeric = ["confidence", "ood_score", *P_COLS, *[f"logit_{c}" for c in CLASS_IDS]]
    lab[numeric] = lab[numeric].astype(float)
    return lab


def test_metrics_match_independent_computation(evaluated):
    metrics, out, ds = evaluated
    lab = _labelled(out)
    y, pred = lab["true"].map(CLASS_IDS.index), lab["pred"].map(CLASS_IDS.index)
    assert 0 < metrics["accuracy"] < 1  # right and wrong answers both occur, so no count below is trivially right
    assert metrics["n"] == len(lab) == ds.n_images
    assert metrics["errors"] == len(ds.unreadable) and metrics["images"] == ds.n_images + len(ds.unreadable)
    assert metrics["accuracy"] == pytest.approx((lab["true"] == lab["pred"]).mean())
    assert metrics["macro_f1"] == pytest.approx(f1_score(y, pred, labels=sorted(set(y)), average="macro"))
    assert metrics["confusion"] == confusion_matrix(y, pred, labels=range(4)).tolist()
    assert np.sum(metrics["confusion"]) == metrics["n"]
    for i, c in enumerate(CLASS_IDS):
        assert metrics["per_class"][c]["support"] == ds.counts[c]
        assert metrics["auc"][c] == pytest.approx(roc_auc_score(y == i, lab[P_COLS[i]]), abs=1e-3)
    assert metrics["auc"]["macro"] == pytest.approx(np.mean([metrics["auc"][c] for c in CLASS_IDS]))
    assert metrics["covid_recall"] == pytest.approx(((y == 0) & (pred == 0)).sum() / (y == 0).sum())
    assert metrics["normal_specificity_vs_covid"] == pytest.approx((pred[y == 2] != 0).mean())


def test_predictions_are_the_predictors(evaluated, fitted_bundle: Path):
    """The rows are what predict_paths gives for the same files (labels, decisions, probabilities)."""
    _, out, ds = evaluated
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    rows = list(s.prediction for s in Predictor(fitted_bundle).predict_files([str(ds.root / p) for p in preds["path"]]))
    # pred is the arg-max class, rejected images included (their predictions carry no label)
    assert list(preds["pred"]) == [r.top(1)[0][0] if r.probabilities else "" for r in rows]
    assert all(r.label in (p, None) for p, r in zip(preds["pred"], rows, strict=True))
    assert list(preds["decision"]) == [r.decision for r in rows]
    ok = preds["decision"] != "error"
    expected = np.array([[getattr(r, c) for c in P_COLS] for r, k in zip(rows, ok, strict=True) if k], float)
    np.testing.assert_allclose(preds.loc[ok, P_COLS].to_numpy(float), expected, atol=2e-6)


def test_confidence_intervals(evaluated):
    metrics, out, _ = evaluated
    for key in ("accuracy", "macro_f1"):
        lo, hi = metrics["ci"][key]
        assert 0 <= lo <= metrics[key] <= hi <= 1
    assert metrics["ci"]["resamples"] == 200 and metrics["ci"]["level"] == 0.95
    lab = _labelled(out)
    y, pred = lab["true"].map(CLASS_IDS.index).to_numpy(), lab["pred"].map(CLASS_IDS.index).to_numpy()
    again = bootstrap_ci(y, pred, 200, 0)
    assert again["accuracy"] == metrics["ci"]["accuracy"] and again["macro_f1"] == metrics["ci"]["macro_f1"]


def test_per_origin_and_copy_px(evaluated):
    metrics, out, ds = evaluated
    origins = metrics["by_origin"]
    assert sum(g["images"] for g in origins.values()) == metrics["images"]
    assert sum(g["n"] for g in origins.values()) == metrics["n"]
    for origin in set(ds.origins.values()):
        assert origins[origin]["images"] == sum(v == origin for v in ds.origins.values())
    assert origins["unknown"]["images"] == metrics["images"] - len(ds.origins)
    lab = _labelled(out)
    paed = lab[lab["origin"] == "kermany-paediatric"]
    assert origins["kermany-paediatric"]["accuracy"] == pytest.approx((paed["true"] == paed["pred"]).mean())
    assert sum(g["images"] for g in metrics["by_copy_px"].values()) == len(ds.copy_px)


def test_calibration_abstention_and_decisions(evaluated, fitted_bundle: Path):
    metrics, out, _ = evaluated
    meta = json.loads((fitted_bundle / "model.json").read_text())
    assert all(metrics["decisions"][d] > 0 for d in DECISIONS)  # every decision occurs here
    lab = _labelled(out)
    y = lab["true"].map(CLASS_IDS.index).to_numpy()
    logits = lab[[f"logit_{c}" for c in CLASS_IDS]].to_numpy(float)
    bias, temperature = np.array(meta["calibration"]["logit_bias"]), meta["calibration"]["temperature"]
    np.testing.assert_allclose(lab[P_COLS].to_numpy(float), softmax((logits + bias) / temperature), atol=2e-5)
    cal = metrics["calibration"]
    assert cal["ece_raw"] == pytest.approx(ece(softmax(logits), y), abs=1e-4)
    assert cal["ece_calibrated"] == pytest.approx(ece(lab[P_COLS].to_numpy(float), y), abs=1e-4)
    assert cal["ece_raw"] != pytest.approx(cal["ece_calibrated"], abs=1e-3)  # so the two cannot be swapped
    assert cal["temperature"] == temperature and cal["logit_bias"] == meta["calibration"]["logit_bias"]
    assert (
        sum(b["n"] for b in cal["reliability_raw"])
        == metrics["n"]
        == sum(b["n"] for b in cal["reliability_calibrated"])
    )
    ab = metrics["abstention"]
    assert ab["threshold"] == meta["abstain"]["threshold"]
    assert ab["target_accuracy"] == meta["abstain"]["target_accuracy"]
    accepted = lab[lab["decision"] == "accept"]
    assert ab["coverage"] == pytest.approx(len(accepted) / len(lab))
    assert ab["accuracy_accepted"] == pytest.approx((accepted["true"] == accepted["pred"]).mean())
    assert ab["coverage_confidence"] == pytest.approx((lab["confidence"] >= ab["threshold"] - 1e-6).mean())
    assert ab["curve"]["coverage"][-1] == 1.0
    assert ab["curve"]["threshold"][0] == pytest.approx(lab["confidence"].max(), abs=1e-6)  # most confident first
    assert ab["curve"]["risk"][-1] == pytest.approx(1 - metrics["accuracy"])
    assert sum(metrics["decisions"].values()) == metrics["images"]
    assert metrics["decisions"]["error"] == metrics["errors"]
    readable = metrics["images"] - metrics["errors"]
    assert metrics["gate_acceptance"] == pytest.approx(1 - metrics["decisions"]["rejected"] / readable)


def test_metrics_json_is_plain_and_complete(evaluated):
    metrics, out, _ = evaluated
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == json.loads(json.dumps(metrics))
    assert {"ood", "calibration", "abstention", "by_origin", "timing"} <= set(metrics)


def test_report_is_self_contained(evaluated):
    metrics, out, _ = evaluated
    html = (out / "report.html").read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in html
    assert "research and education only; not a medical device" in html.lower()
    assert not re.search(r'(src|href)="(https?:|/|file:)', html)
    # two galleries of heatmaps: the 5 most confident wrong answers, then the 5 lowest lung attentions (the tiny
    # bundle has a lung segmenter); a rejected image has no heatmap, so it is left out
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    readable = preds[preds["decision"] != "error"].astype({"confidence": float, "lung_attention": float})
    wrong = readable[(readable["true"] != "") & (readable["true"] != readable["pred"])]
    wrong = wrong.sort_values("confidence", ascending=False, kind="stable").head(5)
    low = readable.sort_values("lung_attention", kind="stable").head(5)
    assert (wrong["decision"] == "rejected").any()  # so leaving it out is tested
    errors, lows = ([Path(r.path).name for r in g.itertuples() if r.decision != "rejected"] for g in (wrong, low))
    captions = re.findall(r"<figcaption><strong>([^<]*)</strong><br>([^<]*)</figcaption>", html)
    assert [name for name, _ in captions] == errors + lows
    top = wrong[wrong["decision"] != "rejected"].iloc[0]
    assert captions[0][1].startswith(f"true {DISPLAY_NAMES[top.true]} · predicted {DISPLAY_NAMES[top.pred]}")
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(pngs) == 4 + len(errors) + len(lows)  # confusion, ROC, reliability, risk-coverage + galleries
    assert Image.open(io.BytesIO(base64.b64decode(pngs[0]))).size[0] > 300
    assert html.count('class="gallery"') == 2
    assert f"{metrics['ood']['rejected']} of {metrics['ood']['n']}" in html


def test_ood_check_reports_every_image(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch):
    engine = Predictor(tiny_bundle)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "skimage", None)  # without scikit-image: the generated images only
        bare = ood_check(engine)
    assert bare["n"] == 6 and bare["skipped"] == ["scikit-image (not installed)"]
    generated = ["black", "white", "grey", "uniform noise", "gaussian noise", "colour noise"]
    assert [r["name"] for r in bare["images"]] == generated
    pytest.importorskip("skimage", reason="the photographs come from scikit-image (the [dev] extra)")
    res = ood_check(engine)
    names = [r["name"] for r in res["images"]]
    assert {"camera", "astronaut", "black", "white", "grey", "uniform noise", "gaussian noise"} <= set(names)
    assert res["n"] == len(names) and res["rejected"] == sum(r["rejected"] for r in res["images"])
    assert res["rejected_fraction"] == pytest.approx(res["rejected"] / res["n"])
    assert res["passed"] == (res["rejected_fraction"] >= 0.95)
    thr = engine.meta.ood.threshold
    clear = [r for r in res["images"] if abs(r["ood_score"] - thr) > 1e-3]
    # the feature gate rejects everything above its threshold (the pixel and colour gates may reject more)
    above = [r for r in clear if r["ood_score"] > thr]
    assert above and all(r["rejected"] for r in above)
    assert any(r["rejected"] for r in res["images"] if r["name"] == "astronaut")  # a colour photo


def test_ood_check_counts_only_rejections(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch):
    """An uncertain (or accepted) answer on a non-chest image is not a rejection: only "rejected" counts toward the
    OOD target. The decisions are set here, three kinds in turn, on the six generated images."""
    engine = Predictor(tiny_bundle)
    real, turn = engine.score, itertools.cycle(["rejected", "uncertain", "accept"])

    def score(items):
        scored = real(items)
        return [SimpleNamespace(prediction=s.prediction.model_copy(update={"decision": next(turn)})) for s in scored]

    monkeypatch.setattr(engine, "score", score)
    monkeypatch.setitem(sys.modules, "skimage", None)  # the generated images only
    res = ood_check(engine)
    assert [r["decision"] for r in res["images"]] == ["rejected", "uncertain", "accept"] * 2
    assert [r["rejected"] for r in res["images"]] == [True, False, False] * 2
    assert res["rejected"] == 2 and res["rejected_fraction"] == pytest.approx(2 / 6) and not res["passed"]


def _labels_folder(root: Path) -> Path:
    """A labels.csv folder like the external set: two sources, 'No finding', 'Pneumonia', a blank label
    and a missing file."""
    rng = np.random.default_rng(3)
    rows = []
    spec = [
        ("covid", "COVID-19", "a"),
        ("covid", "COVID-19", "b"),
        ("covid", "covid", "b"),
        ("normal", "No finding", "a"),
        ("normal", "No finding", "b"),
        ("viral_pneumonia", "Pneumonia", "a"),
        ("normal", "", "b"),
    ]
    for i, (cls, label, source) in enumerate(spec):
        rel = f"{source}/img{i}.png"
        (root / source).mkdir(parents=True, exist_ok=True)
        Image.fromarray(class_image(cls, 80, 72, rng)).save(root / rel)
        rows.append({"file": rel, "label": label, "subtype": "", "source": source, "view": "PA"})
    rows.append({"file": "a/missing.png", "label": "COVID-19", "subtype": "", "source": "a", "view": "PA"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def test_labels_csv_folder_with_unlabelled_rows(tiny_bundle: Path, tmp_path: Path):
    folder = _labels_folder(tmp_path / "external")
    frame, kind = load_data(folder)
    assert kind == "labels" and list(frame["true"]) == ["covid"] * 3 + ["normal"] * 2 + ["", "", "covid"]
    m = evaluate(tiny_bundle, folder, out_dir=tmp_path / "out", bootstrap=50, gallery=2)
    assert (m["kind"], m["images"], m["unlabelled"], m["errors"], m["n"]) == ("labels", 8, 2, 1, 5)
    assert "ood" not in m and m["macro_over"] == ["covid", "normal"]
    preds = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    unl = preds[preds["true"] == ""]
    assert (unl["decision"] != "error").all() and (unl["pred"] != "").all()  # predicted, not scored
    lab = preds[(preds["true"] != "") & (preds["decision"] != "error")]
    # macro over the two classes present: lung opacity and viral pneumonia, absent, add no zero F1s
    y, pred = lab["true"].map(CLASS_IDS.index), lab["pred"].map(CLASS_IDS.index)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, labels=sorted(set(y)), average="macro"))
    assert m["covid_recall"] == pytest.approx((lab.loc[lab["true"] == "covid", "pred"] == "covid").mean())
    assert m["normal_specificity_vs_covid"] == pytest.approx(
        (lab.loc[lab["true"] == "normal", "pred"] != "covid").mean()
    )
    assert {o: g["images"] for o, g in m["by_origin"].items()} == {"a": 4, "b": 4}
    assert m["gate_acceptance"] == pytest.approx(
        (preds.loc[preds["decision"] != "error", "decision"] != "rejected").mean()
    )
    assert m["confusion"][1] == [0, 0, 0, 0] and np.sum(m["confusion"]) == 5


def test_no_labelled_image_still_reports(tiny_bundle: Path, tmp_path: Path):
    (tmp_path / "x").mkdir()
    Image.fromarray(class_image("normal", 80, 80, np.random.default_rng(0))).save(tmp_path / "x" / "a.png")
    (tmp_path / "x" / "labels.csv").write_text("file,label\na.png,Pneumonia\nb.png,\n")
    m = evaluate(tiny_bundle, tmp_path / "x", out_dir=tmp_path / "out", bootstrap=10)
    assert (m["n"], m["images"], m["unlabelled"], m["errors"]) == (0, 2, 2, 1) and "accuracy" not in m
    assert "No wrong predictions" in (tmp_path / "out" / "report.html").read_text()


def test_manifest_split_selection(tiny_bundle: Path, tmp_path: Path):
    ds = make_dataset(tmp_path / "ds", n_per_class=6, seed=2)
    res = ingest(ds.root, val=0.2, test=0.3, seed=0, workers=1)
    write_outputs(res, ds.root, tmp_path / "data", {})
    manifest = tmp_path / "data" / "manifest.csv"
    m = evaluate(tiny_bundle, manifest, split="test", out_dir=tmp_path / "out", bootstrap=20, gallery=0, ood=False)
    assert m["kind"] == "manifest" and m["split"] == "test"
    assert m["images"] == (res.manifest["split"] == "test").sum() and "ood" not in m
    origins = res.manifest.loc[res.manifest["split"] == "test", "origin"].value_counts()
    assert {o: g["images"] for o, g in m["by_origin"].items()} == origins.to_dict()
    assert len(load_data(manifest, "all")[0]) == len(res.manifest)
    with pytest.raises(DatasetError, match="no rows in split 'holdout'"):
        load_data(manifest, "holdout")


def test_record_updates_a_copy_of_the_bundle(tiny_bundle: Path, tmp_path: Path):
    original = hashlib.sha256((tiny_bundle / "model.json").read_bytes()).hexdigest()
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    weights = {f: (bundle / f).read_bytes() for f in ("model.onnx", "extras.npz", "lungs/model.onnx")}
    ds = make_dataset(tmp_path / "ds", n_per_class=3, seed=4)
    m = evaluate(bundle, ds.root, out_dir=tmp_path / "out", bootstrap=20, gallery=0, record=True)
    meta = json.loads((bundle / "model.json").read_text())
    rec = meta["test_metrics"]
    assert rec["accuracy"] == m["accuracy"] and rec["n"] == m["n"] and rec["split"] == "all"
    assert rec["ci95"]["macro_f1"] == m["ci"]["macro_f1"] and set(rec["f1"]) == set(CLASS_IDS)
    assert rec["origin_accuracy"]["unknown"]["n"] == m["by_origin"]["unknown"]["n"]
    assert Predictor(bundle).bundle.raw["test_metrics"] == rec  # hashes still check out
    assert {f: (bundle / f).read_bytes() for f in weights} == weights
    assert not list(bundle.glob(".*tmp*"))
    assert hashlib.sha256((tiny_bundle / "model.json").read_bytes()).hexdigest() == original
    (bundle / "extras.npz").write_bytes(b"altered")
    with pytest.raises(BundleError, match="sha256"):
        record_metrics(bundle, m)


def test_clear_errors_for_bad_paths(tiny_bundle: Path, tmp_path: Path):
    ds = make_dataset(tmp_path / "ds", n_per_class=3)
    with pytest.raises(BundleError, match="does not exist"):
        evaluate(tmp_path / "nope", ds.root, out_dir=tmp_path / "out")
    with pytest.raises(DatasetError, match="does not exist"):
        evaluate(tiny_bundle, tmp_path / "nodata", out_dir=tmp_path / "out")
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(BundleError, match="neither a bundle folder nor a checkpoint"):
        evaluate(tmp_path / "model.txt", ds.root, out_dir=tmp_path / "out")
    with pytest.raises(BundleError, match="no model.json"):
        evaluate(tmp_path / "ds", ds.root, out_dir=tmp_path / "out")
    (tmp_path / "fake.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="record=True"):
        evaluate(tmp_path / "fake.pt", ds.root, out_dir=tmp_path / "out", record=True)
    with pytest.raises(BundleError, match="is a checkpoint: export it"):  # evaluation never imports training itself
        evaluate(tmp_path / "fake.pt", ds.root, out_dir=tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folder"):
        load_data(tmp_path / "empty")
    assert not (tmp_path / "out").exists()


def test_bundle_path_does_not_import_torch(tiny_bundle: Path, tmp_path: Path):
    ds = make_dataset(tmp_path / "ds", n_per_class=3)
    code = (
        "import sys; from cxr_triage.evaluation.evaluate import evaluate; "
        f"evaluate({str(tiny_bundle)!r}, {str(ds.root)!r}, out_dir={str(tmp_path / 'out')!r}, "
        "bootstrap=10, gallery=1, ood=True); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert (tmp_path / "out" / "report.html").exists()


def test_predictions_csv_quotes_cells_that_look_like_formulas(tiny_bundle: Path, tmp_path: Path):
    """A source or file name from someone else's labels.csv must not run as a spreadsheet formula (OWASP)."""
    (tmp_path / "x").mkdir()
    Image.fromarray(class_image("normal", 80, 80, np.random.default_rng(1))).save(tmp_path / "x" / "a.png")
    (tmp_path / "x" / "labels.csv").write_text('file,label,source\na.png,No finding,"=HYPERLINK(""http://x"")"\n')
    evaluate(tiny_bundle, tmp_path / "x", out_dir=tmp_path / "out", bootstrap=10)
    preds = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    assert preds.loc[0, "origin"] == '\'=HYPERLINK("http://x")'
    assert preds.loc[0, "true"] == "normal"  # other cells unchanged
