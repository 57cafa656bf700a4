"""Archive scoring (issue 16): local Ray Data vs the single-process CLI, side by side in one run.

Usage: nice -n 15 python benchmarks/archive.py [--n 5000] [--data DATASET_DIR] [--json out.json]

Takes ``--n`` images from the dataset folder (classes interleaved; read-only) and runs, alternating so that the
machine's drift and any other load hit both engines alike (``STEPS``): the CLI's path (``predict_paths`` over the
files, model load included), local Ray with 2 workers, with 1 worker (``score_archive`` into Parquet: reading,
scoring, shards, merge), the CLI and 2 workers again, then 2 workers killing one scoring actor with SIGKILL after
40 % of the rows (every row must still appear exactly once).
Ray's own start (``ray.init``, local) and a first 64-image job (Ray starting its worker processes) are timed apart:
a running cluster pays them once, not per job. Each job reports its whole wall time (actors starting and loading
the model, reading, scoring, shards, merge), the time to its first row and its rate from first to last row. Every
Ray result is checked against the CLI's rows (labels, decisions, probabilities to 1e-6).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from itertools import chain, zip_longest
from pathlib import Path
from tempfile import TemporaryDirectory

import pyarrow.parquet as pq

from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.runtime.archive import ray_session, score_archive
from cxr_triage.runtime.engine import Engine
from cxr_triage.runtime.predict import predict_paths

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "COVID-19_Radiography_Dataset"


def pick(data: Path, n: int) -> list[str]:
    """``n`` image paths, the class folders interleaved (a mixed archive, not one class after another)."""
    folders = [sorted(str(p) for p in d.rglob("*.jpg")) for d in sorted(data.iterdir()) if d.is_dir()]
    paths = [p for p in chain.from_iterable(zip_longest(*folders)) if p]
    if len(paths) < n:
        raise SystemExit(f"{data} holds only {len(paths)} images; ask for fewer with --n")
    return paths[:n]


def scorer_pids() -> list[int]:
    """Scoring actor processes of this process's local Ray (children of its raylet)."""
    me, pids = os.getpid(), []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            grandparent = int((Path("/proc") / str(parent) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmd.startswith(b"ray::MapWorker(MapBatches(Scorer))") and grandparent == me:
            pids.append(int(proc.name))
    return pids


def run_cli(paths: list[str]) -> tuple[float, dict[str, dict]]:
    t0 = time.perf_counter()
    rows = {r["path"]: r for r in predict_paths(Engine(), paths)}
    return time.perf_counter() - t0, rows


def run_ray(paths: list[str], out: Path, workers: int, kill_at: int | None = None) -> dict:
    """One score_archive job; with ``kill_at`` one scoring actor is SIGKILLed after that many rows."""
    out.unlink(missing_ok=True)
    killed: list[int] = []
    stamps: list[float] = []

    def hook(rows, total):
        for i, row in enumerate(rows):
            stamps.append(time.perf_counter())
            if kill_at is not None and i == kill_at and not killed:
                pids = scorer_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
            yield row

    t0 = time.perf_counter()
    s = score_archive(paths, out, workers=workers, progress=hook)
    seconds = time.perf_counter() - t0
    rows = pq.read_table(out).to_pylist()
    return {
        "workers": workers,
        "seconds": seconds,
        "img_per_s": len(paths) / seconds,
        "first_row_s": stamps[0] - t0,
        "steady_img_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "rows": len(rows),
        "unique_paths": len({r["path"] for r in rows}),
        "duplicates_dropped": s.duplicates,
        "killed_pid": killed[0] if killed else None,
        "table": rows,
    }


def compare(rows: list[dict], cli: dict[str, dict]) -> dict:
    """Mismatches against the CLI rows and the largest probability difference."""
    diff, bad = 0.0, 0
    for r in rows:
        e = cli[r["path"]]
        if (r["label"], r["decision"], r["error"]) != (e["label"], e["decision"], e["error"]):
            bad += 1
        elif e["decision"] != "error":
            diff = max(diff, *(abs(r[f"p_{c}"] - e[f"p_{c}"]) for c in CLASS_IDS))
    return {"mismatched_rows": bad, "max_prob_diff": diff, "missing": len(set(cli) - {r["path"] for r in rows})}


STEPS = ("cli", "ray2", "ray1", "cli", "ray2", "ray2_kill")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    paths = pick(args.data, args.n)
    res: dict = {"n": args.n, "cpus": os.cpu_count(), "steps": []}
    cli_rows: dict[str, dict] = {}
    with TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with ray_session(None, os.cpu_count() or 2):
            res["ray_start_s"] = time.perf_counter() - t0
            print(f"Ray start      {res['ray_start_s']:.1f} s", flush=True)
            warm = run_ray(paths[:64], Path(tmp) / "warm.parquet", 2)
            res["first_job_64_s"] = warm["seconds"]
            print(f"first job (64 images, Ray starts its workers) {warm['seconds']:.1f} s", flush=True)
            for name in STEPS:
                load = os.getloadavg()[0]
                if name == "cli":
                    seconds, cli_rows = run_cli(paths)
                    r = {"seconds": seconds, "img_per_s": args.n / seconds}
                    print(f"CLI            {r['img_per_s']:7.1f} img/s  ({seconds:.1f} s)", flush=True)
                else:
                    kill = int(0.4 * args.n) if name.endswith("kill") else None
                    r = run_ray(paths, Path(tmp) / f"{name}.parquet", 1 if name == "ray1" else 2, kill)
                    r["vs_cli"] = compare(r.pop("table"), cli_rows)
                    print(
                        f"{name:<14} {r['img_per_s']:7.1f} img/s  ({r['seconds']:.1f} s; first row after"
                        f" {r['first_row_s']:.1f} s, then {r['steady_img_per_s']:.1f} img/s)  {r['vs_cli']}",
                        flush=True,
                    )
                res["steps"].append({"name": name, "loadavg_1min_before": load} | r)
                if args.json:  # after every step: a long run that dies keeps what it measured
                    args.json.write_text(json.dumps(res, indent=2) + "\n")
    summarise(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


def summarise(res: dict) -> None:
    """Rates over all legs of each kind (total images / total seconds) and their ratios."""
    legs: dict[str, list[dict]] = {}
    for step in res["steps"]:
        legs.setdefault(step["name"], []).append(step)
    rate = {k: res["n"] * len(v) / sum(s["seconds"] for s in v) for k, v in legs.items()}
    steady = {k: sum(s["steady_img_per_s"] for s in v) / len(v) for k, v in legs.items() if k != "cli"}
    res |= {"rate": rate, "steady": steady}
    res["ray2_vs_cli"] = rate["ray2"] / rate["cli"]
    res["ray2_vs_ray1"] = rate["ray2"] / rate["ray1"]
    res["ray2_vs_ray1_steady"] = steady["ray2"] / steady["ray1"]
    kill = legs["ray2_kill"][0]
    print(f"Ray 2 workers / CLI: {res['ray2_vs_cli']:.1%}   2 workers / 1 worker: {res['ray2_vs_ray1']:.2f}x", end="")
    print(f" (first to last row: {res['ray2_vs_ray1_steady']:.2f}x)")
    print(f"kill run: {kill['rows']} rows, {kill['unique_paths']} unique paths, killed pid {kill['killed_pid']}")


if __name__ == "__main__":
    main()
