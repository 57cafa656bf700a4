"""Lung segmenter (issue 11): speed beside the classifier, predict throughput with and without it, cold start,
bundle size, and what the lung gate does to rejection (non-chest images) and false rejection (a manifest split).

Usage: python benchmarks/lungs.py BUNDLE [--manifest runs/data/manifest.csv --split test] [--files 512]
                                  [--runs 200] [--json out.json] [--gates-only]

BUNDLE must carry a segmenter (``lungs/``). "Without" runs the same bundle with ``engine.segmenter = None`` (no lung
masks, no lung gate, no lung attention), side by side in one process, interleaved (this machine's speed drifts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import cpu_model, interleaved, summary  # noqa: E402

LUNG_CODES = ("no_lungs", "lung_layout", "one_lung", "lung_area")

from cxr_triage.core.preprocess import normalise  # noqa: E402
from cxr_triage.runtime.predictor import Predictor  # noqa: E402


def latency(engine: Predictor, runs: int) -> dict[str, dict[str, float]]:
    seg = engine.segmenter
    xc = normalise(np.zeros((1, engine.spec.size, engine.spec.size), np.uint8) + 120, engine.spec)
    xs = normalise(np.zeros((1, seg.spec.size, seg.spec.size), np.uint8) + 120, seg.spec)
    times = interleaved({"classifier": lambda: engine.engine.forward(xc), "segmenter": lambda: seg.logits(xs)}, runs)
    return {k: summary(v) for k, v in times.items()}


def throughput(engine: Predictor, files: list[str], rounds: int = 5) -> dict[str, object]:
    """Median img/s of ``Predictor.predict_files`` with and without the segmenter: one warm-up pass of each first, then
    ``rounds`` rounds, each mode leading every other round (this machine drifts by 10-20 % between passes)."""
    seg = engine.segmenter
    out: dict[str, list[float]] = {"with segmenter": [], "without segmenter": []}
    for r in range(rounds + 1):
        for name in out if r % 2 else reversed(out):
            engine.segmenter = seg if name == "with segmenter" else None
            t0 = time.perf_counter()
            n = sum(1 for _ in (s.prediction for s in engine.predict_files(files if r else files[:64], batch_size=32)))
            if r:
                out[name].append(n / (time.perf_counter() - t0))
    engine.segmenter = seg
    med = {k: statistics.median(v) for k, v in out.items()}
    drop = 1 - med["with segmenter"] / med["without segmenter"]
    return {**med, "drop": drop, "rounds": {k: [round(x, 1) for x in v] for k, v in out.items()}}


def cold_start(bundle: Path, image: str, runs: int = 7) -> float:
    code = (
        "import time; t0 = time.perf_counter(); from cxr_triage.runtime.predictor import Predictor; "
        f" e = Predictor({str(bundle)!r}); "
        f"list((s.prediction for s in e.predict_files([{image!r}]))); print(time.perf_counter() - t0)"
    )
    ts = [
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
        for _ in range(runs)
    ]
    return statistics.median(ts)


def gates(engine: Predictor, manifest: Path | None, split: str) -> dict[str, object]:
    """Rejected share of non-chest images and of a split's chest X-rays, with and without the lung gate."""
    from cxr_triage.data.manifest import load_manifest
    from cxr_triage.evaluation.evaluate import ood_check

    seg, res = engine.segmenter, {}
    df = load_manifest(manifest) if manifest else None
    paths = list(df.loc[df["split"] == split, "abspath"]) if df is not None else []
    for name, s in (("with lung gate", seg), ("without lung gate", None)):
        engine.segmenter = s
        ood = ood_check(engine)["images"]  # the evaluate check: decoded as predict decodes (colour gate too)
        res[f"non-chest rejected ({name})"] = f"{sum(r['rejected'] for r in ood)}/{len(ood)}"
        if s is not None:
            res["non-chest accepted or uncertain"] = [r["name"] for r in ood if not r["rejected"]]
        if paths:
            rows = list(s.prediction for s in engine.predict_files(paths))
            rej = sum(r.decision == "rejected" for r in rows)
            res[f"{split} rejected ({name})"] = f"{rej}/{len(rows)} ({rej / len(rows):.2%})"
            if s is not None:
                codes = [c.code for r in rows for c in r.reasons]
                res[f"{split} unusual framing (pixel gate, lungs vouch: uncertain)"] = codes.count("unusual_framing")
                res[f"{split} lung-gate reasons"] = {k: codes.count(k) for k in LUNG_CODES if k in codes}
                rejected = [c.code for r in rows if r.decision == "rejected" for c in r.reasons]
                res[f"{split} rejected, by reason"] = {k: rejected.count(k) for k in sorted(set(rejected))}
    engine.segmenter = seg
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--manifest", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--files", type=int, default=512)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--gates-only", action="store_true", help="skip the speed measurements (a busy machine)")
    args = ap.parse_args()
    engine = Predictor(args.bundle)
    if engine.segmenter is None:
        sys.exit(f"{args.bundle} carries no lung segmenter (export with --segmenter)")
    res: dict[str, object] = {"cpu": cpu_model(), "bundle": str(args.bundle)}
    if not args.gates_only:
        res["batch-1 latency"] = latency(engine, args.runs)
    if args.manifest and not args.gates_only:
        from cxr_triage.data.manifest import load_manifest

        df = load_manifest(args.manifest)
        files = list(df.loc[df["split"] == args.split, "abspath"].iloc[: args.files])
        res["predict from files (img/s)"] = throughput(engine, files)
        res["cold start s (median of 7)"] = cold_start(args.bundle, files[0])
    res["bundle MB"] = round(sum(f.stat().st_size for f in args.bundle.rglob("*") if f.is_file()) / 1e6, 2)
    res["segmenter MB"] = round(sum(f.stat().st_size for f in (args.bundle / "lungs").rglob("*")) / 1e6, 2)
    print(json.dumps(res, indent=2), flush=True)
    res["gates"] = gates(engine, args.manifest, args.split)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
