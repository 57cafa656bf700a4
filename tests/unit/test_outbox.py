"""The outbox: results queued with their worklist entry, retried with back-off (also after a restart), permanent
failures told apart from transient ones, with a scripted sender in process. The Storage SCU's verdicts against a
stand-in PACS on the network are in tests/integration/test_outbox_pacs.py."""

from __future__ import annotations

import sqlite3
import time

import pytest
from pydicom.dataset import Dataset

pynetdicom = pytest.importorskip("pynetdicom", reason="the [dicom] extra is not installed")

from cxr_triage.dicom.outbox import Outbox, RetryPolicy  # noqa: E402
from cxr_triage.dicom.send import Delivery  # noqa: E402
from cxr_triage.runtime.worklist import DB_NAME, Worklist, read_worklist  # noqa: E402
from tests.dicom_samples import sr_bytes  # noqa: E402
from tests.predictions import prediction  # noqa: E402

FAST = RetryPolicy(first_delay=0.2, max_delay=0.8, give_up_after=60, timeout=5)


class Scripted:
    """A sender that answers from a script of Deliveries (the last one repeats) and counts what it was sent."""

    def __init__(self, *answers: Delivery) -> None:
        self.answers, self.sent = list(answers), 0

    def send(self, datasets: list[Dataset]) -> list[Delivery]:
        self.sent += len(datasets)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return [answer] * len(datasets)


class Clock:
    """Seconds since the epoch that move only when the test says (no sleeping, no dependence on the runner)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def queued(wl: Worklist, uid: str = "1.1", key: str = "") -> None:
    wl.record(uid, "9.9", prediction("covid"), "A1", [("SR", sr_bytes()), ("SC", sr_bytes("1.2.3.5"))], key)


def test_retry_policy_doubles_up_to_its_limit_and_checks_its_values():
    p = RetryPolicy(first_delay=10, max_delay=60)
    assert [p.delay(n) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]
    with pytest.raises(ValueError, match="retry-max-delay"):
        RetryPolicy(first_delay=10, max_delay=5)
    with pytest.raises(ValueError, match="out of range"):
        RetryPolicy(timeout=0)


def test_queued_results_are_retried_with_back_off_then_sent(tmp_path):
    wl = Worklist(tmp_path)
    queued(wl)
    down = Delivery(False, reason="could not associate with PACS (down, unreachable or aborted)")
    sender = Scripted(down, down, Delivery(True))
    clock = Clock()
    box = Outbox(wl, sender, FAST, clock=clock)
    assert box.deliver_due() == 2
    (entry,) = wl.entries()
    assert entry["results_status"] == "queued" and "could not associate" in entry["results_reason"]
    assert entry["retry_at"] == pytest.approx(clock.now + 0.2)
    clock.advance(0.19)
    assert box.deliver_due() == 0  # not due yet
    clock.advance(0.02)
    assert box.deliver_due() == 2  # second failure: 0.4 s
    assert wl.entries()[0]["retry_at"] == pytest.approx(clock.now + 0.4)
    clock.advance(0.39)
    assert box.deliver_due() == 0
    clock.advance(0.02)
    assert box.deliver_due() == 2
    (entry,) = wl.entries()
    assert entry["results_status"] == "sent" and entry["results_sent"] is True and entry["retry_at"] is None
    assert [(r["kind"], r["status"], r["attempts"]) for r in entry["results"]] == [("SR", "sent", 3), ("SC", "sent", 3)]
    with sqlite3.connect(tmp_path / DB_NAME) as db:  # a sent result's bytes (and the name in them) are dropped
        assert db.execute("SELECT COUNT(*) FROM outbox WHERE data IS NOT NULL").fetchone()[0] == 0


def test_permanent_failure_is_shown_and_never_retried(tmp_path):
    wl = Worklist(tmp_path)
    queued(wl)
    sender = Scripted(Delivery(False, True, "PACS@h:1 answered Rejected Permanent: called AE title not recognised"))
    clock = Clock()
    box = Outbox(wl, sender, FAST, clock=clock)
    assert box.deliver_due() == 2
    clock.advance(3600)
    assert box.deliver_due() == 0 and sender.sent == 2
    (entry,) = wl.entries()
    assert entry["results_status"] == "failed" and entry["retry_at"] is None
    assert "Rejected Permanent" in entry["results_reason"] and not entry["results_sent"]


def test_transient_failures_are_given_up_after_the_limit(tmp_path):
    wl = Worklist(tmp_path)
    clock = Clock()  # before queueing: the clock never runs ahead of the real time the entry was queued at
    queued(wl)
    policy = RetryPolicy(0.05, 0.05, give_up_after=0.1)
    box = Outbox(wl, Scripted(Delivery(False, reason="no answer")), policy, clock=clock)
    box.deliver_due()
    clock.advance(0.06)
    box.deliver_due()  # 0.06 s after queueing: still within the limit
    assert wl.entries()[0]["results_status"] == "queued"
    clock.advance(10)
    box.deliver_due()
    (entry,) = wl.entries()
    assert entry["results_status"] == "failed" and entry["results_reason"].startswith("gave up after")


def test_a_restarted_node_sends_what_was_queued(tmp_path):
    wl = Worklist(tmp_path)
    queued(wl)
    Outbox(wl, Scripted(Delivery(False, reason="down")), RetryPolicy(first_delay=3600, max_delay=3600)).deliver_due()
    wl.close()  # the node stops with its results queued for an hour from now
    again = Worklist(tmp_path)
    sender = Scripted(Delivery(True))
    box = Outbox(again, sender, FAST)
    box.start()  # tries every queued result at once
    try:
        deadline = time.monotonic() + 10
        while again.entries()[0]["results_status"] != "sent" and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        box.stop()
    assert sender.sent == 2 and again.entries()[0]["results_status"] == "sent"


def test_one_sop_instance_uid_with_other_content_is_kept_apart(tmp_path):
    wl = Worklist(tmp_path)
    queued(wl, "1.1", key="study-a|1.1|pixels-a")
    queued(wl, "1.1", key="study-b|1.1|pixels-b")
    queued(wl, "1.1", key="study-a|1.1|pixels-a")  # sent again: replaces its own entry only
    assert len(wl) == 2 and {e["sop_instance_uid"] for e in wl.entries()} == {"1.1"}
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 4


def test_a_worklist_from_before_the_outbox_is_carried_over(tmp_path):
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        db.execute(
            "CREATE TABLE worklist (sop_instance_uid TEXT PRIMARY KEY, study_instance_uid TEXT NOT NULL, "
            "accession_number TEXT NOT NULL DEFAULT '', received_at REAL NOT NULL, label TEXT NOT NULL DEFAULT '', "
            "confidence REAL, p_covid REAL, p_lung_opacity REAL, p_normal REAL, p_viral_pneumonia REAL, "
            "decision TEXT NOT NULL, error TEXT NOT NULL DEFAULT '', urgency INTEGER NOT NULL, "
            "results_sent INTEGER NOT NULL DEFAULT 0)"
        )
        db.execute(
            "INSERT INTO worklist VALUES ('1.1', '9.9', 'A1', 1, 'covid', 0.9, 0.9, 0, 0.1, 0, 'accept', '', 4, 1)"
        )
        db.execute(
            "INSERT INTO worklist VALUES ('1.2', '9.9', 'A2', 2, 'normal', 0.9, 0, 0, 0.9, 0, 'accept', '', 1, 0)"
        )
    got = read_worklist(tmp_path)
    assert [(e["sop_instance_uid"], e["results_status"]) for e in got] == [("1.1", "sent"), ("1.2", "failed")]
