"""`cxr-triage` command line: a thin shell over the stage modules (no logic of its own).

Exit codes: 0 success; 2 usage error or unusable input folder/model; 3 some inputs of a batch failed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Chest X-ray triage: COVID-19 / Lung Opacity / Normal / Viral Pneumonia. "
    "Research and education only; not a medical device.",
)
console = Console(stderr=True)


def _progress(description: str):
    """A Rich progress wrapper with the (iterable, total) signature the stage modules accept."""

    def wrap(iterable, total: int):
        with Progress(
            TextColumn(description),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        ) as bar:
            task = bar.add_task(description, total=total)
            for item in iterable:
                yield item
                bar.advance(task)

    return wrap


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def ingest(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset folder (Kaggle layout or <Class>/ folders).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for manifest.csv, manifest.json, skipped.csv.")],
    val: Annotated[float, typer.Option(help="Validation fraction.")] = 0.1,
    test: Annotated[float, typer.Option(help="Test fraction.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Split seed.")] = 0,
    workers: Annotated[int, typer.Option(help="Hashing processes (0 = all cores).")] = 0,
) -> None:
    """Build a duplicate-aware, stratified, reproducible manifest of a labelled image folder."""
    import time

    from cxr_triage.data.manifest import DatasetError, write_outputs
    from cxr_triage.data.manifest import ingest as run_ingest

    t0 = time.time()
    try:
        result = run_ingest(dataset_dir, val, test, seed, workers or None, progress=_progress("hashing"))
    except (DatasetError, ValueError) as exc:
        _fail(str(exc))
    write_outputs(result, dataset_dir, out, {"val": val, "test": test, "seed": seed})
    m = result.manifest
    table = Table(title=f"{len(m)} images in {out / 'manifest.csv'}")
    for col in ("class", "train", "val", "test", "total"):
        table.add_column(col, justify="right" if col != "class" else "left")
    for label, sub in m.groupby("label"):
        counts = sub["split"].value_counts()
        table.add_row(label, *(str(counts.get(s, 0)) for s in ("train", "val", "test")), str(len(sub)))
    console.print(table)
    console.print(
        f"duplicate groups: {result.n_dup_groups} ({result.n_exact_groups} byte-identical sets); "
        f"skipped files: {len(result.skipped)} (see skipped.csv); {time.time() - t0:.1f} s"
    )


@app.command()
def eda(
    manifest: Annotated[Path, typer.Argument(help="manifest.csv written by `ingest`.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.html and the PNG figures.")],
) -> None:
    """Explore a manifest: one self-contained report.html plus PNG figures."""
    from cxr_triage.data.eda import run_eda
    from cxr_triage.data.manifest import DatasetError

    try:
        report = run_eda(manifest, out)
    except DatasetError as exc:
        _fail(str(exc))
    console.print(f"report: {report}")


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", help="Training config YAML.")] = Path("configs/default.yaml"),
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
) -> None:
    """Train a model (timm + Lightning); writes runs/<name>/ with checkpoints, history and best.pt."""
    from cxr_triage.core.config import ConfigError, load_config
    from cxr_triage.training.train import train as run_train

    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as exc:
        _fail(str(exc))
    try:
        run_dir = run_train(cfg, resume=resume)
    except (FileExistsError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"run: {run_dir}  (best model: {run_dir / 'best.pt'})")


@app.command()
def export(
    ckpt: Annotated[
        list[Path],
        typer.Argument(help="best.pt (or a Lightning .ckpt) from `train`; several: one ensemble (mean logits)."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder to write.")],
    manifest: Annotated[
        Path | None, typer.Option(help="Manifest for parity and calibration (default: the run's).")
    ] = None,
    quantize: Annotated[
        str, typer.Option(help="int8: static quantisation (kept only if val accuracy holds); none: fp16 weights.")
    ] = "int8",
    max_accuracy_drop: Annotated[
        float, typer.Option(help="Largest validation accuracy loss int8 may cost (0.005 = half a point).")
    ] = 0.005,
    border: Annotated[
        float | None, typer.Option(help="Inference border trim, if not the trained one (choose it on validation).")
    ] = None,
) -> None:
    """Export a checkpoint (or an ensemble of several) to a verified, calibrated ONNX bundle."""
    from cxr_triage.training.export import ExportError, export_bundle
    from cxr_triage.training.model import CheckpointError

    try:
        meta = export_bundle(ckpt, out, manifest, quantize=quantize, max_accuracy_drop=max_accuracy_drop, border=border)
    except (CheckpointError, ExportError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    console.print(
        f"bundle: {out}  parity {meta['parity_max_prob_diff']:.1e}  "
        f"T={meta['calibration']['temperature']:.3f}  abstain<{meta['abstain']['threshold']:.3f}"
    )


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option("--model", help="Bundle folder or checkpoint.")],
    data: Annotated[Path, typer.Option("--data", help="manifest.csv, a dataset folder, or a folder with labels.csv.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for metrics.json and report.html.")],
    split: Annotated[str, typer.Option(help="Manifest split to evaluate (train/val/test/all).")] = "test",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
    record: Annotated[bool, typer.Option("--record", help="Store the headline metrics in the bundle.")] = False,
    gallery: Annotated[int, typer.Option(help="Worst errors shown with heatmaps in the report.")] = 12,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    ood: Annotated[
        bool | None, typer.Option("--ood/--no-ood", help="Non-chest-image rejection check (default: manifests).")
    ] = None,
) -> None:
    """Evaluate a model: metrics.json (with CIs, per origin, calibration) and report.html."""
    from cxr_triage.data.manifest import DatasetError
    from cxr_triage.evaluation.evaluate import evaluate as run_evaluate
    from cxr_triage.runtime.engine import BundleError

    try:
        metrics = run_evaluate(
            model,
            data,
            split=split,
            out_dir=out,
            bootstrap=bootstrap,
            record=record,
            gallery=gallery,
            seed=seed,
            ood=ood,
        )
    except (BundleError, DatasetError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    console.print(
        f"accuracy {metrics.get('accuracy', float('nan')):.4f}  macro-F1 {metrics.get('macro_f1', 0):.4f}"
        f"  n={metrics.get('n')}  report: {out / 'report.html'}"
    )


@app.command()
def predict(
    paths: Annotated[
        list[str], typer.Argument(help="Image files, folders (recursive) or globs; with --engine ray also manifests.")
    ],
    model: Annotated[Path | None, typer.Option("--model", help="Bundle folder (default: the shipped one).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    out: Annotated[Path | None, typer.Option("--out", help="Write csv/json here instead of stdout.")] = None,
    heatmaps: Annotated[Path | None, typer.Option("--heatmaps", help="Folder for heatmap overlay PNGs.")] = None,
    lang: Annotated[str, typer.Option("--lang", help="Advice language: en or ko.")] = "en",
    batch_size: Annotated[int, typer.Option(help="Images per onnxruntime call.")] = 32,
    engine_name: Annotated[
        str, typer.Option("--engine", help="local (this process) or ray (an archive on Ray Data: needs .[scale]).")
    ] = "local",
    address: Annotated[str | None, typer.Option(help="--engine ray: join this Ray cluster (default: local).")] = None,
    workers: Annotated[int, typer.Option(help="--engine ray: scoring actors (each loads the model once).")] = 2,
) -> None:
    """Classify chest X-rays with triage advice; exit 3 if any input could not be read."""
    from cxr_triage.runtime.engine import BundleError, Engine
    from cxr_triage.runtime.predict import collect_inputs, predict_paths, write_rows

    if fmt not in ("table", "csv", "json"):
        _fail(f"unknown --format {fmt!r}; use table, csv or json")
    if lang not in ("en", "ko"):
        _fail(f"unknown --lang {lang!r}; use en or ko")
    if engine_name == "ray":
        if heatmaps is not None:
            _fail("--heatmaps works with --engine local only")
        _predict_archive(paths, out, model, fmt, lang, batch_size, address, workers)
        return
    if engine_name != "local":
        _fail(f"unknown --engine {engine_name!r}; use local or ray")
    files = collect_inputs(paths)
    if not files:
        _fail("no image files found in the given paths")
    try:
        engine = Engine(model)
    except BundleError as exc:
        _fail(str(exc))
    rows = list(_progress("predicting")(predict_paths(engine, files, lang, heatmaps, batch_size), len(files)))
    if fmt == "table":
        _print_table(rows, lang)
    elif out is not None:
        with open(out, "w", encoding="utf-8", newline="") as f:
            write_rows(rows, fmt, f)
        console.print(f"wrote {len(rows)} rows to {out}")
    else:
        write_rows(rows, fmt, sys.stdout)
    if heatmaps is not None:
        console.print(f"heatmaps: {heatmaps}")
    if any(r["decision"] == "error" for r in rows):
        raise typer.Exit(3)


def _predict_archive(
    paths: list[str],
    out: Path | None,
    model: Path | None,
    fmt: str,
    lang: str,
    batch_size: int,
    address: str | None,
    workers: int,
) -> None:
    """``predict --engine ray``: score_archive into a Parquet (or CSV) file; resumable."""
    try:
        from cxr_triage.runtime.archive import ArchiveError, score_archive
    except ImportError as exc:
        _fail(f"--engine ray needs Ray Data ({exc}); install it with: pip install 'cxr-triage[scale]'")
    if out is None or fmt == "json":
        _fail("--engine ray writes a file: give --out results.parquet (or --out results.csv / --format csv)")
    opts = {"address": address, "workers": workers, "model": model, "lang": lang, "batch_size": batch_size}
    try:
        s = score_archive(paths, out, fmt="csv" if fmt == "csv" else None, progress=_progress("scoring"), **opts)
    except (ArchiveError, ValueError) as exc:
        _fail(str(exc))
    console.print(
        f"wrote {s.total} rows to {s.out} ({s.scored} scored now, {s.skipped} already there, {s.errors} errors)"
    )
    if s.errors:
        raise typer.Exit(3)


def _print_table(rows: list[dict], lang: str) -> None:
    """A readable table (advice without the repeated notice), then the notice once."""
    from cxr_triage.core.classes import DISPLAY_NAMES
    from cxr_triage.runtime.advice import NOTICE

    out = Console()
    if not out.is_terminal:
        out = Console(width=150)
    table = Table(show_lines=True)
    for col, width in (("image", 24), ("result", 16), ("confidence", 10), ("decision", 9), ("next step", None)):
        table.add_column(col, overflow="fold", min_width=width)
    for r in rows:
        label = DISPLAY_NAMES.get(r["label"], "") if r["decision"] not in ("error", "rejected") else ""
        conf = f"{r['confidence']:.1%}" if label else ""
        step = (r.get("advice") or "").removesuffix(NOTICE[lang]).strip() or r["error"]
        table.add_row(Path(r["path"]).name, label, conf, r["decision"], step)
    out.print(table)
    out.print(NOTICE[lang])


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    model: Annotated[Path | None, typer.Option("--model", help="Bundle folder (default: the shipped one).")] = None,
) -> None:
    """Web page and JSON API (FastAPI + uvicorn)."""
    from cxr_triage.service import run

    run(host=host, port=port, bundle_dir=model)


if __name__ == "__main__":
    app()
