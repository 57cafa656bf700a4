"""Send one Part-10 file to a DICOM node as it is on disk (pynetdicom's chunked sending), from a child process, so
that the memory a test or benchmark measures in its own process is the node's alone.

Usage: python -m tests.dicom_sender PORT PATH [CALLING_AET] -> prints {"status": ..., "comment": ...} as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def send_file(port: int, path: Path, calling: str = "MODALITY", called: str = "CXR_TRIAGE") -> tuple[int, str]:
    """(C-STORE status, Error Comment) for the file at ``path``, sent in its own transfer syntax; status -1 when
    no association was made or the association ended before an answer."""
    import pydicom
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title=calling)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return -1, "no association"
    try:
        rsp = assoc.send_c_store(path)
    finally:
        assoc.release()
    return int(getattr(rsp, "Status", -1)), str(getattr(rsp, "ErrorComment", ""))


def send_in_child(port: int, path: Path, calling: str = "MODALITY") -> tuple[int, str]:
    """``send_file`` in a child Python process."""
    cmd = [sys.executable, "-m", "tests.dicom_sender", str(port), str(path), calling]
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    return answer["status"], answer["comment"]


if __name__ == "__main__":
    status, comment = send_file(int(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:4])
    print(json.dumps({"status": status, "comment": comment}))
