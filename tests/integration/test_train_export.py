"""Training (smoke), checkpoints, resume, export parity and the bundle contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.core.config import ConfigError, apply_overrides, load_config
from cxr_triage.core.preprocess import PreprocessSpec, normalise, prepare
from cxr_triage.runtime.bundle import sha256_file
from cxr_triage.runtime.engine import BundleError, read_bundle_meta
from cxr_triage.runtime.predictor import Predictor
from cxr_triage.training.export import PARITY_TOL, export_module
from cxr_triage.training.model import CheckpointError, create_model, load_checkpoint
from tests.conftest import REPO, smoke_config


def test_config_overrides_and_unknown_keys():
    cfg = load_config(REPO / "configs" / "default.yaml", ["model.arch=resnet34", "trainer.max_epochs=3"])
    assert cfg["model"]["arch"] == "resnet34" and cfg["trainer"]["max_epochs"] == 3
    with pytest.raises(ConfigError, match="unknown config key"):
        apply_overrides(cfg, ["model.archh=x"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(cfg, ["model.arch"])


def test_model_has_gap_linear_head_and_rejects_others():
    m = create_model("resnet18")
    assert m.get_classifier().out_features == len(CLASS_IDS)
    assert m(torch.zeros(2, 1, 64, 64)).shape == (2, 4)
    with pytest.raises(ValueError, match="unknown timm architecture"):
        create_model("no_such_net_123")


def test_smoke_run_writes_history_curves_and_safe_checkpoint(smoke_run: Path):
    hist = pd.read_csv(smoke_run / "history.csv")
    assert list(hist["epoch"]) == [0, 1]
    assert hist["val_macro_f1"].between(0, 1).all() and (hist["train_img_per_s"] > 0).all()
    assert (smoke_run / "curves.png").stat().st_size > 1000
    assert (smoke_run / "checkpoints" / "last.ckpt").exists()
    payload = torch.load(smoke_run / "best.pt", weights_only=True)  # no pickled code inside
    assert payload["classes"] == list(CLASS_IDS)
    assert payload["extra"]["counts"]["train"]["covid"] > 0
    model, cfg, spec = load_checkpoint(smoke_run / "best.pt")
    assert spec.size == 64 and cfg["model"]["arch"] == "resnet18"


def test_run_refuses_to_overwrite_and_resumes(smoke_manifest: Path, tmp_path: Path):
    from cxr_triage.training.train import train

    cfg = smoke_config(tmp_path, smoke_manifest, extra=["trainer.max_epochs=1"])
    run = train(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)
    run2 = train(apply_overrides(cfg, ["trainer.max_epochs=2"]), resume=True)
    assert run2 == run
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [0, 1]


def test_checkpoint_loading_refuses_garbage(tmp_path: Path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_bundle_contract_and_parity(smoke_bundle_fp16: Path, smoke_run: Path, smoke_manifest: Path):
    smoke_bundle = smoke_bundle_fp16
    meta = read_bundle_meta(smoke_bundle)
    assert meta["classes"] == list(CLASS_IDS)
    assert meta["parity_max_prob_diff"] <= PARITY_TOL
    assert meta["calibration"]["temperature"] > 0 and 0 <= meta["abstain"]["threshold"] <= 1
    assert meta["ood"]["threshold"] > 0
    engine = Predictor(smoke_bundle).engine
    model, _, spec = load_checkpoint(smoke_run / "best.pt")
    paths = [p for p in pd.read_csv(smoke_manifest)["path"][:6]]
    root = json.loads((smoke_manifest.parent / "manifest.json").read_text())["dataset_root"]
    x = np.stack([normalise(prepare(Path(root) / p, spec), spec) for p in paths])
    logits, feats = engine.forward(x)
    module, fp16 = export_module(model, spec.size)  # the fused, fp16-rounded module that was exported
    assert fp16 and meta["weights"].startswith("fp16")
    with torch.no_grad():
        ref_logits, ref_feats = (t.numpy() for t in module(torch.from_numpy(x)))
        trained = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
    np.testing.assert_allclose(feats, ref_feats, atol=1e-4)
    np.testing.assert_allclose(logits, trained, atol=5e-2)  # fp16 weight storage moves logits only slightly
    assert feats.shape[:2] == (len(paths), model.num_features)
    # the CAM from the exported features and head weights equals sum_k w_ck A_k computed in torch
    cam = engine.cam(feats[0], 0)
    w = model.get_classifier().weight[0].detach().half().float().numpy()
    ref_cam = np.maximum(np.tensordot(w, ref_feats[0], axes=1), 0)
    np.testing.assert_allclose(cam, ref_cam / ref_cam.max(), atol=1e-4)
    # the ONNX file stores large weights as fp16
    import onnx

    inits = onnx.load(str(smoke_bundle / "model.onnx")).graph.initializer
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in inits)


def test_int8_bundle_is_quantised_checked_and_close_to_fp32(
    smoke_bundle: Path, smoke_bundle_fp16: Path, smoke_manifest: Path
):
    import onnx

    meta = read_bundle_meta(smoke_bundle)
    assert meta["weights"].startswith("int8") and meta["parity_max_prob_diff"] <= PARITY_TOL  # fp32 graph vs torch
    q = meta["quantization"]
    assert q["calibration_images"] > 0 and 0 <= q["val_top1_agreement"] <= 1 and q["val_max_prob_diff"] < 0.2
    graph = onnx.load(str(smoke_bundle / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer)
    assert (smoke_bundle / "model.onnx").stat().st_size < q["fp32_onnx_bytes"] / 2
    # int8 and fp16 bundles of the same checkpoint give close probabilities on real images
    df = pd.read_csv(smoke_manifest)
    root = Path(json.loads((smoke_manifest.parent / "manifest.json").read_text())["dataset_root"])
    int8, fp = Predictor(smoke_bundle).engine, Predictor(smoke_bundle_fp16).engine
    x = np.stack([normalise(prepare(root / p, int8.spec), int8.spec) for p in df["path"][:8]])
    p8, pf = (torch.softmax(torch.from_numpy(e.forward(x)[0]), 1).numpy() for e in (int8, fp))
    assert np.abs(p8 - pf).max() < 0.2


def test_int8_export_refuses_to_lose_accuracy(smoke_run: Path, tmp_path: Path):
    from cxr_triage.training.export import ExportError, export_bundle

    with pytest.raises(ExportError, match="--quantize none"):
        export_bundle(smoke_run / "best.pt", tmp_path / "b", max_accuracy_drop=-1.0)  # any result is "too lossy"
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="quantize must be one of"):
        export_bundle(smoke_run / "best.pt", tmp_path / "b", quantize="int4")


def test_altered_bundle_is_refused(smoke_bundle: Path, tmp_path: Path):
    b = tmp_path / "b"
    shutil.copytree(smoke_bundle, b)
    with open(b / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        Predictor(b)
    shutil.copy(smoke_bundle / "model.onnx", b / "model.onnx")
    meta = json.loads((b / "model.json").read_text())
    meta["classes"] = ["a", "b", "c", "d"]
    (b / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="model.json does not match its sha256"):  # the seal sees the edit
        Predictor(b)
    reseal_by_hand(b)  # the schema still refuses the class list
    with pytest.raises(BundleError, match="classes"):
        Predictor(b)
    del meta["preprocess"]
    meta["classes"] = list(CLASS_IDS)
    (b / "model.json").write_text(json.dumps(meta))
    reseal_by_hand(b)
    with pytest.raises(BundleError, match="preprocess"):
        Predictor(b)


def reseal_by_hand(b: Path) -> None:
    """Rewrite SHA256SUMS over every file without any check (what a hand edit would do)."""
    files = sorted(f for f in b.rglob("*") if f.is_file() and f.name != "SHA256SUMS")
    (b / "SHA256SUMS").write_text("".join(f"{sha256_file(f)}  {f.relative_to(b).as_posix()}\n" for f in files))


def test_init_from_starts_with_the_given_weights(smoke_run: Path, smoke_manifest: Path, tmp_path: Path):
    from cxr_triage.training.train import Classifier

    cfg = smoke_config(tmp_path, smoke_manifest, extra=[f"model.init_from={smoke_run / 'best.pt'}"])
    module = Classifier(cfg)
    trained = torch.load(smoke_run / "best.pt", weights_only=True)["state_dict"]
    for k, v in module.model.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_class_fraction_keeps_a_seeded_share_of_one_class(smoke_manifest: Path, tmp_path: Path):
    from cxr_triage.training.train import build_loaders, subsample_classes

    labels = np.repeat(np.arange(4), [10, 40, 30, 20])
    rows = np.arange(len(labels))
    kept = subsample_classes(rows, labels, {"lung_opacity": 0.25}, seed=0)
    assert np.bincount(labels[kept]).tolist() == [10, 10, 30, 20]
    assert np.array_equal(kept, subsample_classes(rows, labels, {"lung_opacity": 0.25}, seed=0))
    assert not np.array_equal(kept, subsample_classes(rows, labels, {"lung_opacity": 0.25}, seed=1))
    with pytest.raises(ValueError, match="unknown class 'lungs'"):
        subsample_classes(rows, labels, {"lungs": 0.5}, 0)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        subsample_classes(rows, labels, {"covid": 0}, 0)
    # through the config: the recorded training counts are the ones actually used
    cfg = smoke_config(tmp_path, smoke_manifest, extra=["data.class_fraction={covid: 0.5}"])
    full = smoke_config(tmp_path, smoke_manifest)
    ps = PreprocessSpec.from_dict(cfg["preprocess"])
    _, _, summary = build_loaders(cfg, ps)
    _, _, summary_full = build_loaders(full, ps)
    assert summary["counts"]["train"]["covid"] == round(summary_full["counts"]["train"]["covid"] * 0.5)
    assert summary["counts"]["train"]["normal"] == summary_full["counts"]["train"]["normal"]


def test_extra_train_rows_join_the_training_split_only(smoke_manifest: Path, tmp_path: Path, class_image):
    from PIL import Image

    from cxr_triage.training.train import build_loaders

    rng = np.random.default_rng(5)
    folder = tmp_path / "other-hospital"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(class_image("normal", 80, 72, rng)).save(folder / f"n{i}.png")
    csv = folder / "labels.csv"
    csv.write_text("file,label\nn0.png,Normal\nn1.png,normal\nn2.png,NORMAL\n")
    base = smoke_config(tmp_path, smoke_manifest)
    cfg = smoke_config(tmp_path, smoke_manifest, extra=[f"data.extra_train=[{csv}]", "data.extra_train_weight=4"])
    spec = PreprocessSpec.from_dict(cfg["preprocess"])
    tr0, va0, _ = build_loaders(base, spec)
    tr1, va1, _ = build_loaders(cfg, spec)
    assert len(tr1.dataset) == len(tr0.dataset) + 3 and len(va1.dataset) == len(va0.dataset)
    extra_w = list(tr1.sampler.weights[-3:])
    normal_w = float(tr1.sampler.weights[int(np.flatnonzero(tr1.dataset.labels == 2)[0])])
    assert extra_w == pytest.approx([4 * normal_w] * 3)  # weighted 4x a pool normal
    assert (tr1.dataset.labels[-3:] == 2).all()
    # a lung view gets the extra images as lung views too (the shipped segmenter), and lung guidance their masks
    lung_keys = [f"data.extra_train=[{csv}]", "preprocess.lungs=crop", "model.attention_weight=1"]
    lungs = smoke_config(tmp_path, smoke_manifest, extra=lung_keys)
    lung_spec = PreprocessSpec.from_dict(lungs["preprocess"])
    tr2, _, _ = build_loaders(lungs, lung_spec)
    assert len(tr2.dataset) == len(tr0.dataset) + 3
    assert tr2.dataset.masks is not None and len(tr2.dataset.masks) == len(tr2.dataset.images)
    assert tr2.dataset.images.shape[1:] == (lung_spec.size, lung_spec.size) and tr2.dataset.masks[-3:].any()
    with pytest.raises(ValueError, match="not together with data.extra_masked"):
        both = [f"data.extra_train=[{csv}]", "data.extra_masked=x"]
        build_loaders(smoke_config(tmp_path, smoke_manifest, extra=both), spec)
    # refusals: a label that names no class, a missing file, a file that is already in the pool
    csv.write_text("file,label\nn0.png,tuberculosis\n")
    with pytest.raises(ValueError, match="'tuberculosis' names no class"):
        build_loaders(cfg, spec)
    csv.write_text("file,label\nmissing.png,normal\n")
    with pytest.raises(ValueError, match="missing.png does not exist"):
        build_loaders(cfg, spec)
    root = Path(json.loads((smoke_manifest.parent / "manifest.json").read_text())["dataset_root"])
    pool_file = root / pd.read_csv(smoke_manifest)["path"][0]
    shutil.copy(pool_file, folder / "copy.png")
    csv.write_text("file,label\ncopy.png,normal\n")
    with pytest.raises(ValueError, match="1 files are also in the manifest"):
        build_loaders(cfg, spec)


def test_weight_ema_is_validated_and_exported(smoke_manifest: Path, tmp_path: Path):
    from cxr_triage.training.train import train

    run = train(smoke_config(tmp_path, smoke_manifest, extra=["trainer.max_epochs=1", "model.ema_decay=0.9"]))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    ema = {k.removeprefix("ema.module."): v for k, v in ckpt.items() if k.startswith("ema.module.")}
    raw = {k.removeprefix("model."): v for k, v in ckpt.items() if k.startswith("model.")}
    assert ema.keys() == raw.keys()
    key = "conv1.weight"
    assert not torch.equal(ema[key], raw[key]), "the EMA never moved away from (or never lagged) the raw weights"
    best = torch.load(run / "best.pt", weights_only=True)["state_dict"]
    assert torch.equal(best[key], ema[key])  # one epoch: best == last, and what ships is the EMA
    model, _, _ = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert torch.equal(model.state_dict()[key], ema[key])


def test_last_checkpoint_follows_every_epoch_even_without_improvement(tmp_path: Path):
    """--resume must continue after the last finished epoch, not after the best one."""
    import lightning as L

    from cxr_triage.training.train import checkpoint_callbacks

    class Flat(L.LightningModule):  # validation never improves: only epoch 0 is ever "best"
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            return self.lin(batch[0]).pow(2).mean()

        def validation_step(self, batch, _):
            self.log("val/macro_f1", 0.5)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
    best, latest = checkpoint_callbacks(tmp_path)
    trainer = L.Trainer(
        max_epochs=3, callbacks=[best, latest], logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(Flat(), data, data)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 2
    assert Path(best.best_model_path).name == "best-epoch=00.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-epoch=00.ckpt", "last.ckpt"]


def test_export_can_ship_another_border_trim(smoke_run: Path, tmp_path: Path):
    from cxr_triage.training.export import export_bundle

    _, _, trained = load_checkpoint(smoke_run / "best.pt")
    meta = export_bundle(smoke_run / "best.pt", tmp_path / "b", quantize="none", border=0.1)
    assert trained.border != 0.1
    assert meta["preprocess"]["border"] == 0.1 and Predictor(tmp_path / "b").spec.border == 0.1
    assert meta["inference_border"] == {"trained": trained.border, "used": 0.1, "chosen_on": "validation"}
    with pytest.raises(ValueError, match="border must be in"):
        export_bundle(smoke_run / "best.pt", tmp_path / "c", quantize="none", border=0.3)


def test_ensemble_is_one_gap_linear_network_with_the_mean_logits():
    from cxr_triage.training.model import Ensemble

    torch.manual_seed(0)
    a, b = create_model("resnet18").eval(), create_model("resnet18").eval()
    ens = Ensemble([a, b]).eval()
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(ens(x).numpy(), ((a(x) + b(x)) / 2).numpy(), atol=1e-5)
        feats = ens.forward_features(x)
        assert feats.shape[1] == ens.num_features == a.num_features + b.num_features
        # the export's wrapper sees an ordinary GAP + linear network: logits from its own features and head
        logits, f = export_module(ens, 32, fp16=False)[0](x)
        np.testing.assert_allclose(logits.numpy(), ens(x).numpy(), atol=1e-4)
        assert f.shape == feats.shape


def test_export_writes_an_ensemble_of_checkpoints(smoke_run: Path, smoke_manifest: Path, tmp_path: Path):
    import dataclasses

    from cxr_triage.training.export import export_bundle
    from cxr_triage.training.model import save_checkpoint

    model, cfg, spec = load_checkpoint(smoke_run / "best.pt")
    torch.manual_seed(1)
    other = create_model(cfg["model"]["arch"]).eval()  # a second member with other weights
    save_checkpoint(tmp_path / "b.pt", other, cfg, spec)
    meta = export_bundle([smoke_run / "best.pt", tmp_path / "b.pt"], tmp_path / "bundle", quantize="none")
    assert meta["architecture"].startswith("ensemble of 2") and len(meta["training"]["members"]) == 2
    assert meta["weights"].startswith("fp16")  # conv+BN fusion traced through both members
    engine = Predictor(tmp_path / "bundle").engine
    df = pd.read_csv(smoke_manifest)
    root = Path(json.loads((smoke_manifest.parent / "manifest.json").read_text())["dataset_root"])
    x = np.stack([normalise(prepare(root / p, spec), spec) for p in df["path"][:4]])
    logits, feats = engine.forward(x)
    with torch.no_grad():
        mean = ((model(torch.from_numpy(x)) + other(torch.from_numpy(x))) / 2).numpy()
    np.testing.assert_allclose(logits, mean, atol=5e-2)  # fp16 weight storage moves logits only slightly
    assert feats.shape[1] == model.num_features + other.num_features
    assert engine.cam(feats[0], 0).shape == feats.shape[2:]
    # members must share the preprocessing the bundle records
    save_checkpoint(tmp_path / "c.pt", other, cfg, dataclasses.replace(spec, size=spec.size * 2))
    with pytest.raises(CheckpointError, match="other preprocessing"):
        export_bundle([smoke_run / "best.pt", tmp_path / "c.pt"], tmp_path / "bundle2", quantize="none")


def test_init_from_a_lightning_checkpoint(smoke_run: Path, smoke_manifest: Path, tmp_path: Path):
    """Pre-train, then fine-tune: init_from also takes a Lightning .ckpt (e.g. a lung-view run's), same arch only."""
    from cxr_triage.training.model import CheckpointError, load_checkpoint
    from cxr_triage.training.train import Classifier

    ckpt = sorted((smoke_run / "checkpoints").glob("*.ckpt"))[0]
    module = Classifier(smoke_config(tmp_path, smoke_manifest, extra=[f"model.init_from={ckpt}"]))
    start = load_checkpoint(ckpt)[0].state_dict()
    for k, v in module.model.state_dict().items():
        assert torch.equal(v, start[k]), k
    with pytest.raises(CheckpointError, match="resnet18, not a resnet34"):
        Classifier(smoke_config(tmp_path, smoke_manifest, extra=[f"model.init_from={ckpt}", "model.arch=resnet34"]))


def test_distillation_teacher_and_loss(smoke_run: Path, smoke_bundle: Path):
    import torch.nn.functional as F

    from cxr_triage.runtime.predictor import Predictor
    from cxr_triage.training.distill import Teacher, distill_loss
    from cxr_triage.training.model import CheckpointError, load_checkpoint

    teacher = Teacher([str(smoke_run / "best.pt"), str(smoke_bundle)], size=64)
    x = torch.randn(3, 1, 64, 64)
    p = teacher.probs(x, 2.0)
    net = load_checkpoint(smoke_run / "best.pt")[0]
    by_hand = (
        F.softmax(net(x) / 2.0, 1)
        + F.softmax(torch.from_numpy(Predictor(smoke_bundle).engine.forward(x.numpy())[0]) / 2.0, 1)
    ) / 2
    assert p.shape == (3, 4) and torch.allclose(p.sum(1), torch.ones(3))
    assert torch.allclose(p, by_hand, atol=1e-4)  # mean of the members' softened probabilities
    with pytest.raises(CheckpointError, match="at 96 px"):
        Teacher([str(smoke_run / "best.pt")], size=96)
    with pytest.raises(ValueError, match="at least one"):
        Teacher([], size=64)
    z = torch.randn(5, 4)
    assert distill_loss(z, F.softmax(z / 2.0, 1), 2.0).item() == pytest.approx(0.0, abs=1e-5)  # already agrees
    assert distill_loss(z, F.softmax(-z / 2.0, 1), 2.0).item() > 0.1


def test_distilled_training_run(smoke_run: Path, smoke_bundle: Path, smoke_manifest: Path, tmp_path: Path):
    """A seconds-long run that learns from a teacher (a checkpoint and a bundle): it trains, logs the distillation
    loss and the agreement with the teacher, and refuses to combine distillation with lung guidance."""
    from cxr_triage.training.train import Classifier, train

    teachers = f"distill.teachers=[{smoke_run / 'best.pt'}, {smoke_bundle}]"
    cfg = smoke_config(tmp_path, smoke_manifest, name="kd", extra=[teachers, "trainer.max_epochs=1"])
    run = train(cfg)
    assert (run / "best.pt").exists()
    logged = pd.concat(pd.read_csv(f) for f in run.rglob("metrics.csv"))
    assert logged["train/distill"].notna().any() and logged["train/teacher_agreement"].between(0, 1).any()
    with pytest.raises(ValueError, match="without lung guidance"):
        Classifier(smoke_config(tmp_path, smoke_manifest, extra=[teachers, "model.seg_weight=0.5"]))


def test_self_supervised_pretraining_then_fine_tune(smoke_manifest: Path, tmp_path: Path, shared_dataset):
    """`pretrain` (SimSiam) learns from unlabelled images only, logs its k-NN probe and collapse monitor per epoch,
    and writes a checkpoint that a supervised run starts from (`model.init_from`)."""
    from cxr_triage.training.pretrain import pretrain
    from cxr_triage.training.train import Classifier

    cfg = smoke_config(
        tmp_path,
        smoke_manifest,
        name="ssl",
        extra=[
            "pretrain.epochs=2",
            "pretrain.batch_size=8",
            "pretrain.hidden_dim=32",
            "pretrain.out_dim=32",
            "pretrain.predictor_dim=8",
            "pretrain.knn_memory=16",
            f"pretrain.folders=[{shared_dataset.root}]",
        ],
    )
    start = Classifier(smoke_config(tmp_path, smoke_manifest)).model.state_dict()
    run = pretrain(cfg)
    hist = pd.read_csv(run / "history.csv")
    assert hist["epoch"].tolist() == [0, 1]
    assert hist["train_loss"].between(-1, 1).all() and (hist["spread"] > 0).all()
    assert hist["val_knn_acc"].between(0, 1).all()
    ckpt = torch.load(run / "best.pt", weights_only=True)
    n_pool = int((pd.read_csv(smoke_manifest)["split"] == "train").sum())
    assert ckpt["extra"]["pretrain"] == "simsiam" and ckpt["extra"]["images"] > n_pool  # + the folder's images
    module = Classifier(smoke_config(tmp_path, smoke_manifest, extra=[f"model.init_from={run / 'best.pt'}"]))
    got = module.model.state_dict()
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(got[k], v), k
    moved = [k for k, v in start.items() if v.is_floating_point() and "fc" not in k and not torch.equal(v, got[k])]
    assert moved  # the backbone learned something: not the seeded initial weights
    with pytest.raises(FileExistsError):
        pretrain(cfg)
    with pytest.raises(ValueError, match="whole images"):
        pretrain(smoke_config(tmp_path, smoke_manifest, name="ssl2", extra=["preprocess.lungs=crop"]))


def test_knn_probe_votes_by_similarity():
    from cxr_triage.training.pretrain import knn_accuracy

    memory = torch.eye(4).repeat(5, 1) + 0.01 * torch.randn(20, 4)
    labels = torch.arange(4).repeat(5)
    assert knn_accuracy(memory, labels, torch.eye(4), torch.arange(4), k=5) == 1.0
    assert knn_accuracy(memory, labels, torch.eye(4), torch.tensor([1, 2, 3, 0]), k=5) == 0.0
