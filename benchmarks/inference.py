"""Inference speed (issue 6): the shipped bundle against PyTorch eager and a DenseNet-121 reference, in one run.

Usage: python benchmarks/inference.py [--runs 200] [--quick] [--json out.json] [--skip-cold] [--skip-options]
                                     [--compare OTHER_BUNDLE]

Measures, side by side in one process (candidates are interleaved round by round, because this machine's speed
drifts): batch-1 latency (median, p90) and batch-32 throughput of
  - the shipped bundle through onnxruntime (``Engine.forward``),
  - the same network (timm resnet18, 1x160x160, random weights) in PyTorch eager fp32 and bf16 autocast,
  - DenseNet-121 (timm, 1x224x224, random weights) in PyTorch eager fp32 and through onnxruntime;
end-to-end batch-32 throughput from files (``Predictor.predict_files``, decoding included) over the bundled samples;
onnxruntime session options for batch 1; the cold start of ``cxr-triage predict one.jpg --format csv`` (median of
10 processes) and the top import costs of the predict path (``python -X importtime``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(str(resources.files("cxr_triage") / "assets" / "samples"))
Bench = Callable[[], object]


def cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    family = re.search(r"^cpu family\s*:\s*(.*)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
    extra = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if flags and f in flags.group(1).split()]
    return f"{name.group(1) if name else platform.processor()} (family {family.group(1) if family else '?'}; " + (
        " ".join(extra) + ")"
    )


def interleaved(fns: dict[str, Bench], runs: int, warmup: int = 5, rounds: int = 10) -> dict[str, list[float]]:
    """Per-call seconds for each candidate; candidates alternate in ``rounds`` chunks so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    per = max(1, -(-runs // rounds))
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def summary(ts: list[float], batch: int = 1) -> dict[str, float]:
    a = np.asarray(ts)
    return {
        "median_ms": float(np.median(a) * 1e3),
        "p90_ms": float(np.percentile(a, 90) * 1e3),
        "img_per_s": float(batch / np.median(a)),
        "n": len(ts),
    }


def ort_session(path: str, threads: int, level: str = "ALL", spinning: bool | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ort_fn(sess, x: np.ndarray) -> Bench:
    name = sess.get_inputs()[0].name
    return lambda: sess.run(None, {name: x})


def torch_fn(model, x, bf16: bool) -> Bench:
    import torch

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(x)

    return run


def fmt_row(name: str, s: dict[str, float]) -> str:
    return f"| {name} | {s['median_ms']:.2f} | {s['p90_ms']:.2f} | {s['img_per_s']:.1f} | {s['n']} |"


def model_benchmarks(runs: int, quick: bool, results: dict, compare: Path | None = None) -> None:
    import onnxruntime as ort
    import timm
    import torch

    from cxr_triage.runtime.engine import Engine
    from cxr_triage.training.model import create_model

    torch.manual_seed(0)
    engine = Engine()
    size = engine.spec.size
    other = Engine(compare) if compare else None
    results["env"]["shipped_weights"] = engine.bundle.raw.get("weights", "")
    if other is not None:
        results["env"]["compare"] = f"{compare} ({other.bundle.raw.get('weights', '')})"
    results["env"].update(
        torch=torch.__version__,
        onnxruntime=ort.__version__,
        torch_threads=torch.get_num_threads(),
        ort_intra_op_threads=engine.session.get_session_options().intra_op_num_threads,
    )
    ours = create_model("resnet18").eval()
    dense = timm.create_model("densenet121", in_chans=1, num_classes=4).eval()
    tmp = tempfile.mkdtemp(prefix="cxr-bench-")
    dense_onnx = os.path.join(tmp, "densenet121.onnx")
    torch.onnx.export(
        dense,
        (torch.randn(1, 1, 224, 224),),
        dense_onnx,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
        opset_version=17,
    )
    dense_sess = ort_session(dense_onnx, engine.session.get_session_options().intra_op_num_threads)
    rng = np.random.default_rng(0)

    def inputs(batch: int, side: int) -> tuple[np.ndarray, torch.Tensor]:
        x = rng.standard_normal((batch, 1, side, side), dtype=np.float32)
        return x, torch.from_numpy(x.copy())

    for batch, n in ((1, runs), (32, 6 if quick else 20)):
        xo, to = inputs(batch, size)
        xd, td = inputs(batch, 224)
        xc = inputs(batch, other.spec.size)[0] if other is not None else None
        fns = {
            "ours ORT (shipped bundle)": (lambda xo=xo: engine.forward(xo)),
            **({"ours ORT (--compare bundle)": (lambda xc=xc: other.forward(xc))} if other is not None else {}),
            "ours eager fp32": torch_fn(ours, to, False),
            "ours eager bf16": torch_fn(ours, to, True),
            "DenseNet-121 ORT": ort_fn(dense_sess, xd),
            "DenseNet-121 eager fp32": torch_fn(dense, td, False),
        }
        # DenseNet eager is slow: give it fewer runs but the same interleaving.
        slow = {k: v for k, v in fns.items() if k.startswith("DenseNet-121 eager") or ("eager" in k and batch > 1)}
        fast = {k: v for k, v in fns.items() if k not in slow}
        rounds = min(10, n)
        t = interleaved(fast, n, warmup=3 if batch > 1 else 10, rounds=rounds)
        slow_runs = max(3, n // 4)
        t.update(interleaved(slow, slow_runs, warmup=2 if batch == 1 else 1, rounds=min(10, slow_runs)))
        results[f"batch{batch}"] = {k: summary(t[k], batch) for k in fns}
        print(f"\nbatch {batch} (1x{size}^2 ours, 1x224^2 DenseNet):")
        print("| candidate | median ms | p90 ms | img/s | runs |\n|---|---|---|---|---|")
        for k in fns:
            print(fmt_row(k, results[f"batch{batch}"][k]))
    b1, b32 = results["batch1"], results["batch32"]
    ours_ort = b1["ours ORT (shipped bundle)"]["median_ms"]
    results["ratios"] = {
        "b1 DenseNet eager / ours ORT": b1["DenseNet-121 eager fp32"]["median_ms"] / ours_ort,
        "b1 DenseNet ORT / ours ORT": b1["DenseNet-121 ORT"]["median_ms"] / ours_ort,
        "b1 ours eager fp32 / ours ORT": b1["ours eager fp32"]["median_ms"] / ours_ort,
        "b1 ours eager bf16 / ours ORT": b1["ours eager bf16"]["median_ms"] / ours_ort,
        "b32 ours ORT / DenseNet eager (img/s)": b32["ours ORT (shipped bundle)"]["img_per_s"]
        / b32["DenseNet-121 eager fp32"]["img_per_s"],
        "b32 ours ORT / DenseNet ORT (img/s)": b32["ours ORT (shipped bundle)"]["img_per_s"]
        / b32["DenseNet-121 ORT"]["img_per_s"],
    }
    if other is not None:
        results["ratios"]["b1 --compare / shipped (ms)"] = b1["ours ORT (--compare bundle)"]["median_ms"] / ours_ort
        results["ratios"]["b32 shipped / --compare (img/s)"] = (
            b32["ours ORT (shipped bundle)"]["img_per_s"] / b32["ours ORT (--compare bundle)"]["img_per_s"]
        )
        results["_other"] = other
    print("\nratios:")
    for k, v in results["ratios"].items():
        print(f"  {k}: {v:.2f}x")
    results["_engine"] = engine


def options_benchmark(runs: int, results: dict, size: int) -> None:
    """Batch-1 latency of the shipped model under onnxruntime session options, interleaved."""
    from cxr_triage.runtime.engine import default_bundle_dir

    path = str(default_bundle_dir() / "model.onnx")
    x = np.random.default_rng(1).standard_normal((1, 1, size, size), dtype=np.float32)
    x32 = np.random.default_rng(2).standard_normal((32, 1, size, size), dtype=np.float32)
    configs = {
        "2 threads, ALL, spin (= Engine)": (2, "ALL", None),
        "1 thread, ALL": (1, "ALL", None),
        "2 threads, ALL, no spin": (2, "ALL", False),
        "2 threads, EXTENDED": (2, "EXTENDED", None),
        "2 threads, BASIC": (2, "BASIC", None),
    }
    sessions = {k: ort_session(path, *v) for k, v in configs.items()}
    t1 = interleaved({k: ort_fn(s, x) for k, s in sessions.items()}, runs, warmup=10)
    sel = ["2 threads, ALL, spin (= Engine)", "1 thread, ALL", "2 threads, ALL, no spin"]
    t32 = interleaved({k: ort_fn(sessions[k], x32) for k in sel}, 20, warmup=2)
    results["ort_options"] = {k: {"b1": summary(t1[k]), "b32": summary(t32[k], 32) if k in t32 else None} for k in t1}
    print("\nonnxruntime options, shipped model:")
    print("| options | b1 median ms | b1 p90 ms | b32 img/s |\n|---|---|---|---|")
    for k, v in results["ort_options"].items():
        b32 = f"{v['b32']['img_per_s']:.1f}" if v["b32"] else "–"
        print(f"| {k} | {v['b1']['median_ms']:.2f} | {v['b1']['p90_ms']:.2f} | {b32} |")


def end_to_end(results: dict, engine, quick: bool, key: str = "end_to_end") -> None:
    from cxr_triage.runtime.predictor import Predictor

    predictor = Predictor(engine.bundle)

    files = sorted(str(p) for p in SAMPLES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    paths = (files * (-(-128 // len(files))))[: max(128, len(files))]
    reps = 2 if quick else 5
    list(predictor.predict_files(paths[:32]))  # warm-up
    e2e, dec = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        rows = [s.prediction for s in predictor.predict_files(paths, batch_size=32, workers=2)]
        e2e.append(time.perf_counter() - t0)
        assert len(rows) == len(paths) and not any(r.decision == "error" for r in rows)
        t0 = time.perf_counter()
        for p in paths:
            predictor.read(p, p, shrink=True)
        dec.append(time.perf_counter() - t0)
    results[key] = {
        "bundle_weights": engine.bundle.raw.get("weights", ""),
        "images": len(paths),
        "distinct_files": len(files),
        "img_per_s_median": len(paths) / statistics.median(e2e),
        "img_per_s_all": [round(len(paths) / t, 1) for t in e2e],
        "decode_only_1_thread_img_per_s": len(paths) / statistics.median(dec),
    }
    r = results[key]
    print(
        f"\n{key} ({r['bundle_weights']}) Predictor.predict_files, {len(paths)} paths ({len(files)} files repeated), "
        "batch 32, 2 decode threads: "
        f"{r['img_per_s_median']:.1f} img/s (runs: {r['img_per_s_all']}); "
        f"decode alone (1 thread): {r['decode_only_1_thread_img_per_s']:.1f} img/s"
    )


def cold_start(results: dict, n: int) -> None:
    exe = Path(sys.executable).with_name("cxr-triage")
    img = str(sorted(SAMPLES.glob("*.jpg"))[0])
    cmd = [str(exe), "predict", img, "--format", "csv"]
    subprocess.run(cmd, check=True, capture_output=True)  # page cache warm-up
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        ts.append(time.perf_counter() - t0)
    probe = (
        "import sys, time; t0 = time.perf_counter(); from cxr_triage.runtime.engine import Engine; "
        "t1 = time.perf_counter(); "
        "Engine(); t2 = time.perf_counter(); from cxr_triage.cli import app\n"
        f"try: app(['predict', {img!r}, '--format', 'csv'], standalone_mode=False)\n"
        "finally: print('PROBE', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'lightning', "
        "'matplotlib', 'scipy', 'pandas', 'sklearn', 'skimage', 'fastapi', 'jinja2'}), round(t1 - t0, 3), "
        "round(t2 - t1, 3), file=sys.stderr)"
    )
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    line = next(ln for ln in p.stderr.splitlines() if ln.startswith("PROBE"))
    heavy, t_import_engine, t_engine = line.split(" ", 1)[1].rsplit(" ", 2)
    imp = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-c",
            "import cxr_triage.cli, cxr_triage.runtime.predict, cxr_triage.runtime.engine",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = []
    for ln in imp.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", ln)
        if m:
            rows.append((int(m.group(2)), len(m.group(3)), m.group(4)))
    # Self time summed per root package: where the import time goes.
    per_pkg: dict[str, int] = {}
    for ln in imp.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", ln)
        if m:
            root = m.group(2).split(".")[0]
            per_pkg[root] = per_pkg.get(root, 0) + int(m.group(1))
    top_level = sorted(((us, 0, name) for name, us in per_pkg.items()), reverse=True)[:12]
    results["cold_start"] = {
        "command": " ".join(["cxr-triage", "predict", Path(img).name, "--format", "csv"]),
        "median_s": statistics.median(ts),
        "all_s": [round(t, 3) for t in ts],
        "heavy_modules_loaded_on_predict": heavy,
        "import_engine_s": float(t_import_engine),
        "engine_init_s": float(t_engine),
        "importtime_total_ms": sum(r[0] for r in rows if r[1] <= 1) / 1e3,  # depth 0-1: the roots
        "importtime_top_ms": [(name, round(us / 1e3, 1)) for us, _, name in top_level],
    }
    c = results["cold_start"]
    print(f"\ncold start `{c['command']}`: median {c['median_s']:.3f} s over {n} runs {c['all_s']}")
    print(f"  in-process: import engine {c['import_engine_s']} s, Engine() {c['engine_init_s']} s")
    print(f"  heavy modules imported on the predict path: {heavy}")
    print(f"  -X importtime, self time per package (total {c['importtime_total_ms']:.0f} ms):")
    for name, ms in c["importtime_top_ms"]:
        print(f"    {ms:8.1f} ms  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="batch-1 timed runs per candidate (after warm-up)")
    ap.add_argument("--quick", action="store_true", help="few runs: a smoke test, not a measurement")
    ap.add_argument("--json", type=Path, help="also write all numbers here")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--skip-options", action="store_true")
    ap.add_argument("--compare", type=Path, help="a second bundle (e.g. the fp16 export) measured side by side")
    a = ap.parse_args()
    runs = 20 if a.quick else a.runs
    results: dict = {
        "env": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "runs": runs,
        }
    }
    print("cpu:", results["env"]["cpu"], f"| {os.cpu_count()} logical cores")
    model_benchmarks(runs, a.quick, results, a.compare)
    engine, other = results.pop("_engine"), results.pop("_other", None)
    print(json.dumps(results["env"]))
    end_to_end(results, engine, a.quick)
    if other is not None:
        end_to_end(results, other, a.quick, key="end_to_end_compare")
    if not a.skip_options:
        options_benchmark(runs, results, engine.spec.size)
    if not a.skip_cold:
        cold_start(results, 3 if a.quick else 10)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
