"""Renderings of ``Prediction``s: CSV, JSON and the cells of the human table, in English or Korean.

Each is derived from the ``Prediction`` (its JSON form, its ``csv_row`` or its fields), so the formats carry
the same facts and cannot drift apart.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from cxr_triage.core.safe_text import csv_cell
from cxr_triage.runtime import i18n
from cxr_triage.runtime.advice import NOTICE
from cxr_triage.runtime.prediction import CSV_COLUMNS, Prediction

FORMATS = ("table", "csv", "json")
TABLE_COLUMNS = ("image", "result", "confidence", "decision", "why", "advice")


def write_csv_rows(rows: Iterable[dict[str, Any]], out: TextIO) -> None:
    """CSV of rows keyed by ``CSV_COLUMNS`` (``Prediction.csv_row``): a header, then one line per row. Text that
    starts like a formula gets a leading ' (``safe_text.csv_cell``); the csv module writes None as an empty cell and
    other values as ``str`` does."""
    cells = [[csv_cell(r.get(c)) for c in CSV_COLUMNS] for r in rows]
    # csv quotes a field holding a character of the line terminator; a bare CR elsewhere would split the row
    cr = any(isinstance(v, str) and "\r" in v for row in cells for v in row)
    writer = csv.writer(out, lineterminator="\r\n" if cr else "\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(cells)


def write_csv(preds: Iterable[Prediction], out: TextIO) -> None:
    """The prediction CSV: a header of ``CSV_COLUMNS``, then one row per prediction."""
    write_csv_rows((p.csv_row() for p in preds), out)


def write_json(preds: Iterable[Prediction], out: TextIO) -> None:
    """A JSON array of predictions, each exactly as the HTTP API returns it."""
    json.dump([p.model_dump(mode="json") for p in preds], out, ensure_ascii=False, indent=2)
    out.write("\n")


def write_rows(preds: Iterable[Prediction], fmt: str, out: TextIO) -> None:
    """CSV or JSON of predictions to a text stream."""
    if fmt == "csv":
        write_csv(preds, out)
    elif fmt == "json":
        write_json(preds, out)
    else:
        raise ValueError(f"unknown format {fmt!r}; use table, csv or json")


def table_headers(lang: str = "en") -> list[str]:
    """The human table's column headers in ``lang``."""
    return [i18n.TABLE_HEADERS[i18n.check_lang(lang)][c] for c in TABLE_COLUMNS]


def table_cells(pred: Prediction, lang: str = "en") -> list[str]:
    """One prediction as the human table shows it: names, decision and reasons in ``lang``; the advice without the
    not-a-diagnosis notice (printed once under the table). Uncertain answers show their two most likely classes."""
    p = pred.in_lang(lang) if pred.lang != lang else pred
    result = confidence = ""
    if p.decision == "accept" and p.label:
        result, confidence = i18n.class_name(p.label, lang), f"{p.confidence:.1%}"
    elif p.decision == "uncertain":
        (a, pa), (b, pb) = p.top(2)
        result = i18n.EITHER[lang].format(a=i18n.class_name(a, lang), b=i18n.class_name(b, lang))
        confidence = f"{pa:.1%} / {pb:.1%}"
    why = "; ".join(r.text for r in p.reasons)
    step = p.advice.removesuffix(NOTICE[lang]).strip()
    return [Path(p.path).name, result, confidence, i18n.decision_name(p.decision, lang), why, step]
