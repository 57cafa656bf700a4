"""A resumable result file for archive scoring: shards while a job runs, one Parquet (or CSV) file at the end.

While a job runs, every batch of finished rows lands in ``<out>.parts/`` as its own Parquet file (written to a
temporary name, then renamed, so a killed job never leaves half a shard). A rerun reads the paths already in
``<out>`` and in the shards and scores only the rest; ``finish`` merges everything into ``<out>`` (atomically), one
row per path, in input order, and removes the shards. Columns are exactly ``predict.CSV_COLUMNS``: probabilities
and confidence as float64 (null on error rows), everything else as strings.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxr_triage.runtime.formats import write_csv_rows
from cxr_triage.runtime.prediction import CSV_COLUMNS

log = logging.getLogger(__name__)
FORMATS = ("parquet", "csv")


def is_numeric(column: str) -> bool:
    """Contract columns stored as numbers: the confidence, one probability per class, OOD score, lung attention."""
    return column in ("confidence", "ood_score", "lung_attention") or column.startswith("p_")


def result_schema() -> pa.Schema:
    """The Arrow schema of a result file: the prediction CSV contract's columns, in order."""
    return pa.schema([(c, pa.float64() if is_numeric(c) else pa.string()) for c in CSV_COLUMNS])


def _cell(column: str, value: Any) -> float | str | None:
    if is_numeric(column):
        return None if value is None or value == "" else float(value)
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Prediction rows (dicts as ``predict`` yields them; extra keys ignored) -> a table with the result schema."""
    cols = {c: [_cell(c, r.get(c)) for r in rows] for c in CSV_COLUMNS}
    return pa.Table.from_pydict(cols, schema=result_schema())


def table_to_rows(table: pa.Table) -> list[dict[str, Any]]:
    """A result table -> rows as the CSV writer wants them (nulls as empty cells)."""
    return [{k: ("" if v is None else v) for k, v in r.items()} for r in table.to_pylist()]


def read_results(path: Path) -> pa.Table:
    """A result file (Parquet, or CSV as ``predict --format csv`` writes it) as a table with the result schema."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        return rows_to_table(df.to_dict("records"))
    return pq.read_table(path).select(CSV_COLUMNS).cast(result_schema())


def output_format(out: Path, fmt: str | None = None) -> str:
    """``fmt`` if given, else from the suffix (``.csv`` -> csv, anything else -> parquet)."""
    fmt = fmt or ("csv" if Path(out).suffix.lower() == ".csv" else "parquet")
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; use parquet or csv")
    return fmt


class ResultStore:
    """The output file of one archive job plus its shards; see the module docstring."""

    def __init__(self, out: Path, fmt: str | None = None) -> None:
        self.out = Path(out)
        self.fmt = output_format(self.out, fmt)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.run_id = uuid.uuid4().hex[:8]
        self._seq = 0

    def _shards(self) -> list[Path]:
        return sorted(self.parts.glob("*.parquet")) if self.parts.is_dir() else []

    def _tables(self) -> list[pa.Table]:
        """The finished output (if any), then every readable shard."""
        tables = []
        if self.out.exists():
            try:
                tables.append(read_results(self.out))
            except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
                msg = f"{self.out} exists but is not a result file ({exc}); move it or pick another --out"
                raise ValueError(msg) from None
        for shard in self._shards():
            try:
                tables.append(pq.read_table(shard).cast(result_schema()))
            except (OSError, pa.ArrowException) as exc:  # only a damaged disk gets here: rows are scored again
                log.warning("ignoring unreadable shard %s (%s)", shard, exc)
        return tables

    def done_paths(self) -> set[str]:
        """Paths that already have a row in the output or its shards."""
        return {p for t in self._tables() for p in t.column("path").to_pylist()}

    def append(self, table: pa.Table) -> Path:
        """Write finished rows as one more shard (atomically); returns its path."""
        self.parts.mkdir(parents=True, exist_ok=True)
        target = self.parts / f"{self.run_id}-{self._seq:06d}.parquet"
        self._seq += 1
        tmp = target.with_suffix(".tmp")
        pq.write_table(table.cast(result_schema()), tmp)
        os.replace(tmp, target)
        return target

    def finish(self, order: list[str]) -> tuple[pa.Table, int]:
        """Merge output and shards into ``out`` (one row per path, ``order`` first, then any older rows).

        Returns the merged table and how many duplicate rows were dropped.
        """
        tables = self._tables()
        merged = pa.concat_tables(tables) if tables else result_schema().empty_table()
        df = merged.to_pandas()
        n = len(df)
        df = df.drop_duplicates("path", keep="first")
        rank = {p: i for i, p in enumerate(order)}
        df = df.assign(_rank=[rank.get(p, len(rank)) for p in df["path"]]).sort_values("_rank", kind="stable")
        table = pa.Table.from_pandas(df.drop(columns="_rank"), schema=result_schema(), preserve_index=False)
        self._write(table)
        shutil.rmtree(self.parts, ignore_errors=True)
        return table, n - len(df)

    def _write(self, table: pa.Table) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.{self.run_id}.tmp")
        if self.fmt == "parquet":
            pq.write_table(table, tmp)
        else:
            buf = io.StringIO()
            write_csv_rows(table_to_rows(table), buf)
            tmp.write_text(buf.getvalue(), encoding="utf-8")
        os.replace(tmp, self.out)
