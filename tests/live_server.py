"""Run the service for real (uvicorn, with its protocol limits) in a thread or as `cxr-triage serve`, for tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from cxr_triage.serve.guard import ServiceLimits, uvicorn_options
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def in_thread(app: FastAPI, limits: ServiceLimits | None = None) -> Iterator[str]:
    """The app under uvicorn on 127.0.0.1 in a daemon thread (the default service limits unless ``limits``); yields its
    base URL."""
    limits = limits or ServiceLimits()
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_options(limits))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@contextmanager
def serve_process(*args: str) -> Iterator[str]:
    """`cxr-triage serve` in a subprocess (the shipped bundle unless args say otherwise); yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "cxr_triage.cli", "serve", "--port", str(port), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    log = tempfile.TemporaryFile("w+")  # not a pipe: a chatty server must never block on a full pipe
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"serve exited: {log.read()[-2000:]}")
            assert time.monotonic() < deadline, "serve did not become healthy"
            try:
                if httpx.get(f"{base}/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        serve_process.last_log = log.read()  # type: ignore[attr-defined]
        log.close()
