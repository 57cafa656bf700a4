"""The Python API (``from cxr_triage import Triage``) and a light ``import cxr_triage``; ``--version`` and
``python -m cxr_triage`` end to end are in tests/integration/test_api_cli.py."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cxr_triage
from cxr_triage import Prediction, Triage
from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.runtime.engine import default_bundle_dir
from cxr_triage.serve.samples import list_samples, samples_dir
from tests.conftest import REPO


@pytest.fixture(scope="module")
def triage(tiny_bundle: Path) -> Triage:
    return Triage(tiny_bundle)


@pytest.fixture
def pictures(tmp_path: Path, class_image: Callable[..., np.ndarray]) -> list[Path]:
    rng = np.random.default_rng(2)
    out = []
    for i, cid in enumerate([*CLASS_IDS, "covid"]):
        out.append(tmp_path / f"{i}_{cid}.png")
        Image.fromarray(class_image(cid, 90 + i, 100, rng)).save(out[-1])
    return out


def test_predict_many_is_an_ordered_iterator(triage: Triage, pictures: list[Path], tmp_path: Path):
    missing = tmp_path / "missing.png"
    it = triage.predict_many([*pictures, missing], batch_size=2)
    assert isinstance(it, Iterator)
    first = next(it)  # yielded before the rest is scored
    preds = [first, *it]
    assert [p.path for p in preds] == [str(p) for p in [*pictures, missing]]
    assert all(isinstance(p, Prediction) for p in preds)
    assert preds[-1].decision == "error" and "no such file" in preds[-1].error
    one = triage.predict(pictures[0])
    assert one.model_dump(exclude={"path"}) == preds[0].model_dump(exclude={"path"})
    assert one.model == triage.model and triage.classes == list(CLASS_IDS)
    with pytest.raises(ValueError, match="batch_size"):
        next(triage.predict_many(pictures, batch_size=0))


def test_predict_array_matches_the_file(triage: Triage, pictures: list[Path]):
    arr = np.asarray(Image.open(pictures[1]))
    from_file, from_array = triage.predict(pictures[1]), triage.predict_array(arr)
    assert from_array.path == "array" and from_array.probabilities == from_file.probabilities
    wide = triage.predict_array(arr.astype(np.uint16) * 257)  # 16-bit data is scaled, not clipped
    assert wide.label == from_file.label
    for p in triage.predict_array(arr, heatmap=True), triage.predict(pictures[1], heatmap=True):
        if p.decision != "rejected":
            assert p.heatmap.shape == (*arr.shape, 3) and p.heatmap.dtype == np.uint8
    colour = np.stack([arr, arr // 3, 255 - arr], axis=2).astype(np.uint8)
    assert triage.predict_array(colour).decision == "rejected"
    with pytest.raises(ValueError, match="channels"):
        triage.predict_array(np.zeros((64, 64, 5), np.uint8))
    with pytest.raises(ValueError, match="numpy array"):
        triage.predict_array([[0, 1], [2, 3]])  # type: ignore[arg-type]


def test_korean_and_bad_language(tiny_bundle: Path, pictures: list[Path]):
    ko = Triage(tiny_bundle, lang="ko").predict(pictures[0])
    assert ko.lang == "ko" and any("\uac00" <= ch <= "\ud7a3" for ch in ko.advice)
    with pytest.raises(ValueError, match="language"):
        Triage(tiny_bundle, lang="fr")


def test_shipped_model_and_samples():
    triage = Triage()
    meta = json.loads((default_bundle_dir() / "model.json").read_text())
    assert triage.model.name == meta["name"] and "Triage(" in repr(triage)
    samples = list_samples()
    assert len(samples) == 16 and {s.label for s in samples} == set(CLASS_IDS)
    p = triage.predict(samples_dir() / "COVID-2114.jpg")
    assert (p.label, p.decision) == ("covid", "accept") and "Prediction(path=" in repr(p)


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return out.stdout.strip()


def test_import_is_light():
    heavy = ("numpy", "onnxruntime", "pydantic", "PIL", "typer", "rich", "fastapi", "torch")
    code = f"import sys, cxr_triage; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    assert run_python(code) == "[]"
    code = "import sys, cxr_triage; cxr_triage.Triage; print('numpy' in sys.modules, 'torch' in sys.modules)"
    assert run_python(code) == "True False"
    assert {"Triage", "Prediction", "__version__"} <= set(dir(cxr_triage))
    with pytest.raises(AttributeError, match="no attribute"):
        cxr_triage.Nope  # noqa: B018
