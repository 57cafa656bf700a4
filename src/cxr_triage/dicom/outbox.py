"""The outbox: results wait in the worklist's database until the PACS has them, and are sent by one background
thread, retried with exponential back-off while the failure may pass (PACS down, timeout, "Rejected Transient",
out of resources), and marked failed at once when it will not ("Rejected Permanent", a refusing status) or when
``give_up_after`` has passed. Queued results are tried again as soon as the node starts.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pydicom

from cxr_triage.dicom.send import Delivery, Sender
from cxr_triage.runtime.worklist import Item, Worklist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """Back-off between tries of one result: ``first_delay``, doubling up to ``max_delay``; given up after
    ``give_up_after`` seconds in the outbox. ``timeout``: seconds the PACS may take to answer."""

    first_delay: float = 10.0
    max_delay: float = 600.0
    give_up_after: float = 3 * 86400.0
    timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("first_delay", "max_delay", "give_up_after", "timeout"):
            if not 0.01 <= getattr(self, name) <= 30 * 86400:
                raise ValueError(f"{name} {getattr(self, name)} s is out of range; give 0.01 s to 30 days")
        if self.max_delay < self.first_delay:
            raise ValueError("the longest retry delay is shorter than the first; give a larger --retry-max-delay")

    def delay(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failed ones."""
        return min(self.max_delay, self.first_delay * 2 ** max(0, attempts - 1))


def as_dataset(item: Item) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(io.BytesIO(item.data))
    except Exception:
        return None


class Outbox:
    """Delivers the worklist's queued results through ``sender`` (``start()`` a thread, or ``deliver_due()``)."""

    def __init__(
        self,
        worklist: Worklist,
        sender: Sender,
        policy: RetryPolicy | None = None,
        batch: int = 16,
        clock: Callable[[], float] = time.time,
    ):
        """``clock``: the seconds since the epoch that decide what is due (a test's clock need not wait)."""
        self.worklist, self.sender, self.policy, self.batch = worklist, sender, policy or RetryPolicy(), batch
        self.clock = clock
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def deliver_due(self) -> int:
        """One try of up to ``batch`` due results in one association; how many were tried."""
        items = self.worklist.due(self.clock(), self.batch)
        if not items:
            return 0
        parsed = [(item, as_dataset(item)) for item in items]
        for item, ds in parsed:
            if ds is None:
                self.worklist.settle(item.id, "failed", "the queued result cannot be read; send the image again")
        ready = [(item, ds) for item, ds in parsed if ds is not None]
        deliveries = self.sender.send([ds for _, ds in ready]) if ready else []
        now = self.clock()
        for (item, _), delivery in zip(ready, deliveries, strict=True):
            self.settle(item, delivery, now)
        return len(items)

    def settle(self, item: Item, delivery: Delivery, now: float) -> None:
        if delivery.ok:
            self.worklist.settle(item.id, "sent")
            log.info("result %d (%s) sent", item.id, item.kind)
        elif delivery.permanent:
            self.worklist.settle(item.id, "failed", delivery.reason)
            log.warning("result %d (%s) failed for good: %s", item.id, item.kind, delivery.reason)
        elif now - item.queued_at >= self.policy.give_up_after:
            hours = self.policy.give_up_after / 3600
            self.worklist.settle(item.id, "failed", f"gave up after {hours:g} h: {delivery.reason}")
            log.warning("result %d (%s) given up after %g h: %s", item.id, item.kind, hours, delivery.reason)
        else:
            wait = self.policy.delay(item.attempts + 1)
            self.worklist.settle(item.id, "queued", delivery.reason, now + wait)
            log.warning("result %d (%s) not sent (%s); next try in %.0f s", item.id, item.kind, delivery.reason, wait)

    def kick(self) -> None:
        """Something was queued: look now."""
        self._wake.set()

    def start(self) -> None:
        """Try every queued result now, then keep delivering in a background thread until ``stop()``."""
        self.worklist.retry_all_now()
        self._thread = threading.Thread(target=self._loop, name="cxr-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.deliver_due():
                    continue
                due = self.worklist.next_try()
            except Exception as exc:  # e.g. the database is locked or the disk full: try again later
                log.warning("the outbox could not send (%s: %s)", type(exc).__name__, exc)
                due = self.clock() + self.policy.first_delay
            wait = 60.0 if due is None else min(60.0, max(0.0, due - self.clock()))
            self._wake.wait(wait)
            self._wake.clear()
