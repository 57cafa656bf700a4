"""The reading worklist: every instance the DICOM node processed, most urgent first, and the outbox of its results
for the PACS (stdlib sqlite3, one database file, so an entry and its queued results are written in one transaction).

Urgency: COVID-19 > Lung Opacity / Viral Pneumonia > uncertain (and rejected or unreadable images, which a person
must look at too) > normal. Within one urgency level the oldest entry comes first. No patient name is stored in the
worklist; an entry holds the accession number and study UID that find the study in the PACS, and the prediction
(``record`` takes the ``Prediction``; its label, confidence, probabilities, decision and error are stored).
The outbox holds each result (SR, SC) as a Part-10 file until the PACS has it; a sent result's bytes are dropped.
An entry is keyed by its instance (study, series and SOP Instance UID and the image's content): an image sent again
replaces its entry, another image under a SOP Instance UID already seen gets an entry of its own.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.runtime.prediction import Prediction

DB_NAME = "worklist.sqlite"
URGENCY_NAMES = {4: "urgent", 3: "high", 2: "review", 1: "routine"}
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
_ENTRIES = f"""
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    instance_key TEXT NOT NULL UNIQUE,
    sop_instance_uid TEXT NOT NULL,
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
CREATE INDEX IF NOT EXISTS entries_order ON entries (urgency DESC, received_at ASC);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    entry_id INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    data BLOB,
    state TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    queued_at REAL NOT NULL,
    next_try REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_try);
CREATE INDEX IF NOT EXISTS outbox_entry ON outbox (entry_id);
"""
_V1 = f"""
INSERT OR IGNORE INTO entries (instance_key, {", ".join(COLUMNS)})
SELECT study_instance_uid || '|' || sop_instance_uid, {", ".join(COLUMNS)} FROM worklist;
DROP TABLE worklist;
"""


def urgency(label: str, decision: str) -> int:
    """4 COVID-19, 3 Lung Opacity / Viral Pneumonia, 2 uncertain / rejected / error, 1 normal (accepted results)."""
    if decision != "accept":
        return 2
    return {"covid": 4, "lung_opacity": 3, "viral_pneumonia": 3, "normal": 1}.get(label, 2)


@dataclass(frozen=True)
class Item:
    """One queued result: its row id, kind (SR or SC), Part-10 bytes, tries so far and when it was queued."""

    id: int
    kind: str
    data: bytes
    attempts: int
    queued_at: float


class Worklist:
    """A worklist and outbox in ``<store>/worklist.sqlite`` (``store`` None: in memory, gone with the process);
    safe to share between threads (one connection, one lock)."""

    def __init__(self, store: str | Path | None) -> None:
        self.path = Path(store) / DB_NAME if store is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path or ":memory:", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a queued result survives a power cut once C-STORE is answered
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._db:
            self._db.executescript(f"BEGIN; {_ENTRIES} COMMIT;")
            if self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'worklist'").fetchone():
                self._db.executescript(f"BEGIN; {_V1} COMMIT;")  # a worklist from before the outbox

    def record(
        self,
        sop_instance_uid: str,
        study_instance_uid: str,
        pred: Prediction,
        accession_number: str = "",
        results: Sequence[tuple[str, bytes]] = (),
        key: str = "",
    ) -> int:
        """Add one processed instance (its prediction) with its results queued for the PACS, in one transaction; an
        instance with the same ``key`` (default: study and SOP Instance UID) is replaced, its unsent results with it.
        Its urgency."""
        label = pred.label or ""
        level, now = urgency(label, pred.decision), time.time()
        values = (
            sop_instance_uid,
            study_instance_uid,
            accession_number,
            now,
            label,
            pred.confidence,
            *(getattr(pred, f"p_{c}") for c in CLASS_IDS),
            pred.decision,
            pred.error or "",
            level,
            int(not results),
        )
        updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS)
        sql = (
            f"INSERT INTO entries (instance_key, {', '.join(COLUMNS)}) VALUES (?, {', '.join('?' * len(COLUMNS))}) "
            f"ON CONFLICT (instance_key) DO UPDATE SET {updates} RETURNING id"
        )
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            (entry_id,) = self._db.execute(sql, (key or f"{study_instance_uid}|{sop_instance_uid}", *values)).fetchone()
            self._db.execute("DELETE FROM outbox WHERE entry_id = ?", (entry_id,))
            self._db.executemany(
                "INSERT INTO outbox (entry_id, kind, data, queued_at, next_try) VALUES (?, ?, ?, ?, ?)",
                [(entry_id, kind, data, now, now) for kind, data in results],
            )
        return level

    def due(self, now: float, limit: int = 16) -> list[Item]:
        """Queued results whose next try is due, oldest first (an instance's SR and SC together)."""
        sql = (
            "SELECT id, kind, data, attempts, queued_at FROM outbox WHERE state = 'queued' AND next_try <= ? "
            "ORDER BY next_try, id LIMIT ?"
        )
        with self._lock:
            return [Item(*r) for r in self._db.execute(sql, (now, int(limit))).fetchall()]

    def next_try(self) -> float | None:
        """When the next queued result is due (None: nothing queued)."""
        with self._lock:
            return self._db.execute("SELECT MIN(next_try) FROM outbox WHERE state = 'queued'").fetchone()[0]

    def retry_all_now(self) -> None:
        """Make every queued result due now (the node has just started)."""
        with self._lock:
            self._db.execute("UPDATE outbox SET next_try = ? WHERE state = 'queued'", (time.time(),))

    def settle(self, item_id: int, state: str, reason: str = "", next_try: float = 0.0) -> None:
        """After a try: ``sent`` (bytes dropped), ``queued`` again for ``next_try``, or ``failed`` for good."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "UPDATE outbox SET state = ?, reason = ?, next_try = ?, attempts = attempts + 1, "
                "data = CASE WHEN ? = 'sent' THEN NULL ELSE data END WHERE id = ?",
                (state, reason, next_try, state, item_id),
            )
            self._db.execute(
                "UPDATE entries SET results_sent = NOT EXISTS (SELECT 1 FROM outbox WHERE entry_id = entries.id "
                "AND state != 'sent') WHERE id = (SELECT entry_id FROM outbox WHERE id = ?)",
                (item_id,),
            )

    def entries(self, limit: int = 200) -> list[dict[str, Any]]:
        """Entries, most urgent first, then oldest first; each with ``urgency_name`` and its results' status."""
        sql = f"SELECT id, {', '.join(COLUMNS)} FROM entries ORDER BY urgency DESC, received_at ASC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (int(limit),)).fetchall()
            ids = [r[0] for r in rows]
            items = self._db.execute(
                f"SELECT entry_id, kind, state, attempts, next_try, reason FROM outbox "
                f"WHERE entry_id IN ({', '.join('?' * len(ids))}) ORDER BY id",
                ids,
            ).fetchall()
        by_entry: dict[int, list[dict[str, Any]]] = {}
        for entry_id, kind, state, attempts, next_try, reason in items:
            by_entry.setdefault(entry_id, []).append(
                {
                    "kind": kind,
                    "status": state,
                    "attempts": attempts,
                    "retry_at": next_try if state == "queued" else None,
                    "reason": reason,
                }
            )
        return [self._entry(values, by_entry.get(values[0], [])) for values in rows]

    @staticmethod
    def _entry(values: tuple[Any, ...], results: list[dict[str, Any]]) -> dict[str, Any]:
        entry = dict(zip(COLUMNS, values[1:], strict=True))
        entry["results_sent"] = bool(entry["results_sent"]) and all(r["status"] == "sent" for r in results)
        entry["urgency_name"] = URGENCY_NAMES[entry["urgency"]]
        states = {r["status"] for r in results}
        status = "failed" if "failed" in states else "queued" if "queued" in states else "sent"
        if not results and not entry["results_sent"]:  # recorded before the outbox, not sent then
            status = "failed"
            results = [{"kind": "", "status": "failed", "attempts": 1, "retry_at": None, "reason": "not sent"}]
        entry["results"] = results
        entry["results_status"] = status
        due = [r["retry_at"] for r in results if r["retry_at"] is not None]
        entry["retry_at"] = min(due) if due else None
        entry["results_reason"] = next((r["reason"] for r in results if r["status"] == status and r["reason"]), "")
        return entry

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

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
