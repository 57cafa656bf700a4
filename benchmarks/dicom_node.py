"""The DICOM node against a real PACS (Debian's Orthanc): round trip and a 100-instance association.

Usage: python benchmarks/dicom_node.py [--round-trips 20] [--bulk 100] [--rounds 3] [--write]

Round trip: Orthanc auto-routes each stored DX image to `cxr-triage dicom-node` (a Lua script, as a hospital would
set it up); the clock runs from the upload to Orthanc (POST /instances) until the SR is found in the study through
Orthanc's REST API (polled every 20 ms). Target: <= 2 s.
Bulk: a second Orthanc (no auto-routing) holds N instances and sends them to the node in one association
(POST /modalities/cxr/store); repeated ``--rounds`` times. Checks that every source got exactly one SR that
references it (none lost), and records the node's RSS before and after each round (memory flat).
Orthanc and the node run as child processes on loopback ports with temporary storage.
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.dicom_samples import SAMPLES, chest_dicom, sr_summary  # noqa: E402
from tests.orthanc import NodeProcess, Orthanc  # noqa: E402
from tests.ports import free_port  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"


def sample_names() -> list[str]:
    return sorted(p.name for p in SAMPLES.glob("*.jpg"))


def with_node(work: Path, route: bool) -> tuple[Orthanc, NodeProcess]:
    port = free_port()
    orthanc = Orthanc(work / "pacs", "CXR_TRIAGE", port, route=route)
    try:
        return orthanc, NodeProcess(orthanc, port, work / "store", work / "node.log")
    except Exception:
        orthanc.stop()
        raise


def round_trips(work: Path, n: int) -> dict[str, float]:
    """Seconds from upload to the SR being in Orthanc, auto-routed; and for an explicit REST C-STORE."""
    orthanc, node = with_node(work, route=True)
    names, routed, explicit = sample_names(), [], []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            stored = orthanc.upload(chest_dicom(names[i % len(names)]))
            orthanc.wait_for(stored["ParentStudy"], {"SR"})
            routed.append(time.perf_counter() - t0)
        stored = orthanc.upload(chest_dicom(sop_class=pydicom.uid.SecondaryCaptureImageStorage))  # not routed
        for _ in range(n):
            t0 = time.perf_counter()
            orthanc.send([stored["ID"]])  # synchronous: returns once the node answered (results queued)
            orthanc.wait_for(stored["ParentStudy"], {"SR"})  # the outbox sends them right after
            explicit.append(time.perf_counter() - t0)
    finally:
        node.stop()
        orthanc.stop()
    r, e = np.array(routed), np.array(explicit)
    return {
        "n": n,
        "routed_p50": float(np.median(r)),
        "routed_p95": float(np.percentile(r, 95)),
        "routed_max": float(r.max()),
        "explicit_p50": float(np.median(e)),
        "explicit_max": float(e.max()),
    }


def bulk(work: Path, n: int, rounds: int) -> dict[str, object]:
    """``rounds`` x (N instances in one association): answered, lost, node RSS, time per instance."""
    orthanc, node = with_node(work, route=False)
    names, rss, seconds, lost, failed, total = sample_names(), [node.rss_mb()], [], 0, 0, 0
    try:
        for _ in range(rounds):
            study = pydicom.uid.generate_uid()
            data = [chest_dicom(names[i % len(names)], study_uid=study, InstanceNumber=i + 1) for i in range(n)]
            stored = [orthanc.upload(d) for d in data]
            sources = {str(pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).SOPInstanceUID) for d in data}
            t0 = time.perf_counter()
            job = orthanc.send([s["ID"] for s in stored])
            seconds.append(time.perf_counter() - t0)
            failed += int(job["FailedInstancesCount"])
            found = orthanc.results(stored[0]["ParentStudy"])
            answered = [sr_summary(pydicom.dcmread(io.BytesIO(orthanc.file(i))))["source"] for i in found["SR"]]
            lost += len(sources - set(answered)) + (len(answered) - len(set(answered)))
            total += n
            rss.append(node.rss_mb())
    finally:
        node.stop()
        orthanc.stop()
    return {"n": n, "rounds": rounds, "total": total, "failed": failed, "lost": lost, "rss": rss, "seconds": seconds}


def table(rt: dict[str, float], bk: dict[str, object]) -> str:
    rss = " / ".join(f"{v:.0f}" for v in bk["rss"])  # type: ignore[union-attr]
    per = [s / bk["n"] * 1000 for s in bk["seconds"]]  # type: ignore[union-attr,operator]
    rows = [
        (f"round trip, auto-routed (n={rt['n']}): p50 / p95 / max", _s(rt, "routed")),
        (f"round trip, REST C-STORE (n={rt['n']}): p50 / max", _s(rt, "explicit", p95=False)),
        ("instances sent in one association x rounds", f"{bk['n']} x {bk['rounds']}"),
        ("C-STORE failures reported by Orthanc", str(bk["failed"])),
        ("sources without exactly one SR (lost)", str(bk["lost"])),
        ("time per instance in the association, by round", " / ".join(f"{p:.0f} ms" for p in per)),
        ("node RSS: started, then after each round", f"{rss} MB"),
    ]
    head = f"{platform.machine()}, {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    return "\n".join([head, "", "| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows), ""])


def _s(rt: dict[str, float], key: str, p95: bool = True) -> str:
    keys = ("p50", "p95", "max") if p95 else ("p50", "max")
    return " / ".join(f"{rt[f'{key}_{k}']:.2f}" for k in keys) + " s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--round-trips", type=int, default=20)
    ap.add_argument("--bulk", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rt = round_trips(Path(tmp) / "rt", args.round_trips)
        bk = bulk(Path(tmp) / "bulk", args.bulk, args.rounds)
    text = table(rt, bk)
    print(text)
    if args.write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
