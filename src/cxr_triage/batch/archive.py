"""Score a whole archive with Ray Data: resumable, one row per input, the same rows as ``cxr-triage predict``.

``score_archive(["scans/", "more/*.png", "list.csv"], "results.parquet", workers=2)`` (or ``cxr-triage predict
... --engine ray --out results.parquet``): Ray Data reads the files as bytes, a pool of ``Scorer`` actors (each
loads the bundle once) decodes and scores them with the ``Predictor``'s per-batch route into ``Prediction``s, which
become result rows only where they turn into an Arrow table (``shards.predictions_table``), and the driver streams
the rows into ``ResultStore`` shards, merged into one Parquet (or CSV) file at the end. Without ``address`` a local
Ray is started (and stopped); with one the job joins that cluster. Rerunning a job scores only the paths without a row
from the file as it is now (keyed by size and modification time); rows of paths no longer given are dropped, and an
existing ``out`` this tool did not write is refused, never overwritten.
Ray is imported here only; the plain CLI never imports this module unless ``--engine ray`` is asked for.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from cxr_triage.batch.shards import NotAResultFile, ResultStore, input_key, predictions_table
from cxr_triage.core.preprocess import ImageReadError, load_grey
from cxr_triage.runtime.bundle import Bundle
from cxr_triage.runtime.predict import collect_inputs
from cxr_triage.runtime.prediction import ModelInfo, Prediction
from cxr_triage.runtime.predictor import Item, Predictor

log = logging.getLogger(__name__)
MANIFEST_SUFFIXES = {".csv", ".parquet", ".pq"}
PATH_COLUMNS = ("abspath", "path", "file", "filename")
Progress = Callable[[Iterable[Any], int], Iterable[Any]]
# a local Ray: workers at the command's own niceness (Ray adds 15 by default), so `nice` on the command is the job's;
# no idle workers started ahead (the scoring actors start their own; on a busy machine they delay Ray's start)
LOCAL_CONFIG = {"worker_niceness": 0, "enable_worker_prestart": False}


class ArchiveError(ValueError):
    """An archive job cannot start (no inputs, unusable manifest, unreachable cluster); the message says why."""


@dataclass(frozen=True)
class ArchiveSummary:
    """What one ``score_archive`` call did."""

    out: Path
    total: int  # rows in the output file (one per input path)
    skipped: int  # inputs already in the output or its shards, unchanged since: not scored again
    scored: int  # rows written by this call
    errors: int  # error rows in the output
    duplicates: int  # duplicate rows dropped while merging (0 unless a row was delivered twice)
    start_s: float  # seconds to start or join Ray
    run_s: float  # seconds from then to the last row
    dropped: int = 0  # older rows dropped: their file changed, or it is no longer an input


def read_path_list(manifest: Path) -> list[str]:
    """Image paths from a CSV or Parquet manifest.

    Uses the first of the columns ``abspath``, ``path``, ``file``, ``filename``; relative paths are resolved against
    ``dataset_root`` of a ``manifest.json`` beside it (as ``cxr-triage ingest`` writes), else the manifest's folder.
    """
    manifest = Path(manifest)
    try:
        if manifest.suffix.lower() == ".csv":
            df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        else:
            df = pd.read_parquet(manifest)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ArchiveError(f"{manifest}: cannot read the manifest ({exc})") from None
    column = next((c for c in PATH_COLUMNS if c in df.columns), None)
    if column is None:
        raise ArchiveError(f"{manifest}: no column named {' / '.join(PATH_COLUMNS)}; name the image-path column 'path'")
    root = manifest.parent
    meta = manifest.with_name("manifest.json")
    if meta.exists():
        root = Path(json.loads(meta.read_text()).get("dataset_root", root))
    paths = [str(p) for p in df[column] if str(p)]
    return [p if Path(p).is_absolute() else str(root / p) for p in paths]


def archive_inputs(items: Iterable[str]) -> list[str]:
    """Files, folders and globs as ``predict`` collects them, plus the paths listed in CSV/Parquet manifests."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        out += read_path_list(p) if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES else collect_inputs([item])
    return list(dict.fromkeys(out))


def path_error(path: str) -> str | None:
    """None if ``path`` is a readable file, else the reason ``predict`` gives for it."""
    p = Path(path)
    if p.is_file() and os.access(p, os.R_OK):
        return None
    if p.exists() and not p.is_dir() and not p.is_file():
        return f"{path}: not a regular file"
    try:
        load_grey(path)
    except ImageReadError as exc:
        return str(exc)
    except OSError as exc:
        return f"{path}: cannot read ({type(exc).__name__}: {exc})"
    return f"{path}: could not be read during the run"


def score_blobs(predictor: Predictor, paths: list[str], blobs: list[bytes], lang: str = "en") -> list[Prediction]:
    """Predictions for files given as bytes, in order: the predictor's per-batch route, 'error' predictions for what
    cannot be read."""
    items = [predictor.read(b, p, Path(p).name) for p, b in zip(paths, blobs, strict=True)]
    try:
        return [s.prediction for s in predictor.score(items, lang)]
    except Exception:  # noqa: BLE001 - a batch the engine rejects is scored image by image
        log.exception("a batch of %d images failed; scoring them one by one", len(items))
        return [_score_one(predictor, item, lang) for item in items]


def _score_one(predictor: Predictor, item: Item, lang: str) -> Prediction:
    try:
        return predictor.score([item], lang)[0].prediction
    except Exception as exc:  # noqa: BLE001
        reason = f"{item.path}: cannot score ({type(exc).__name__}: {exc})"
        return Prediction.unreadable(item.path, reason, predictor.model, lang)


class Scorer:
    """The Ray Data actor: loads the bundle once per worker, then turns batches of {path, bytes} into tables of
    result rows (``shards.predictions_table``)."""

    def __init__(self, bundle_dir: str | None, lang: str = "en", threads: int = 1) -> None:
        self.predictor = Predictor(bundle_dir, threads=threads)
        self.lang = lang

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return predictions_table(score_blobs(self.predictor, list(batch["path"]), list(batch["bytes"]), self.lang))


@contextmanager
def ray_session(address: str | None, num_cpus: int) -> Iterator[None]:
    """Join the cluster at ``address``, or start a local Ray with ``num_cpus`` (stopped again at the end)."""
    import ray

    if ray.is_initialized():  # a Python caller already chose the cluster
        yield
        return
    _init(ray, address, num_cpus)
    try:
        yield
    finally:
        ray.shutdown()


def _init(ray: Any, address: str | None, num_cpus: int) -> None:
    """``ray.init``, quiet unless debug logging is on; a local start is tried twice (it times out on a busy machine)."""
    verbose = log.isEnabledFor(logging.DEBUG)
    quiet = {
        "include_dashboard": False,
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.ERROR,
    }
    for attempt in (1, 2):
        try:
            if address:  # the cluster runs this very package (shipped with the job), so its rows match this CLI's
                ray.init(address=address, runtime_env={"py_modules": [str(Path(__file__).parents[1])]}, **quiet)
            else:
                ray.init(address="local", num_cpus=num_cpus, _system_config=LOCAL_CONFIG, **quiet)
            return
        except Exception as exc:  # noqa: BLE001 - ray.init raises many kinds (a start timeout is a bare Exception)
            if address or attempt == 2:
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                hint = "is `ray start --head` running there?" if address else "is the machine overloaded?"
                raise ArchiveError(f"cannot start or join {where} ({exc}); {hint}") from exc
            log.warning("starting a local Ray failed (%s); trying once more", exc)
            ray.shutdown()


def _stream(paths: list[str], bundle: str | None, workers: int, lang: str, batch_size: int) -> Iterator[pa.Table]:
    """Score readable files on Ray Data; yields finished tables as they arrive (in no particular order)."""
    import ray.data as rd

    rd.DataContext.get_current().enable_progress_bars = False  # the caller's progress hook shows rows instead
    given = {os.path.abspath(p): p for p in paths}  # workers on other machines need absolute paths
    ds = rd.read_binary_files(
        list(given),
        include_paths=True,
        ignore_missing_paths=True,  # a file deleted meanwhile becomes an error row below, not a failed job
        num_cpus=0,  # reading bytes is light; the CPUs go to the scoring actors
        concurrency=max(1, workers // 2),
        override_num_blocks=max(workers, -(-len(paths) // (4 * batch_size))),
    )
    ds = ds.map_batches(
        Scorer,
        fn_constructor_kwargs={"bundle_dir": bundle, "lang": lang, "threads": 1},
        batch_size=batch_size,
        batch_format="numpy",
        compute=rd.ActorPoolStrategy(size=workers),  # one model per worker, loaded once
        num_cpus=1,
    )
    with _quiet_ray_data():
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            names = [given.get(p, p) for p in table.column("path").to_pylist()]  # back to the paths as given
            yield table.set_column(0, "path", pa.array(names, pa.string()))


@contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data's own console handler at ERROR while a job runs (its log file stays complete; -v keeps it all).

    Only Ray's handler is touched: under pytest, for one, the ``ray.data`` logger also holds handlers of others."""
    ours = [h for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "PlainRayHandler"]
    levels = [h.level for h in ours]
    if not log.isEnabledFor(logging.DEBUG):
        for handler in ours:
            handler.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for handler, level in zip(ours, levels, strict=True):
            handler.setLevel(level)


def score_archive(
    inputs: Iterable[str],
    out: str | Path,
    *,
    address: str | None = None,
    workers: int = 2,
    model: str | Path | None = None,
    fmt: str | None = None,
    lang: str = "en",
    batch_size: int = 32,
    shard_rows: int = 512,
    progress: Progress | None = None,
) -> ArchiveSummary:
    """Score every input not yet in ``out`` on Ray Data, then merge ``out``; see the module docstring.

    ``fmt`` is parquet or csv (default: from the suffix of ``out``); ``progress`` wraps an iterable of one item per
    finished row, like the other stages' progress hooks.
    """
    if workers < 1:
        raise ArchiveError(f"workers must be at least 1, not {workers}")
    bundle = str(model) if model else None
    model_info = ModelInfo(**Bundle.load(bundle).info)  # a broken bundle fails before Ray
    paths = archive_inputs(inputs)
    if not paths:
        raise ArchiveError("no image files found in the given paths")
    store = ResultStore(Path(out), fmt, keys={p: input_key(p) for p in paths})  # before anything is read
    try:
        done = store.done_paths()
    except NotAResultFile as exc:
        raise ArchiveError(str(exc)) from None
    todo = [p for p in paths if p not in done]
    reasons = {p: path_error(p) for p in todo}
    readable = [p for p in todo if reasons[p] is None]
    if len(readable) < len(todo):
        unreadable = [Prediction.unreadable(p, r, model_info, lang) for p, r in reasons.items() if r is not None]
        store.append(predictions_table(unreadable))
    t0 = time.perf_counter()
    start_s = 0.0
    seen: set[str] = set()
    if readable:
        with ray_session(address, max(os.cpu_count() or 1, workers)):
            start_s = time.perf_counter() - t0
            ticks = _write_shards(_stream(readable, bundle, workers, lang, batch_size), store, seen, shard_rows)
            try:
                for _ in progress(ticks, len(readable)) if progress else ticks:
                    pass
            finally:  # interrupted (Ctrl-C, an exception in the hook): keep the rows already received
                ticks.close()
    lost = [p for p in readable if p not in seen]
    if lost:
        why = ((p, path_error(p) or f"{p}: could not be read") for p in lost)
        store.append(predictions_table(Prediction.unreadable(p, r, model_info, lang) for p, r in why))
    table, dups, dropped = store.finish(paths)
    errors = sum(1 for d in table.column("decision").to_pylist() if d == "error")
    run_s = time.perf_counter() - t0 - start_s
    skipped = len(paths) - len(todo)
    return ArchiveSummary(Path(out), table.num_rows, skipped, len(todo), errors, dups, start_s, run_s, dropped)


def _write_shards(
    tables: Iterable[pa.Table], store: ResultStore, seen: set[str], shard_rows: int
) -> Generator[int, None, None]:
    """Buffer streamed tables into shards of about ``shard_rows`` rows; yields once per row received."""
    buffer: list[pa.Table] = []
    try:
        for table in tables:
            buffer.append(table)
            seen.update(table.column("path").to_pylist())
            if sum(t.num_rows for t in buffer) >= shard_rows:
                store.append(pa.concat_tables(buffer))
                buffer = []
            yield from range(table.num_rows)
    finally:
        if buffer:  # an interrupted job keeps what it has finished
            store.append(pa.concat_tables(buffer))
        if isinstance(tables, Generator):
            tables.close()  # stops the Ray Data execution early when interrupted
