"""`cxr-triage` command line: a thin shell over the stage modules (no logic of its own).

Exit codes: 0 success; 2 usage error or unusable input folder/model; 3 some inputs of a batch failed.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from cxr_triage._version import __version__
from cxr_triage.core.extras import as_missing_extra

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


def _inputs(paths: list[str]) -> list[str]:
    """The files to answer for (``runtime.inputs``: every named path and every image-like entry found); what the
    scan skipped is counted on stderr; no files at all is a usage error."""
    from cxr_triage.runtime.inputs import scan_inputs

    found = scan_inputs(paths)
    if found.summary():
        console.print(escape(found.summary()))
    if not found.paths:
        _fail("no image files found in the given paths")
    return found.paths


def _fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


@contextmanager
def _needs(extra: str, command: str) -> Iterator[None]:
    """Code that needs an optional extra: if one of its modules is missing, one sentence naming it (exit 2)."""
    try:
        yield
    except ModuleNotFoundError as exc:
        missing = as_missing_extra(exc, extra, f"`cxr-triage {command}`")
        if missing is None:
            raise
        _fail(str(missing))


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"cxr-triage {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
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

    with _needs("eval", "ingest"):
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
    with _needs("eval", "eda"):
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
    with _needs("train", "train"):
        from cxr_triage.training.train import train as run_train

    run_dir = _run_config(run_train, config, overrides, resume)
    console.print(f"run: {run_dir}  (best model: {run_dir / 'best.pt'})")


def _run_config(run: Callable[..., Path], config: Path, overrides: list[str] | None, resume: bool) -> Path:
    """``run(cfg, resume=...)`` on the config with its overrides; a bad config, a run that exists or a bad value
    ends the command with one sentence (exit 2)."""
    from cxr_triage.core.config import ConfigError, load_config

    try:
        return run(load_config(config, overrides or []), resume=resume)
    except (ConfigError, FileExistsError, ValueError) as exc:
        _fail(str(exc))


@app.command()
def pretrain(
    config: Annotated[Path, typer.Option("--config", help="Training config YAML.")] = Path("configs/default.yaml"),
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
) -> None:
    """Self-supervised pre-training (SimSiam) of the classifier's backbone on unlabelled images; writes
    runs/<name>/best.pt for `cxr-triage train model.init_from=...`."""
    with _needs("train", "pretrain"):
        from cxr_triage.training.pretrain import pretrain as run_pretrain

    run_dir = _run_config(run_pretrain, config, overrides, resume)
    console.print(f"run: {run_dir}  (pre-trained backbone: {run_dir / 'best.pt'})")


@app.command("train-seg")
def train_seg(
    config: Annotated[Path, typer.Option("--config", help="Segmenter config YAML.")] = Path("configs/segment.yaml"),
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
) -> None:
    """Train the lung segmenter (MONAI U-Net + Lightning) on image/mask pairs; writes runs/<name>/best.pt."""
    from cxr_triage.training.segmenter import train_segmenter

    run_dir = _run_config(train_segmenter, config, overrides, resume)  # a PairsError is a ValueError
    console.print(f"run: {run_dir}  (best segmenter: {run_dir / 'best.pt'})")


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
    segmenter: Annotated[
        Path | None,
        typer.Option(help="Lung segmenter bundle to carry (lung attention + lung gate; lung-view models: required)."),
    ] = None,
) -> None:
    """Export a checkpoint (or an ensemble of several) to a verified, calibrated ONNX bundle."""
    from cxr_triage.runtime.engine import BundleError

    with _needs("train", "export"):
        from cxr_triage.training.export import ExportError, export_bundle
        from cxr_triage.training.model import CheckpointError

    try:
        meta = export_bundle(
            ckpt,
            out,
            manifest,
            quantize=quantize,
            max_accuracy_drop=max_accuracy_drop,
            border=border,
            segmenter=segmenter,
        )
    except (CheckpointError, ExportError, BundleError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    console.print(
        f"bundle: {out}  parity {meta['parity_max_prob_diff']:.1e}  "
        f"T={meta['calibration']['temperature']:.3f}  abstain<{meta['abstain']['threshold']:.3f}"
    )


def _export_bundle(*args: Any, **kwargs: Any) -> Any:
    """``training.export.export_bundle``, imported when a checkpoint is evaluated (torch only on that path)."""
    from cxr_triage.training.export import export_bundle

    return export_bundle(*args, **kwargs)


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
    with _needs("eval", "evaluate"):
        from cxr_triage.data.manifest import DatasetError
        from cxr_triage.evaluation.evaluate import evaluate as run_evaluate
    from cxr_triage.runtime.engine import BundleError

    try:
        with _needs("train", "evaluate (of a checkpoint)"):
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
                export=_export_bundle,
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
    lang: Annotated[str, typer.Option("--lang", help="Language of every human string: en or ko.")] = "en",
    batch_size: Annotated[int, typer.Option(help="Images per onnxruntime call.")] = 32,
    engine_name: Annotated[
        str, typer.Option("--engine", help="local (this process) or ray (an archive on Ray Data: needs .[scale]).")
    ] = "local",
    address: Annotated[str | None, typer.Option(help="--engine ray: join this Ray cluster (default: local).")] = None,
    workers: Annotated[int, typer.Option(help="--engine ray: scoring actors (each loads the model once).")] = 2,
) -> None:
    """Classify chest X-rays with triage advice; exit 3 if any input could not be read."""
    from cxr_triage.runtime.engine import BundleError
    from cxr_triage.runtime.formats import FORMATS, write_rows
    from cxr_triage.runtime.i18n import LANGS
    from cxr_triage.runtime.predictor import Predictor

    if fmt not in FORMATS:
        _fail(f"unknown --format {fmt!r}; use table, csv or json")
    if lang not in LANGS:
        _fail(f"unknown --lang {lang!r}; use en or ko")
    if engine_name == "ray":
        if heatmaps is not None:
            _fail("--heatmaps works with --engine local only")
        _predict_archive(paths, out, model, fmt, lang, batch_size, address, workers)
        return
    if engine_name != "local":
        _fail(f"unknown --engine {engine_name!r}; use local or ray")
    files = _inputs(paths)
    try:
        predictor = Predictor(model)
    except BundleError as exc:
        _fail(str(exc))
    scored = predictor.predict_files(files, lang, heatmaps, batch_size)
    preds = [s.prediction for s in _progress("predicting")(scored, len(files))]
    if fmt == "table":
        _print_table(preds, lang)
    elif out is not None:
        with open(out, "w", encoding="utf-8", newline="") as f:
            write_rows(preds, fmt, f)
        console.print(escape(f"wrote {len(preds)} rows to {out}"))
    else:
        write_rows(preds, fmt, sys.stdout)
    if heatmaps is not None:
        console.print(escape(f"heatmaps: {heatmaps}"))
    if any(p.decision == "error" for p in preds):
        raise typer.Exit(3)


@app.command("export-seg")
def export_seg(
    ckpt: Annotated[Path, typer.Argument(help="best.pt (or a Lightning .ckpt) from `train-seg`.")],
    out: Annotated[Path, typer.Option("--out", help="Segmenter bundle folder to write.")],
    quantize: Annotated[str, typer.Option(help="int8 (kept only if val Dice drops <= 0.005) or none.")] = "int8",
) -> None:
    """Export the lung segmenter to ONNX (parity-checked), with held-out Dice/HD95 per origin in model.json."""
    from cxr_triage.training.export import ExportError
    from cxr_triage.training.export_seg import export_segmenter
    from cxr_triage.training.model import CheckpointError

    if quantize not in ("int8", "none"):
        _fail(f"unknown --quantize {quantize!r}; use int8 or none")
    try:
        meta = export_segmenter(ckpt, out, quantize)
    except (CheckpointError, ExportError, FileNotFoundError) as exc:
        _fail(str(exc))
    held = meta["heldout"]
    console.print(
        f"bundle: {out}  weights {meta['weights']}  held-out Dice "
        + ", ".join(f"{k} {v['dice_mean']:.4f} (n={v['n']})" for k, v in held.items())
    )


@app.command()
def segment(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or globs.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for <stem>.png lung masks and segment.csv.")],
    model: Annotated[Path | None, typer.Option("--model", help="Segmenter bundle (default: the shipped one).")] = None,
) -> None:
    """Lung masks (0/255 PNG at each input's size) + segment.csv; exit 3 if any input could not be read."""
    import csv

    from cxr_triage.core.safe_text import csv_cell
    from cxr_triage.runtime.engine import BundleError
    from cxr_triage.runtime.segment import SEGMENT_COLUMNS, LungSegmenter, segment_paths

    files = _inputs(paths)
    try:
        seg = LungSegmenter(model)
    except BundleError as exc:
        _fail(str(exc))
    rows = list(_progress("segmenting")(segment_paths(seg, files, out), len(files)))
    with open(out / "segment.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SEGMENT_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)  # paths that look like formulas: quoted
    console.print(f"wrote {len(rows)} masks/rows to {out}")
    if any(r["error"] for r in rows):
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
        from cxr_triage.batch.archive import ArchiveError, score_archive
    except ImportError as exc:
        _fail(f"--engine ray needs Ray Data ({exc}); install it with: pip install 'cxr-triage[scale]'")
    if out is None or fmt == "json":
        _fail("--engine ray writes a file: give --out results.parquet (or --out results.csv / --format csv)")
    opts = {"address": address, "workers": workers, "model": model, "lang": lang, "batch_size": batch_size}
    try:
        s = score_archive(paths, out, fmt="csv" if fmt == "csv" else None, progress=_progress("scoring"), **opts)
    except (ArchiveError, ValueError) as exc:
        _fail(str(exc))
    dropped = f"; {s.dropped} older rows dropped (file changed or no longer given)" if s.dropped else ""
    done = f"{s.scored} scored now, {s.skipped} already there, {s.errors} errors{dropped}"
    console.print(escape(f"wrote {s.total} rows to {s.out} ({done})"))
    if s.errors:
        raise typer.Exit(3)


def _print_table(preds: list, lang: str) -> None:
    """The predictions as a readable table in ``lang`` (``formats.table_cells``), then the notice once."""
    from cxr_triage.runtime.advice import NOTICE
    from cxr_triage.runtime.formats import table_cells, table_headers

    out = Console()
    if not out.is_terminal:
        out = Console(width=160)
    table = Table(show_lines=True)
    for header, width in zip(table_headers(lang), (20, 16, 10, 10, 24, None), strict=True):
        table.add_column(header, overflow="fold", min_width=width)
    for p in preds:
        table.add_row(*(Text(cell) for cell in table_cells(p, lang)))  # names shown literally, never as markup
    out.print(table)
    out.print(NOTICE[lang])


@app.command()
def seal(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder (model.json, model.onnx, extras.npz).")],
    segmenter: Annotated[
        Path | None,
        typer.Option(help="Put this lung segmenter bundle (from export-seg) in, replacing the bundle's own."),
    ] = None,
) -> None:
    """Check a bundle's model.json and write SHA256SUMS, its seal (for bundles exported before the seal existed);
    with --segmenter, swap a whole-image classifier's lung segmenter first."""
    from cxr_triage.runtime.bundle import BundleError
    from cxr_triage.runtime.bundle import seal as seal_bundle
    from cxr_triage.runtime.predictor import Predictor

    try:
        if segmenter is not None:
            from cxr_triage.runtime.segment import replace_segmenter

            replace_segmenter(bundle, segmenter)
        seal_bundle(bundle)
        Predictor(bundle)  # the sealed bundle must load: arrays and graph included
    except BundleError as exc:
        _fail(str(exc))
    console.print(escape(f"sealed: {bundle / 'SHA256SUMS'}"))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    model: Annotated[Path | None, typer.Option("--model", help="Bundle folder (default: the shipped one).")] = None,
    store: Annotated[Path | None, typer.Option("--store", help="The DICOM node's --store: shows its worklist.")] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option("--allowed-host", help="Host name clients use to reach the service (repeat; default: loopback)."),
    ] = None,
    workers: Annotated[int, typer.Option(help="Uploads decoded and scored at once; more wait, then get 503.")] = 2,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted (413 beyond).")] = 20.0,
    token_file: Annotated[
        Path | None,
        typer.Option("--token-file", help="Token hashes (`cxr-triage token new`): /api/* then needs a Bearer token."),
    ] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Serve beyond loopback without tokens (anyone who can connect).")
    ] = False,
    ssl_certfile: Annotated[Path | None, typer.Option("--ssl-certfile", help="HTTPS: certificate chain (PEM).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option("--ssl-keyfile", help="HTTPS: private key (PEM).")] = None,
) -> None:
    """Web page and JSON API (FastAPI + uvicorn; the [serve] extra); limits and timeouts as in README "Reliability",
    tokens and HTTPS as in "Deploying in a hospital"."""
    from cxr_triage.runtime.engine import BundleError

    with _needs("serve", "serve"):
        from cxr_triage.serve.app import run
        from cxr_triage.serve.guard import ServiceLimits

    try:
        limits = ServiceLimits(max_upload_mb=max_upload_mb, workers=workers)
        if allowed_host:
            limits = dataclasses.replace(limits, allowed_hosts=tuple(allowed_host))
        access = {"token_file": token_file, "no_auth": no_auth}
        tls = {"ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile}
        run(host=host, port=port, bundle_dir=model, limits=limits, store=store, **access, **tls)
    except (BundleError, ValueError) as exc:
        _fail(str(exc))


token_app = typer.Typer(no_args_is_help=True, help="Access tokens for `serve --token-file`.")
app.add_typer(token_app, name="token")


@token_app.command("new")
def token_new(
    out: Annotated[Path, typer.Option("--out", help="Token file: the new token's sha256 is appended to it.")],
) -> None:
    """Make a new access token: printed once, alone on stdout; only its hash is kept (appended to --out)."""
    with _needs("serve", "token"):
        from cxr_triage.serve.auth import add_token

    try:
        token = add_token(out)
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(token)
    console.print(escape(f"its sha256 was appended to {out}; keep the token secret, it is not shown again"))


@app.command("dicom-node")
def dicom_node(
    send_to: Annotated[str, typer.Option("--send-to", help="Where results go (the PACS): AET@HOST:PORT.")],
    aet: Annotated[str, typer.Option("--aet", help="This node's AE title.")] = "CXR_TRIAGE",
    port: Annotated[int, typer.Option(help="DICOM port to listen on.")] = 11112,
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 to accept other machines.")] = "127.0.0.1",
    store: Annotated[Path | None, typer.Option("--store", help="Folder for the worklist (SQLite).")] = None,
    model: Annotated[Path | None, typer.Option("--model", help="Bundle folder (default: the shipped one).")] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option("--allow", help="A peer that may send: AET@HOST (HOST: address, network or name; AET * = any)."),
    ] = None,
    allow_file: Annotated[
        Path | None, typer.Option("--allow-file", help="File of peers that may send: one AET@HOST a line.")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="DICOM TLS: the node certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="DICOM TLS: its private key (PEM).")] = None,
    tls_ca: Annotated[
        Path | None, typer.Option("--tls-ca", help="DICOM TLS: require peer certificates signed by this CA (PEM).")
    ] = None,
    max_associations: Annotated[int, typer.Option(help="Associations at once.")] = 10,
    idle_timeout: Annotated[float, typer.Option(help="Seconds a peer may stay silent in an association.")] = 10.0,
    acse_timeout: Annotated[float, typer.Option(help="Seconds from connecting to the association request.")] = 5.0,
    max_instance_mb: Annotated[int, typer.Option(help="Largest instance taken (MB); larger ones are refused.")] = 96,
    send_timeout: Annotated[float, typer.Option(help="Seconds the PACS may take to answer when sent results.")] = 60.0,
    retry_delay: Annotated[float, typer.Option(help="Seconds before a result not taken is tried again.")] = 10.0,
    retry_max_delay: Annotated[float, typer.Option(help="Longest wait between retries (the delay doubles).")] = 600.0,
    give_up_hours: Annotated[float, typer.Option(help="Hours of retrying before a result is marked failed.")] = 72.0,
) -> None:
    """DICOM node: takes CR/DX/Secondary Capture chest X-rays (C-STORE, C-ECHO) and sends back a Structured
    Report and a heatmap picture into the same study. Research use only; not for diagnosis."""
    try:
        from cxr_triage.dicom.node import run
    except ImportError as exc:
        _fail(f"the DICOM node needs the [dicom] extra ({exc.name} is missing): pip install 'cxr-triage[dicom]'")
    from cxr_triage.dicom.access import Access, read_allow_file, tls_context
    from cxr_triage.dicom.outbox import RetryPolicy
    from cxr_triage.dicom.send import parse_peer
    from cxr_triage.dicom.server import NodeLimits
    from cxr_triage.runtime.engine import BundleError

    try:
        parse_peer(send_to)
        access = Access.from_entries(aet, [*(allow or []), *(read_allow_file(allow_file) if allow_file else [])])
        if allow_file is not None and access.is_open:
            raise ValueError(f"the allow-list {allow_file} names no peer; add AET@HOST lines")
        if (tls_cert is None) != (tls_key is None) or (tls_ca is not None and tls_cert is None):
            raise ValueError("DICOM TLS needs both --tls-cert and --tls-key (and --tls-ca only with them)")
        tls = tls_context(tls_cert, tls_key, tls_ca) if tls_cert is not None and tls_key is not None else None
        limits = NodeLimits(max_associations, acse_timeout, idle_timeout, max_instance_mb)
        retry = RetryPolicy(retry_delay, retry_max_delay, give_up_hours * 3600, send_timeout)
        run(aet, port, send_to, store, model, host, access=access, limits=limits, tls=tls, retry=retry)
    except (ValueError, BundleError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port")


if __name__ == "__main__":
    app()
