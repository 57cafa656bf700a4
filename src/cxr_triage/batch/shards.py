"""A resumable result file for archive scoring: shards while a job runs, one Parquet (or CSV) file at the end.

While a job runs, every batch of finished rows lands in ``<out>.parts/`` as its own Parquet file (written to a
temporary name, then renamed, so a killed job never leaves half a shard), each row with its input's key: the file's
size and modification time when the job started. A rerun keeps the rows in ``<out>`` and in the shards whose key
still matches and scores the rest (a changed file is scored again); ``finish`` merges them into ``<out>``
(atomically), one row per input path, in input order, drops rows of paths that are no longer inputs, and removes the
shards. ``<out>.cxr-triage.json`` beside it marks the file as this tool's and holds the keys (and the file's sha256):
an existing ``<out>`` without it, or with other columns, is refused, never overwritten. Columns are exactly
``predict.CSV_COLUMNS``: probabilities and confidence as float64 (null on error rows), everything else as strings.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxr_triage.runtime.formats import write_csv_rows
from cxr_triage.runtime.prediction import CSV_COLUMNS, Prediction

log = logging.getLogger(__name__)
FORMATS = ("parquet", "csv")
MARKER = "cxr-triage archive results"
KEY = "input_key"  # the shards' extra column: the input's key when its row was scored


class NotAResultFile(ValueError):
    """``--out`` names an existing file this tool did not write (or cannot read): it is never overwritten."""


class Merged(NamedTuple):
    """What ``ResultStore.finish`` wrote."""

    table: pa.Table
    duplicates: int  # rows delivered twice (e.g. after a retry)
    dropped: int  # rows of inputs that changed or are no longer inputs


def input_key(path: str) -> str:
    """What a resume compares: the file's size and modification time (ns); "" when it cannot be looked at."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}"


def marker_path(out: Path) -> Path:
    """The file beside a result file that says this tool wrote it."""
    return out.with_name(out.name + ".cxr-triage.json")


def is_numeric(column: str) -> bool:
    """Contract columns stored as numbers: the confidence, one probability per class, OOD score, lung attention."""
    return column in ("confidence", "ood_score", "lung_attention") or column.startswith("p_")


def result_schema() -> pa.Schema:
    """The Arrow schema of a result file: the prediction CSV contract's columns, in order."""
    return pa.schema([(c, pa.float64() if is_numeric(c) else pa.string()) for c in CSV_COLUMNS])


def shard_schema() -> pa.Schema:
    """A shard's schema: the result schema plus each row's input key."""
    return result_schema().append(pa.field(KEY, pa.string()))


def _cell(column: str, value: Any) -> float | str | None:
    if is_numeric(column):
        return None if value is None or value == "" else float(value)
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows keyed by ``CSV_COLUMNS`` (``Prediction.csv_row``, or a result CSV's records; extra keys ignored) -> a
    table with the result schema."""
    cols = {c: [_cell(c, r.get(c)) for r in rows] for c in CSV_COLUMNS}
    return pa.Table.from_pydict(cols, schema=result_schema())


def predictions_table(preds: Iterable[Prediction]) -> pa.Table:
    """Predictions -> a table with the result schema: each flattened once, by ``Prediction.csv_row`` (the CSV row of
    ``cxr-triage predict``)."""
    return rows_to_table([p.csv_row() for p in preds])


def table_to_rows(table: pa.Table) -> list[dict[str, Any]]:
    """A result table -> rows as the CSV writer wants them (nulls as empty cells)."""
    return [{k: ("" if v is None else v) for k, v in r.items()} for r in table.to_pylist()]


def read_results(path: Path, fmt: str | None = None) -> pa.Table:
    """A result file (Parquet, or CSV as ``predict --format csv`` writes it) as a table with the result schema."""
    return parse_results(Path(path).read_bytes(), output_format(Path(path), fmt))


def parse_results(data: bytes, fmt: str) -> pa.Table:
    """The bytes of a result file in ``fmt`` (parquet or csv) as a table with the result schema."""
    if fmt == "csv":
        df = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding="utf-8")
        return rows_to_table(df.to_dict("records"))
    return pq.read_table(pa.BufferReader(data)).select(CSV_COLUMNS).cast(result_schema())


def result_columns(data: bytes, fmt: str) -> list[str]:
    """The column names of a result file's bytes: a CSV's header row, or a Parquet file's schema."""
    if fmt == "csv":
        return next(csv.reader([data.split(b"\n", 1)[0].decode("utf-8").rstrip("\r")]), [])
    return pq.read_schema(pa.BufferReader(data)).names


def output_format(out: Path, fmt: str | None = None) -> str:
    """``fmt`` if given, else from the suffix (``.csv`` -> csv, anything else -> parquet)."""
    fmt = fmt or ("csv" if Path(out).suffix.lower() == ".csv" else "parquet")
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; use parquet or csv")
    return fmt


class ResultStore:
    """The output file of one archive job plus its shards; see the module docstring. ``keys`` are the inputs' keys
    (``input_key``) taken when the job starts; a path not in it is looked at when first needed."""

    def __init__(self, out: Path, fmt: str | None = None, keys: dict[str, str] | None = None) -> None:
        self.out = Path(out)
        self.fmt = output_format(self.out, fmt)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.marker = marker_path(self.out)
        self.keys = dict(keys or {})
        self.run_id = uuid.uuid4().hex[:8]
        self._seq = 0

    def key(self, path: str) -> str:
        if path not in self.keys:
            self.keys[path] = input_key(path)
        return self.keys[path]

    def _shards(self) -> list[Path]:
        return sorted(self.parts.glob("*.parquet")) if self.parts.is_dir() else []

    def _refuse(self, why: str) -> NotAResultFile:
        return NotAResultFile(
            f"{self.out} exists but is not a result file of cxr-triage ({why}); it is left as it is: "
            "move it or pick another --out"
        )

    def _finished(self) -> pa.Table | None:
        """The finished output with each row's recorded key (null where unknown), None if there is none yet."""
        if not self.out.exists():
            return None
        try:
            meta = json.loads(self.marker.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise self._refuse(f"no {self.marker.name} beside it") from None
        except (OSError, ValueError) as exc:
            raise self._refuse(f"{self.marker.name} cannot be read: {exc}") from None
        if not isinstance(meta, dict) or meta.get("marker") != MARKER or not isinstance(meta.get("keys"), dict):
            raise self._refuse(f"{self.marker.name} is not its marker")
        try:
            data = self.out.read_bytes()
            if result_columns(data, self.fmt) != CSV_COLUMNS:
                raise self._refuse("its columns are not those of `cxr-triage predict --format csv`")
            table = parse_results(data, self.fmt)
        except NotAResultFile:
            raise
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            raise self._refuse(str(exc)) from None
        recorded: dict[str, str] = meta["keys"]
        if meta.get("sha256") != hashlib.sha256(data).hexdigest():
            log.warning("%s was changed since cxr-triage wrote it: every input is scored again", self.out)
            recorded = {}
        keys = [recorded.get(p) for p in table.column("path").to_pylist()]
        return table.append_column(KEY, pa.array(keys, pa.string()))

    def _tables(self) -> list[pa.Table]:
        """The finished output (if any), then every readable shard, each row with its input key."""
        finished = self._finished()
        tables = [] if finished is None else [finished]
        for shard in self._shards():
            try:
                table = pq.read_table(shard)
                if KEY not in table.column_names:  # a shard of an older version: its rows are scored again
                    table = table.append_column(KEY, pa.nulls(table.num_rows, pa.string()))
                tables.append(table.select(shard_schema().names).cast(shard_schema()))
            except (OSError, KeyError, pa.ArrowException) as exc:  # only a damaged disk gets here: scored again
                log.warning("ignoring unreadable shard %s (%s)", shard, exc)
        return tables

    def done_paths(self) -> set[str]:
        """Paths that have a row in the output or its shards scored from the file as it is now."""
        return {
            p
            for t in self._tables()
            for p, k in zip(t.column("path").to_pylist(), t.column(KEY).to_pylist(), strict=True)
            if k is not None and k == self.key(p)
        }

    def append(self, table: pa.Table) -> Path:
        """Write finished rows, each with its input's key, as one more shard (atomically); returns its path."""
        self.parts.mkdir(parents=True, exist_ok=True)
        target = self.parts / f"{self.run_id}-{self._seq:06d}.parquet"
        self._seq += 1
        tmp = target.with_suffix(".tmp")
        keys = pa.array([self.key(p) for p in table.column("path").to_pylist()], pa.string())
        pq.write_table(table.select(CSV_COLUMNS).cast(result_schema()).append_column(KEY, keys), tmp)
        os.replace(tmp, target)
        return target

    def finish(self, order: list[str]) -> Merged:
        """Merge output and shards into ``out``: one current row per path of ``order``, in that order."""
        tables = self._tables()
        df = (pa.concat_tables(tables) if tables else shard_schema().empty_table()).to_pandas()
        wanted = set(order)
        current = [p in wanted and k is not None and k == self.key(p) for p, k in zip(df["path"], df[KEY], strict=True)]
        dropped = len(df) - sum(current)
        df = df.loc[pd.Series(current, index=df.index, dtype=bool)]
        n = len(df)
        df = df.drop_duplicates("path", keep="first")
        rank = {p: i for i, p in enumerate(order)}
        df = df.assign(_rank=[rank[p] for p in df["path"]]).sort_values("_rank", kind="stable")
        keys = dict(zip(df["path"], df[KEY], strict=True))
        table = pa.Table.from_pandas(df.drop(columns=["_rank", KEY]), schema=result_schema(), preserve_index=False)
        self._write(table, keys)
        self._clear_parts()
        return Merged(table, n - len(df), dropped)

    def _write(self, table: pa.Table, keys: dict[str, str]) -> None:
        """The marker, then ``out`` (each atomically). Killed between the two, the marker's sha256 does not match the
        old ``out`` (or there is none yet): the next run scores everything again, and never refuses its own file."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.{self.run_id}.tmp")
        if self.fmt == "parquet":
            pq.write_table(table, tmp)
        else:
            buf = io.StringIO()
            write_csv_rows(table_to_rows(table), buf)
            tmp.write_text(buf.getvalue(), encoding="utf-8")
        meta = {"marker": MARKER, "format": self.fmt, "sha256": hashlib.sha256(tmp.read_bytes()).hexdigest()}
        marker_tmp = self.marker.with_name(f".{self.marker.name}.{self.run_id}.tmp")
        marker_tmp.write_text(json.dumps({**meta, "keys": keys}), encoding="utf-8")
        os.replace(marker_tmp, self.marker)
        os.replace(tmp, self.out)

    def _clear_parts(self) -> None:
        """Remove the shards (and a killed writer's leftovers); the folder too once empty, nothing else in it."""
        for leftover in [*self._shards(), *(self.parts.glob("*.tmp") if self.parts.is_dir() else [])]:
            leftover.unlink(missing_ok=True)
        try:
            self.parts.rmdir()
        except OSError:
            pass
