"""Peak memory of `cxr-triage dicom-node` under big and hostile instances (issue 24, item 2).

Usage: python benchmarks/dicom_limits.py [--max-instance-mb 128]

The node runs as its own process (the CLI, default limits, an allow-list) and sends results to a stand-in PACS in
this process. Each step sends instances from child processes, as they are on disk (pynetdicom's chunked sending),
and then reads the node's VmRSS and VmHWM (its peak resident memory so far) from /proc. Target: peak <= 600 MB.
Steps: an ordinary chest DX; a 302 MB instance (over the cap: refused while received); a 64 MB instance the node
decodes (8192 x 4096, 16-bit); ten of those at once; a 95 MB RGB instance (8-bit, 6000 x 5534); a 120 MB one (over
the cap); a 90 MB instance (under the cap, over the pixel budget); a deflate bomb (275 KB that inflates to 276 MB);
ten bombs at once.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pynetdicom  # noqa: E402
from pynetdicom.sop_class import Verification  # noqa: E402

from tests.dicom_peers import StandInPACS  # noqa: E402
from tests.dicom_samples import chest_dicom, write_large_dicom  # noqa: E402
from tests.dicom_sender import send_in_child  # noqa: E402
from tests.orthanc import stop_process  # noqa: E402
from tests.ports import free_port  # noqa: E402

MB = 2**20


def memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start_node(port: int, pacs_port: int, max_mb: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cxr_triage.cli", "dicom-node", "--port", str(port)]
    cmd += ["--send-to", f"PACS@127.0.0.1:{pacs_port}", "--allow", "MODALITY@127.0.0.1"]
    cmd += ["--max-instance-mb", str(max_mb)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    ae = pynetdicom.AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
        if assoc.is_established:
            assoc.release()
            return proc
        time.sleep(0.5)
    stop_process(proc)
    raise RuntimeError(f"the node did not start: {log.read_text()[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-instance-mb", type=int, default=96)
    args = ap.parse_args()
    pacs, port = StandInPACS(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ordinary = work / "chest.dcm"
        ordinary.write_bytes(chest_dicom())
        files = {
            "big": write_large_dicom(work / "big.dcm", 302 * MB),
            "decodable": write_large_dicom(work / "decodable.dcm", 64 * MB),
            "over_budget": write_large_dicom(work / "over_budget.dcm", 90 * MB),
            "rgb_big": write_large_dicom(work / "rgb_big.dcm", 120 * MB, rgb=True),
            "rgb": write_large_dicom(work / "rgb.dcm", 95 * MB, rgb=True),
            "bomb": write_large_dicom(work / "bomb.dcm", 276 * MB, deflated=True),
        }
        steps = [
            ("ordinary chest DX (1 MB)", [ordinary]),
            ("302 MB instance (over the cap)", [files["big"]]),
            ("64 MB instance, decoded", [files["decodable"]]),
            ("10 x 64 MB at once", [files["decodable"]] * 10),
            ("95 MB instance, RGB 6000 x 5534 8-bit, decoded", [files["rgb"]]),
            ("120 MB RGB 6000 x 6990 (over the cap)", [files["rgb_big"]]),
            ("90 MB instance (over the pixel budget)", [files["over_budget"]]),
            (f"deflate bomb ({files['bomb'].stat().st_size // 1024} KB -> 276 MB)", [files["bomb"]]),
            ("10 deflate bombs at once", [files["bomb"]] * 10),
        ]
        node = start_node(port, pacs.port, args.max_instance_mb, work / "node.log")
        rows = [("started", "", *memory(node.pid), 0.0)]
        try:
            for name, paths in steps:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(len(paths)) as pool:
                    answers = list(pool.map(lambda p: send_in_child(port, p), paths))
                statuses = ", ".join(sorted({f"0x{s:04X}" if s >= 0 else "none" for s, _ in answers}))
                rows.append((name, statuses, *memory(node.pid), time.perf_counter() - t0))
        finally:
            stop_process(node)
            pacs.server.shutdown()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"{platform.machine()}, Python {platform.python_version()}, {when}, --max-instance-mb {args.max_instance_mb}\n"
    )
    print("| step | C-STORE status | node RSS after (MB) | node peak RSS so far (MB) | seconds |")
    print("|---|---|---|---|---|")
    for name, status, rss, hwm, seconds in rows:
        print(f"| {name} | {status} | {rss:.0f} | {hwm:.0f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
