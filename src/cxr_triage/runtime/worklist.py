"""The reading worklist: every instance the DICOM node processed, most urgent first (stdlib sqlite3).

Urgency: COVID-19 > Lung Opacity / Viral Pneumonia > uncertain (and rejected or unreadable images, which a person
must look at too) > normal. Within one urgency level the oldest entry comes first. No patient name is stored; an
entry holds the accession number and study UID that find the study in the PACS, and the prediction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from cxr_triage.core.classes import CLASS_IDS

DB_NAME = "worklist.sqlite"
URGENCY_NAMES = {4: "urgent", 3: "high", 2: "review", 1: "routine"}
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS worklist (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    accession_number TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    confidence REAL,
    {", ".join(f"p_{c} REAL" for c in CLASS_IDS)},
    decision TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    urgency INTEGER NOT NULL,
    results_sent INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS worklist_order ON worklist (urgency DESC, received_at ASC);
"""
COLUMNS = (
    "sop_instance_uid",
    "study_instance_uid",
    "accession_number",
    "received_at",
    "label",
    "confidence",
    *(f"p_{c}" for c in CLASS_IDS),
    "decision",
    "error",
    "urgency",
    "results_sent",
)


def urgency(label: str, decision: str) -> int:
    """4 COVID-19, 3 Lung Opacity / Viral Pneumonia, 2 uncertain / rejected / error, 1 normal (accepted results)."""
    if decision != "accept":
        return 2
    return {"covid": 4, "lung_opacity": 3, "viral_pneumonia": 3, "normal": 1}.get(label, 2)


def _number(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


class Worklist:
    """A worklist in ``<store>/worklist.sqlite``; safe to share between threads (one connection, one lock)."""

    def __init__(self, store: str | Path) -> None:
        self.path = Path(store) / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def record(
        self,
        sop_instance_uid: str,
        study_instance_uid: str,
        row: dict[str, Any],
        accession_number: str = "",
        results_sent: bool = False,
    ) -> int:
        """Add (or, for a re-sent instance, replace) one processed instance; returns its urgency."""
        level = urgency(str(row.get("label") or ""), str(row["decision"]))
        values = (
            sop_instance_uid,
            study_instance_uid,
            accession_number,
            time.time(),
            str(row.get("label") or ""),
            _number(row.get("confidence")),
            *(_number(row.get(f"p_{c}")) for c in CLASS_IDS),
            str(row["decision"]),
            str(row.get("error") or ""),
            level,
            int(results_sent),
        )
        sql = f"INSERT OR REPLACE INTO worklist ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        with self._lock:
            self._db.execute(sql, values)
        return level

    def entries(self, limit: int = 200) -> list[dict[str, Any]]:
        """Entries, most urgent first, then oldest first; each with ``urgency_name``."""
        sql = f"SELECT {', '.join(COLUMNS)} FROM worklist ORDER BY urgency DESC, received_at ASC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (int(limit),)).fetchall()
        out = []
        for values in rows:
            entry = dict(zip(COLUMNS, values, strict=True))
            entry["results_sent"] = bool(entry["results_sent"])
            entry["urgency_name"] = URGENCY_NAMES[entry["urgency"]]
            out.append(entry)
        return out

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM worklist").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def read_worklist(store: str | Path, limit: int = 200) -> list[dict[str, Any]]:
    """Entries of the worklist under ``store``; empty when the node has not written one yet."""
    if not (Path(store) / DB_NAME).exists():
        return []
    wl = Worklist(store)
    try:
        return wl.entries(limit)
    finally:
        wl.close()
