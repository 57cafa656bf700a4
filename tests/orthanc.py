"""A real PACS for tests and benchmarks: Debian's Orthanc as a child process, with its own JSON configuration on
loopback ports and a temporary storage folder, driven through its REST API.

The configuration is the one the README's "Connect to your PACS" section shows: the node is the DICOM modality
``cxr``; optionally a Lua script auto-routes every stored CR/DX image to it, as a hospital would set it up.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.ports import free_port

ORTHANC_AET = "ORTHANC"
# Auto-routing: send each stored CR or DX image to the node; its results (SR, OT) are not routed back.
ROUTE_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  if tags['Modality'] == 'CR' or tags['Modality'] == 'DX' then
    SendToModality(instanceId, 'cxr')
  end
end
"""


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)


def orthanc_config(
    work: Path, http_port: int, dicom_port: int, node_aet: str, node_port: int, route: bool = False
) -> dict[str, Any]:
    """Orthanc's configuration: loopback-only REST, the node as modality ``cxr``, optional auto-routing."""
    config: dict[str, Any] = {
        "Name": "cxr-triage-test",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "storage"),
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "DicomModalities": {"cxr": [node_aet, "127.0.0.1", node_port]},
        "DicomAlwaysAllowStore": True,  # accept the node's results
        "DicomScuTimeout": 30,
        "Plugins": [],
        "SaveJobs": False,
        "DeidentifyLogs": True,
    }
    if route:
        (work / "route.lua").write_text(ROUTE_LUA)
        config["LuaScripts"] = [str(work / "route.lua")]
    return config


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate a child process, killing it if it has not exited within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Orthanc:
    """Start Orthanc in ``work`` (a fresh folder); ``stop()`` ends it. REST helpers for the tests."""

    def __init__(
        self,
        work: Path,
        node_aet: str,
        node_port: int,
        route: bool = False,
        dicom_port: int | None = None,
        lua: str = "",
        **settings: Any,
    ) -> None:
        """``dicom_port``: a port chosen before (e.g. a PACS that comes up late); ``lua``: a script of its own
        (e.g. a slow ``ReceivedInstanceFilter``); ``settings``: more configuration (e.g. DicomCheckCalledAet)."""
        binary = orthanc_binary()
        if binary is None:
            raise FileNotFoundError("Orthanc is not installed (Debian: apt-get install orthanc)")
        work.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), dicom_port or free_port()
        config = orthanc_config(work, self.http_port, self.dicom_port, node_aet, node_port, route)
        if lua:
            (work / "extra.lua").write_text(lua)
            config["LuaScripts"] = [*config.get("LuaScripts", []), str(work / "extra.lua")]
        config.update(settings)
        (work / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log_path = work / "orthanc.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([binary, str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
        self.rest = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=60)
        self._wait_ready()

    @property
    def send_to(self) -> str:
        """The node's ``--send-to`` for this Orthanc."""
        return f"{ORTHANC_AET}@127.0.0.1:{self.dicom_port}"

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.proc.returncode}): {self.log_path.read_text()[-2000:]}")
            try:
                if self.rest.get("/system").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        self.rest.close()
        stop_process(self.proc)

    def upload(self, data: bytes) -> dict[str, Any]:
        """POST /instances: the stored instance's ID and parents."""
        r = self.rest.post("/instances", content=data)
        r.raise_for_status()
        return r.json()

    def echo(self, modality: str = "cxr") -> bool:
        return self.rest.post(f"/modalities/{modality}/echo", json={}).status_code == 200

    def send(self, instance_ids: list[str], modality: str = "cxr") -> dict[str, Any]:
        """C-STORE the instances to the modality in one association (synchronous job); Orthanc's report."""
        r = self.rest.post(f"/modalities/{modality}/store", json={"Resources": instance_ids, "Synchronous": True})
        r.raise_for_status()
        return r.json()

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's ID of the study with this Study Instance UID (None: not stored)."""
        r = self.rest.post("/tools/lookup", content=study_uid)
        r.raise_for_status()
        return next((m["ID"] for m in r.json() if m["Type"] == "Study"), None)

    def wait_for_study(self, study_uid: str, modalities: set[str], timeout: float = 30) -> dict[str, list[str]]:
        """``wait_for`` by Study Instance UID, once the study exists."""
        deadline = time.monotonic() + timeout
        while (study := self.study_id(study_uid)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no study arrived within {timeout:.0f} s")
            time.sleep(0.05)
        return self.wait_for(study, modalities, max(0.1, deadline - time.monotonic()))

    def instances(self, study_id: str) -> list[dict[str, Any]]:
        """The study's instances with their tags (``/studies/{id}/instances?expand``)."""
        r = self.rest.get(f"/studies/{study_id}/instances", params={"expand": ""})
        r.raise_for_status()
        return r.json()

    def modality_of(self, instance: dict[str, Any]) -> str:
        series = self.rest.get(f"/series/{instance['ParentSeries']}").json()
        return series["MainDicomTags"].get("Modality", "")

    def file(self, instance_id: str) -> bytes:
        r = self.rest.get(f"/instances/{instance_id}/file")
        r.raise_for_status()
        return r.content

    def results(self, study_id: str) -> dict[str, list[str]]:
        """Instance IDs in the study by modality (SR, OT, DX, CR)."""
        out: dict[str, list[str]] = {}
        for inst in self.instances(study_id):
            out.setdefault(self.modality_of(inst), []).append(inst["ID"])
        return out

    def wait_for(self, study_id: str, modalities: set[str], timeout: float = 30) -> dict[str, list[str]]:
        """Poll until the study holds instances of all ``modalities``; the study's instances by modality."""
        deadline = time.monotonic() + timeout
        found: dict[str, list[str]] = {}
        while time.monotonic() < deadline:
            found = self.results(study_id)
            if modalities <= set(found):
                return found
            time.sleep(0.05)
        raise TimeoutError(f"study holds {sorted(found)} after {timeout:.0f} s, not {sorted(modalities)}")


class NodeProcess:
    """``cxr-triage dicom-node`` as a child process (its log in ``log_path``), ready once Orthanc's C-ECHO works."""

    def __init__(self, orthanc: Orthanc, port: int, store: Path, log_path: Path, aet: str = "CXR_TRIAGE") -> None:
        cmd = [sys.executable, "-m", "cxr_triage.cli", "dicom-node", "--aet", aet, "--port", str(port)]
        cmd += ["--send-to", orthanc.send_to, "--store", str(store)]
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not orthanc.echo():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the DICOM node did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        """The node's resident memory (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc status")

    def stop(self) -> None:
        stop_process(self.proc)
