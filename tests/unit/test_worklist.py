"""The worklist: urgency order, one entry per instance, persistence, no patient names; GET /api/v1/worklist."""

from __future__ import annotations

import sqlite3
import time

import pytest

from cxr_triage.runtime.prediction import Prediction
from cxr_triage.runtime.worklist import DB_NAME, Worklist, read_worklist, urgency
from tests.predictions import MODEL, prediction


@pytest.mark.parametrize(
    ("label", "decision", "level"),
    [
        ("covid", "accept", 4),
        ("lung_opacity", "accept", 3),
        ("viral_pneumonia", "accept", 3),
        ("covid", "uncertain", 2),
        ("normal", "uncertain", 2),
        ("normal", "rejected", 2),
        ("", "error", 2),
        ("normal", "accept", 1),
    ],
)
def test_urgency_levels(label, decision, level):
    assert urgency(label, decision) == level


def test_entries_most_urgent_first_then_oldest(tmp_path):
    wl = Worklist(tmp_path)
    order = [
        ("1.1", prediction("normal")),
        ("1.2", prediction("viral_pneumonia")),
        ("1.3", prediction("covid", "uncertain", 0.5)),
        ("1.4", prediction("covid")),
        ("1.5", Prediction.unreadable("x.dcm", "unreadable", MODEL)),
        ("1.6", prediction("lung_opacity")),
        ("1.7", prediction("covid")),
    ]
    for uid, pred in order:
        wl.record(uid, "9.9", pred, accession_number=f"A{uid}")
        time.sleep(0.002)
    got = wl.entries()
    assert [e["sop_instance_uid"] for e in got] == ["1.4", "1.7", "1.2", "1.6", "1.3", "1.5", "1.1"]
    assert [e["urgency_name"] for e in got] == ["urgent", "urgent", "high", "high", "review", "review", "routine"]
    err = got[5]
    assert err["decision"] == "error" and err["error"] == "unreadable" and err["confidence"] is None
    assert got[0]["p_covid"] == pytest.approx(0.9) and got[0]["accession_number"] == "A1.4"
    assert wl.entries(limit=2) == got[:2]


def test_resent_instance_replaces_its_entry_and_persists(tmp_path):
    wl = Worklist(tmp_path)
    wl.record("1.1", "9.9", prediction("normal"), results=[("SR", b"old")])
    wl.record("1.1", "9.9", prediction("covid"), results=[("SR", b"new"), ("SC", b"new")])
    assert len(wl) == 1
    wl.close()
    (entry,) = read_worklist(tmp_path)
    assert entry["label"] == "covid" and entry["urgency"] == 4 and entry["results_sent"] is False
    assert entry["results_status"] == "queued" and [r["kind"] for r in entry["results"]] == ["SR", "SC"]


def test_no_patient_name_is_stored(tmp_path):
    Worklist(tmp_path).record("1.1", "9.9", prediction("covid"), accession_number="A1")
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        columns = [r[1] for r in db.execute("PRAGMA table_info(worklist)")]
    assert not [c for c in columns if "patient" in c or "name" in c]


def test_missing_store_reads_as_empty(tmp_path):
    assert read_worklist(tmp_path / "nowhere") == []
    assert not (tmp_path / "nowhere").exists()


def test_worklist_route(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cxr_triage.serve.app import create_app

    wl = Worklist(tmp_path)
    wl.record("1.1", "9.9", prediction("normal"), accession_number="A-normal", results=[("SR", b"queued")])
    wl.record("1.2", "9.9", prediction("covid"), accession_number="A-covid")
    with TestClient(create_app(store=tmp_path), base_url="http://127.0.0.1") as client:  # a trusted Host
        r = client.get("/api/v1/worklist")
        assert r.status_code == 200
        body = r.json()
        assert [e["accession_number"] for e in body] == ["A-covid", "A-normal"]
        assert body[0]["urgency_name"] == "urgent" and body[0]["results_sent"] is True
        assert body[0]["results_status"] == "sent" and body[1]["results_status"] == "queued"
        assert body[1]["retry_at"] is not None and body[1]["results"][0]["kind"] == "SR"
        assert not [k for k in body[0] if "patient" in k or "name" in k.replace("urgency_name", "")]
        assert client.get("/api/v1/worklist", params={"limit": 1}).json() == body[:1]
        assert client.get("/api/v1/worklist", params={"limit": 0}).status_code == 422
        page = client.get("/").text
        assert 'id="worklist"' in page and "/static/worklist.js" in page
        assert client.get("/static/worklist.js").status_code == 200
    with TestClient(create_app(), base_url="http://127.0.0.1") as client:
        assert client.get("/api/v1/worklist").json() == []
