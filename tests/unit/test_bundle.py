"""The sealed, typed bundle (issue 13): SHA256SUMS covers every file, model.json included; one pydantic schema with
ranges; any violation is a BundleError (exit 2, or `serve` refusing to start) with one sentence; non-finite
probabilities are error rows, never 'accept'."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cxr_triage.cli import app
from cxr_triage.runtime import bundle as bundle_mod
from cxr_triage.runtime.bundle import (
    MANIFEST,
    Abstain,
    BundleError,
    BundleMeta,
    default_bundle_dir,
    read_bundle_meta,
    seal,
    sha256_file,
    write_meta,
)
from cxr_triage.runtime.predictor import Predictor
from cxr_triage.runtime.reasons import judge
from tests.hostile_corpus import encode, xray


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A writable copy of the shipped bundle."""
    out = tmp_path / "bundle"
    shutil.copytree(default_bundle_dir(), out)
    return out


def meta_of(b: Path) -> dict:
    return json.loads((b / "model.json").read_text())


def bundle_files(b: Path) -> list[str]:
    """Every file of a bundle but the seal, as SHA256SUMS names them (``lungs/model.onnx`` for the segmenter)."""
    return sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file() and p.name != MANIFEST)


def reseal_by_hand(b: Path) -> None:
    """What a careful attacker or a hand edit would do: rewrite SHA256SUMS without any check."""
    lines = [f"{sha256_file(b / n)}  {n}\n" for n in bundle_files(b)]
    (b / MANIFEST).write_text("".join(lines))


def test_shipped_bundle_is_sealed_over_every_file():
    b = default_bundle_dir()
    listed = {line.split()[1] for line in (b / MANIFEST).read_text().splitlines()}
    assert listed == set(bundle_files(b)) and "lungs/model.onnx" in listed  # the segmenter is sealed too
    assert read_bundle_meta(b)["classes"] == ["covid", "lung_opacity", "normal", "viral_pneumonia"]


def test_edited_model_json_is_refused(bundle: Path):
    meta = meta_of(bundle)
    meta["abstain"]["threshold"] = 0.0  # looks harmless, and valid: still refused, the seal no longer matches
    (bundle / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"model\.json does not match its sha256 in SHA256SUMS"):
        Predictor(bundle)


@pytest.mark.parametrize("victim", ["model.onnx", "extras.npz"])
def test_altered_or_missing_files_are_refused(bundle: Path, victim: str):
    with open(bundle / victim, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match its sha256"):
        Predictor(bundle)
    (bundle / victim).unlink()
    with pytest.raises(BundleError, match=f"lacks {victim}"):
        Predictor(bundle)


def test_unsealed_bundle_names_the_fix_and_seal_repairs_it(bundle: Path):
    (bundle / MANIFEST).unlink()
    with pytest.raises(BundleError, match="is not sealed") as info:
        Predictor(bundle)
    assert "cxr-triage seal" in str(info.value)
    res = CliRunner().invoke(app, ["seal", str(bundle)])
    assert res.exit_code == 0, res.output
    assert Predictor(bundle).meta.onnx_sha256 == meta_of(bundle)["onnx_sha256"]


def test_manifest_must_cover_every_file_and_hold_plain_names(bundle: Path):
    text = (bundle / MANIFEST).read_text()
    (bundle / MANIFEST).write_text("".join(line for line in text.splitlines(True) if "model.json" not in line))
    with pytest.raises(BundleError, match="does not cover model.json"):
        Predictor(bundle)
    (bundle / MANIFEST).write_text(text + f"{'0' * 64}  ../../etc/passwd\n")
    with pytest.raises(BundleError, match=r"line \d+ is not"):
        Predictor(bundle)


BAD_META = {
    "temperature 0": (lambda m: m["calibration"].update(temperature=0), r"calibration\.temperature: .*greater than 0"),
    "NaN threshold": (lambda m: m["abstain"].update(threshold=float("nan")), r"abstain\.threshold"),
    "threshold 1.5": (lambda m: m["abstain"].update(threshold=1.5), r"abstain\.threshold: .*less than or equal to 1"),
    "negative gate": (lambda m: m["ood"].update(threshold=-1), r"ood\.threshold"),
    "bias length": (lambda m: m["calibration"].update(logit_bias=[0.0]), r"calibration\.logit_bias"),
    "classes": (lambda m: m.update(classes=["a", "b", "c", "d"]), r"classes: must be \['covid'"),
    "preprocess key": (lambda m: m["preprocess"].update(sise=160), r"preprocess: unknown preprocessing keys"),
    "preprocess size": (lambda m: m["preprocess"].update(size=8), r"preprocess: preprocess size must be >= 32"),
    "no preprocess": (lambda m: m.pop("preprocess"), r"preprocess: Field required"),
    "format": (lambda m: m.update(format="other/9"), r"format: Input should be 'cxr-triage-bundle/1'"),
    "hash text": (lambda m: m.update(onnx_sha256="abc"), r"onnx_sha256: String should match pattern"),
}


@pytest.mark.parametrize("case", sorted(BAD_META))
def test_schema_violations_are_one_sentence(bundle: Path, case: str):
    edit, message = BAD_META[case]
    meta = meta_of(bundle)
    edit(meta)
    with pytest.raises(BundleError, match=message):
        write_meta(bundle, meta)  # export and `evaluate --record` cannot write it either
    (bundle / "model.json").write_text(json.dumps(meta))
    reseal_by_hand(bundle)
    with pytest.raises(BundleError, match=message) as info:
        Predictor(bundle)
    assert "\n" not in str(info.value) and "export the bundle again" in str(info.value)


def test_top_level_list_and_broken_json(bundle: Path):
    (bundle / "model.json").write_text("[1, 2]")
    reseal_by_hand(bundle)
    with pytest.raises(BundleError, match="the top level: Input should be a valid dictionary"):
        Predictor(bundle)
    (bundle / "model.json").write_text("{not json")
    reseal_by_hand(bundle)
    with pytest.raises(BundleError, match="is not valid JSON"):
        Predictor(bundle)


def _rewrite_extras(b: Path, change) -> None:
    with np.load(b / "extras.npz") as z:
        extras = {k: z[k] for k in z.files}
    change(extras)
    np.savez(b / "extras.npz", **extras)
    meta = meta_of(b)
    meta["extras_sha256"] = sha256_file(b / "extras.npz")
    write_meta(b, meta)  # sealed properly: only the array checks can catch these


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.pop("cam_weight"), "cam_weight must be a 4 x C array"),
        (lambda e: e.update(cam_weight=e["cam_weight"][:, :5]), r"cam_weight has shape \(4, 5\)"),
        (lambda e: e.pop("ood_precision"), "ood_means or ood_precision without the other"),
        (lambda e: e["ood_means"].__setitem__((0, 0), np.nan), "ood_means holds NaN"),
    ],
    ids=["no-cam", "cam-shape", "half-ood", "nan"],
)
def test_extras_are_checked_against_the_graph(bundle: Path, change, message: str):
    _rewrite_extras(bundle, change)
    with pytest.raises(BundleError, match=message):
        Predictor(bundle)


def test_cli_exit_2_with_one_sentence(bundle: Path, tmp_path: Path):
    img = tmp_path / "a.png"
    img.write_bytes(encode(xray(), "PNG"))
    meta = meta_of(bundle)
    meta["calibration"]["temperature"] = 0
    (bundle / "model.json").write_text(json.dumps(meta))
    # without the [serve] extra (a base install; never under CI) `serve` stops at that sentence before the bundle
    has_serve = all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn"))
    serve_checks_bundle = has_serve or bool(os.environ.get("CI"))
    for args in (["predict", str(img), "--model", str(bundle)], ["serve", "--model", str(bundle), "--port", "1"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, res.output
        expected = "SHA256SUMS" if args[0] == "predict" or serve_checks_bundle else "needs the [serve] extra"
        assert "Traceback" not in res.output and expected in res.output, res.output
    reseal_by_hand(bundle)
    res = CliRunner().invoke(app, ["predict", str(img), "--model", str(bundle)], env={"COLUMNS": "300"})
    assert res.exit_code == 2 and "greater than 0" in res.output
    res = CliRunner().invoke(app, ["seal", str(bundle)])  # the seal command refuses to bless it
    assert res.exit_code == 2 and "greater than 0" in res.output


def test_non_finite_probabilities_are_error_rows(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert judge(BundleMeta.model_construct(abstain=Abstain(threshold=0.5)), float("nan"), 0.0) == ("error", [])
    assert judge(BundleMeta.model_construct(), 0.9, float("nan")) == ("error", [])
    img = tmp_path / "a.png"
    img.write_bytes(encode(xray(), "PNG"))
    predictor = Predictor(bundle)
    engine = predictor.engine
    monkeypatch.setattr(engine, "forward", lambda x: (np.full((len(x), 4), np.nan, np.float32),) + (
        np.ones((len(x), engine.extras["cam_weight"].shape[1], 5, 5), np.float32),
    ))  # fmt: skip
    (row,) = (s.prediction for s in predictor.predict_files([str(img)]))
    assert row.decision == "error" and row.label is None and row.confidence is None and "non-finite" in row.error
    assert row.path == str(img) and row.probabilities == {}  # no probabilities to misread


def test_seal_helper_checks_before_writing(bundle: Path):
    meta = meta_of(bundle)
    meta["onnx_sha256"] = "0" * 64
    (bundle / "model.json").write_text(json.dumps(meta))
    before = (bundle / MANIFEST).read_text()
    with pytest.raises(BundleError, match=r"model\.onnx does not match the sha256 in model\.json"):
        seal(bundle)
    assert (bundle / MANIFEST).read_text() == before
    assert bundle_mod.FILES == ("extras.npz", "model.json", "model.onnx")
