"""Hostile inputs (issue 13): the hostile folder through `predict --format csv` and through the HTTP API.

Usage: python benchmarks/hostile.py [--hostile ../shared/data/hostile-inputs] [--json out.json] [--compare before.json]
       [--no-fifo] [--cli-timeout 120] [--rss-kill-mb 6000]

1. CLI: copies the hostile folder into a temporary folder and adds what a file system cannot ship: formula file names
   (`=1+2.png`, `+SUM(1).png`, `-2+3.png`, `@A1.png`, a leading tab), a newline in a name, a symlink loop, a dangling
   link, a FIFO named `fifo.png`, an extensionless DICOM `IM0001`, a directory named `x.png`, a file whose name holds
   glob characters, two non-image files (skipped) and a missing path with `[` in its name. Runs, inside that folder,
   `/usr/bin/time -v cxr-triage predict . fifo.png missing[1].png --format csv --out o.csv` (killed after
   --cli-timeout s)
   and records exit code, rows against expected entries, traceback, peak RSS and formula cells.
2. API: starts `uvicorn --factory cxr_triage.serve.app:create_app`, POSTs every hostile file one by one (status counts,
   5xx), then the four decompression bombs at once, sampling the server's RSS every 50 ms (a watchdog kills the server
   above --rss-kill-mb, so the old code cannot take the machine down), then checks /api/v1/health.

Results print as a markdown table; --json saves them, --compare renders a before/after table against a saved run.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import service_load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HOSTILE = REPO.parent / "shared" / "data" / "hostile-inputs"
BOMBS = ("bomb_30000.png", "bomb_8000_16bit.png", "deflate_bomb_12000.dcm", "rle_bomb_12000.dcm")
FORMULA_NAMES = ("=1+2.png", "+SUM(1).png", "-2+3.png", "@A1.png", "\tstarts_with_tab.png")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}


def build_folder(src: Path, dst: Path, fifo: bool = True, exclude: tuple[str, ...] = ()) -> tuple[Path, list[str], int]:
    """(folder, extra named paths, rows expected): the hostile folder plus the entries git cannot hold."""
    folder = dst / "hostile"
    shutil.copytree(src, folder)
    for name in exclude:
        (folder / name).unlink()
    good_png, good_dcm = (folder / "good.png").read_bytes(), (folder / "good.dcm").read_bytes()
    for name in (*FORMULA_NAMES, "new\nline.png", "scan[1].png"):
        (folder / name).write_bytes(good_png)
    (folder / "IM0001").write_bytes(good_dcm)
    (folder / "loop_a.png").symlink_to("loop_b.png")
    (folder / "loop_b.png").symlink_to("loop_a.png")
    (folder / "dangling.png").symlink_to("no_such_target.png")
    (folder / "x.png").mkdir()
    (folder / "notes.csv").write_text("a,b\n1,2\n")
    if fifo:
        os.mkfifo(folder / "fifo.png")
    skipped = {"README.md", "notes.csv"}
    expected = sum(1 for p in folder.iterdir() if p.name not in skipped)
    # run from inside the folder (rows then hold bare names like "=1+2.png"); the FIFO is also named explicitly
    return folder, [".", *(["fifo.png"] if fifo else []), "missing[1].png"], expected + 1


def peak_rss_mb(time_output: str) -> float | None:
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_output)
    return int(m.group(1)) / 1024 if m else None


def run_cli(folder: Path, extra: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """`predict --format csv` under /usr/bin/time -v, killed after ``timeout`` s."""
    cmd = ["/usr/bin/time", "-v", "timeout", "-s", "KILL", str(timeout), sys.executable, "-m", "cxr_triage.cli"]
    cmd += ["predict", *extra, "--format", "csv", "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rows: list[dict[str, str]] | None = None
    if out.exists():
        with out.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    formula = sum(1 for r in rows or [] for v in r.values() if isinstance(v, str) and v.startswith(FORMULA_START))
    return {
        "exit": proc.returncode if proc.returncode != 137 else "killed (timeout)",
        "wall_s": round(wall, 1),
        "rows": None if rows is None else len(rows),
        "errors": None if rows is None else sum(r["decision"] == "error" for r in rows),
        "traceback": "Traceback" in proc.stderr or "Traceback" in proc.stdout,
        "peak_rss_mb": peak_rss_mb(proc.stderr),
        "formula_cells": formula,
        "last_message": proc.stderr.split("\tCommand being timed")[0].strip().splitlines()[-2:],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Watch(threading.Thread):
    """Samples the server's RSS every 50 ms; kills it above ``kill_mb``."""

    def __init__(self, proc: subprocess.Popen, kill_mb: float) -> None:
        super().__init__(daemon=True)
        self.proc, self.kill_mb, self.peak, self.killed = proc, kill_mb, 0.0, False
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.proc.poll() is None:
            rss = rss_mb(self.proc.pid)
            self.peak = max(self.peak, rss if rss == rss else 0.0)
            if rss > self.kill_mb:
                self.killed = True
                self.proc.kill()
            time.sleep(0.05)


def start_server(port: int) -> subprocess.Popen:
    return service_load.start_server(port, ENV, Path(tempfile.gettempdir()) / f"hostile-server-{port}.log")


def post(client: httpx.Client, url: str, path: Path) -> tuple[int | str, bool]:
    """(status or 'dropped', traceback in the body)."""
    try:
        resp = client.post(url, files={"file": (path.name, path.read_bytes(), "application/octet-stream")})
    except httpx.TransportError as exc:
        return f"dropped ({type(exc).__name__})", False
    return resp.status_code, "Traceback" in resp.text


async def post_all_at_once(url: str, paths: list[Path]) -> list[int | str]:
    async with httpx.AsyncClient(timeout=300) as client:

        async def one(p: Path) -> int | str:
            try:
                files = {"file": (p.name, p.read_bytes(), "application/octet-stream")}
                return (await client.post(url, files=files)).status_code
            except httpx.TransportError as exc:
                return f"dropped ({type(exc).__name__})"

        return list(await asyncio.gather(*(one(p) for p in paths)))


def run_api(hostile: Path, kill_mb: float) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(port)
    watch = Watch(server, kill_mb)
    watch.start()
    res: dict[str, Any] = {}
    try:
        files = sorted(p for p in hostile.iterdir() if p.name != "README.md" and p.name not in BOMBS)
        status: Counter = Counter()
        five, tracebacks = [], []
        with httpx.Client(timeout=120) as client:
            for p in files:
                code, tb = post(client, f"{base}/api/v1/predict", p)
                status[code] += 1
                if not isinstance(code, int) or code >= 500:
                    five.append(p.name)
                if tb:
                    tracebacks.append(p.name)
                if server.poll() is not None:
                    break
        res["files_posted"] = len(files)
        res["status"] = dict(sorted(((str(k), v) for k, v in status.items())))
        res["5xx_or_dropped"] = five
        res["traceback_in_body"] = tracebacks
        rss_before = rss_mb(server.pid)
        bombs = [hostile / b for b in BOMBS]
        res["bombs_status"] = asyncio.run(post_all_at_once(f"{base}/api/v1/predict", bombs))
        time.sleep(0.3)
        res["server_rss_before_bombs_mb"] = round(rss_before, 0)
        res["server_peak_rss_bombs_mb"] = round(watch.peak, 0)
        res["server_killed_by_watchdog"] = watch.killed
        try:
            healthy = httpx.get(f"{base}/api/v1/health", timeout=5).status_code == 200
        except httpx.TransportError:
            healthy = False
        res["healthy_after"] = healthy
    finally:
        watch.stop.set()
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)
    return res


ROWS = [
    ("CLI exit code", lambda r: r["cli"]["exit"]),
    ("CLI rows written / entries", lambda r: f"{r['cli']['rows']} / {r['expected_rows']}"),
    ("CLI error rows", lambda r: r["cli"]["errors"]),
    ("CLI traceback", lambda r: "yes" if r["cli"]["traceback"] else "no"),
    ("CLI peak RSS", lambda r: f"{r['cli']['peak_rss_mb']:.0f} MB" if r["cli"]["peak_rss_mb"] else "n/a"),
    ("CLI formula cells", lambda r: r["cli"]["formula_cells"]),
    ("CLI wall time", lambda r: f"{r['cli']['wall_s']} s"),
    ("API: hostile files posted one by one", lambda r: r["api"]["files_posted"]),
    ("API: responses by status", lambda r: ", ".join(f"{k}: {v}" for k, v in r["api"]["status"].items())),
    ("API: 5xx or dropped", lambda r: len(r["api"]["5xx_or_dropped"])),
    ("API: traceback in a body", lambda r: len(r["api"]["traceback_in_body"])),
    ("API: four bombs at once, statuses", lambda r: ", ".join(map(str, r["api"]["bombs_status"]))),
    ("API: server peak RSS during the bombs", lambda r: _peak(r["api"])),
    ("API: healthy afterwards", lambda r: "yes" if r["api"]["healthy_after"] else "no"),
]


def _peak(api: dict[str, Any]) -> str:
    text = f"{api['server_peak_rss_bombs_mb']:.0f} MB"
    return text + " (killed by the watchdog)" if api["server_killed_by_watchdog"] else text


def table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    head = "| measure | " + " | ".join(n for n, _ in runs) + " |\n|---|" + "---|" * len(runs) + "\n"
    return head + "\n".join(f"| {name} | " + " | ".join(str(f(r)) for _, r in runs) + " |" for name, f in ROWS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hostile", type=Path, default=HOSTILE)
    ap.add_argument("--json", type=Path, help="save the results here")
    ap.add_argument("--compare", type=Path, help="a saved run to show as 'before'")
    ap.add_argument("--no-fifo", action="store_true", help="leave out the FIFO (old code hangs on it)")
    ap.add_argument("--cli-timeout", type=float, default=120)
    ap.add_argument("--rss-kill-mb", type=float, default=6000)
    ap.add_argument("--skip-api", action="store_true")
    ap.add_argument("--exclude", nargs="*", default=[], help="hostile files to leave out of the CLI run")
    args = ap.parse_args()
    if not args.hostile.is_dir():
        raise SystemExit(f"{args.hostile} not found; give --hostile")
    with tempfile.TemporaryDirectory() as tmp:
        folder, extra, expected = build_folder(args.hostile, Path(tmp), not args.no_fifo, tuple(args.exclude))
        result: dict[str, Any] = {"expected_rows": expected, "fifo": not args.no_fifo, "excluded": args.exclude}
        result["cli"] = run_cli(folder, extra, Path(tmp) / "o.csv", args.cli_timeout)
    result["api"] = run_api(args.hostile, args.rss_kill_mb) if not args.skip_api else {}
    result["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    runs = [("before", json.loads(args.compare.read_text()))] if args.compare else []
    runs.append(("now", result))
    if not args.skip_api:
        print(table(runs))
    else:
        print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
