"""Load test of the web service: start it on 127.0.0.1, send a bounded number of mixed requests, record the figures.

Usage: python benchmarks/service_load.py [-n 1000] [-c 16] [--bad-every 5] [--no-write]

Starts `uvicorn --factory cxr_triage.serve.app:create_app` (the shipped bundle) in a subprocess, sends N POSTs to
/api/v1/predict from C concurrent clients: the sample X-rays in src/cxr_triage/assets/samples/ with every k-th
request a malformed upload (a text file named .png, a truncated JPEG). Records throughput, p50/p95/p99 latency of
the valid images, counts by status, dropped connections and the server's RSS (start / middle / end / peak), and
appends a section to benchmarks/RESULTS.md. Targets: zero 5xx, zero dropped connections, p99 < 1 s, flat memory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "src" / "cxr_triage" / "assets" / "samples"
RESULTS = REPO / "benchmarks" / "RESULTS.md"


@dataclass
class Stats:
    latency_valid: list[float] = field(default_factory=list)
    status: Counter = field(default_factory=Counter)
    dropped: int = 0
    wrong: int = 0  # a valid image not answered 200, or a malformed one answered 200 / 5xx
    done: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(port: int, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """``uvicorn --factory cxr_triage.serve.app:create_app`` on loopback, once its health route answers (≤ 120 s);
    its output goes to ``log`` when given."""
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "cxr_triage.serve.app:create_app"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    out = open(log, "w") if log else None  # noqa: SIM115 - the server's child keeps it open
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become healthy in 120 s")


def payloads(bad_every: int) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    valid = [(p.name, p.read_bytes()) for p in sorted(SAMPLES.glob("*.jpg"))]
    jpg = valid[0][1]
    bad = [("notes.png", b"patient list exported 2020-05-01\nnot an image\n"), ("cut.jpg", jpg[: len(jpg) // 2])]
    return valid, bad


class MemoryWatch(threading.Thread):
    """Samples the server's VmRSS every 0.1 s while the load runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(rss_mb(self.pid))
            time.sleep(0.1)


async def one(client: httpx.AsyncClient, url: str, name: str, data: bytes, is_valid: bool, stats: Stats) -> None:
    t0 = time.perf_counter()
    try:
        resp = await client.post(url, files={"file": (name, data, "application/octet-stream")})
    except httpx.TransportError:
        stats.dropped += 1
        return
    finally:
        stats.done += 1
    stats.status[resp.status_code] += 1
    if is_valid:
        stats.latency_valid.append(time.perf_counter() - t0)
    if (resp.status_code == 200) != is_valid or resp.status_code >= 500:
        stats.wrong += 1


async def load(
    port: int, n: int, concurrency: int, bad_every: int, on_half: Callable[[], object]
) -> tuple[Stats, float]:
    valid, bad = payloads(bad_every)
    url = f"http://127.0.0.1:{port}/api/v1/predict"
    stats, sem = Stats(), asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def job(i: int, client: httpx.AsyncClient) -> None:
        is_valid = not (bad_every and i % bad_every == bad_every - 1)
        name, data = valid[i % len(valid)] if is_valid else bad[(i // bad_every) % len(bad)]
        async with sem:
            await one(client, url, name, data, is_valid, stats)
        if stats.done == n // 2:
            on_half()

    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(job(i, client) for i in range(n)))
        return stats, time.perf_counter() - t0


def table(stats: Stats, wall: float, n: int, mem: dict[str, float]) -> str:
    lat = np.array(stats.latency_valid) * 1000 if stats.latency_valid else np.array([np.nan])
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    codes = ", ".join(f"{k}: {v}" for k, v in sorted(stats.status.items()))
    n5xx = sum(v for k, v in stats.status.items() if k >= 500)
    rows = [
        ("requests (valid / malformed)", f"{n} ({len(stats.latency_valid)} / {n - len(stats.latency_valid)})"),
        ("wall time", f"{wall:.1f} s"),
        ("throughput", f"{n / wall:.1f} req/s"),
        ("latency of valid images p50 / p95 / p99", f"{p50:.0f} / {p95:.0f} / {p99:.0f} ms (max {lat.max():.0f})"),
        ("responses by status", codes),
        ("5xx", str(n5xx)),
        ("dropped connections", str(stats.dropped)),
        ("wrong answers (valid not 200, malformed 200)", str(stats.wrong)),
        ("server RSS start / middle / end", f"{mem['start']:.0f} / {mem['middle']:.0f} / {mem['end']:.0f} MB"),
        ("server peak RSS (VmHWM)", f"{mem['peak']:.0f} MB"),
    ]
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--requests", type=int, default=1000)
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("--bad-every", type=int, default=5, help="every k-th request is malformed (0: none)")
    ap.add_argument("--no-write", action="store_true", help="print the table; do not append to RESULTS.md")
    args = ap.parse_args()
    port = free_port()
    server = start_server(port)
    try:
        mem = {"start": rss_mb(server.pid)}
        watch = MemoryWatch(server.pid)
        watch.start()
        stats, wall = asyncio.run(
            load(
                port,
                args.requests,
                args.concurrency,
                args.bad_every,
                lambda: mem.setdefault("middle", rss_mb(server.pid)),
            )
        )
        watch.stop.set()
        mem["end"], mem["peak"] = rss_mb(server.pid), rss_mb(server.pid, "VmHWM")
        mem.setdefault("middle", float("nan"))
    finally:
        server.terminate()
        server.wait(timeout=30)
    command = "python benchmarks/service_load.py " + shlex.join(sys.argv[1:])
    text = table(stats, wall, args.requests, mem)
    print(text)
    if not args.no_write:
        section = (
            f"\n## Service load (issue 5): `{command.strip()}`\n\n"
            f"uvicorn (1 worker) with the shipped bundle on 127.0.0.1, {args.concurrency} concurrent httpx clients, "
            f"every {args.bad_every}th request\nmalformed (a text file named .png or a truncated JPEG); "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load generator on the same "
            f"machine.\n{time.strftime('%Y-%m-%d')}.\n\n{text}\n"
        )
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(section)


if __name__ == "__main__":
    main()
