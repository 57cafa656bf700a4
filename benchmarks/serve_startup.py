"""Time a new user's path from `git clone` to the web page answering, with one `make serve`.

Usage: python benchmarks/serve_startup.py [--repo .] [--port 8765] [--runs 1]

Each run clones the repository (committed state) into a fresh temporary folder, runs `make .venv-serve/.serve`
(a venv with the [serve] extra: pip, from the registry or pip's cache) and then `make serve`, polls
http://127.0.0.1:PORT/ until the page and /api/v1/health answer, and stops the server. Prints one line per run:
clone, install (wall and CPU), start-up and total seconds. The machine's load average is printed first: on a
shared machine the wall-clock numbers include waiting for the CPU.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def one_run(repo: Path, port: int, timeout: float = 600) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "cxr-triage"
        t0 = time.perf_counter()
        subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
        t1 = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(["make", "-s", ".venv-serve/.serve"], cwd=clone, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        t2 = time.perf_counter()
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        server = subprocess.Popen(
            ["make", "-s", "serve", f"PORT={port}"],
            cwd=clone,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            while not (answers(base + "/") and answers(base + "/api/v1/health")):
                if server.poll() is not None or time.perf_counter() - t2 > timeout:
                    raise RuntimeError("the page did not come up")
                time.sleep(0.1)
            t3 = time.perf_counter()
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    return {"clone_s": t1 - t0, "install_s": t2 - t1, "install_cpu_s": cpu, "start_s": t3 - t2, "total_s": t3 - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--runs", type=int, default=1)
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    for i in range(a.runs):
        r = one_run(a.repo, a.port)
        print(f"run {i + 1}: " + "  ".join(f"{k} {v:.1f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
