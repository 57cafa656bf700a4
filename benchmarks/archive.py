"""Archive scoring (issue 16): local Ray Data vs the single-process CLI, side by side in one run.

Usage: nice -n 15 python benchmarks/archive.py [--n 5000] [--data DATASET_DIR] [--json out.json]
       nice -n 15 python benchmarks/archive.py --cpu [--n 1000] [--json out.json]

Takes ``--n`` images from the dataset folder (classes interleaved; read-only) and runs, alternating so that the
machine's drift and any other load hit both engines alike (``STEPS``): the CLI's path (``Predictor.predict_files``
over the files, model load included), local Ray with 2 workers, with 1 worker (``score_archive`` into Parquet: reading,
scoring, shards, merge), the CLI and 2 workers again, then 2 workers killing one scoring actor with SIGKILL after
40 % of the rows (every row must still appear exactly once).
Ray's own start (``ray.init``, local) and a first 64-image job (Ray starting its worker processes) are timed apart:
a running cluster pays them once, not per job. Each job reports its whole wall time (actors starting and loading
the model, reading, scoring, shards, merge), the time to its first row and its rate from first to last row. Every
Ray result is checked against the CLI's rows (labels, decisions, probabilities to 1e-6).

``--cpu`` measures what contention cannot blur: the CPU seconds each command spends (the command's process and all
its descendants: Ray's services, readers, actors; /proc sampled every 0.2 s), for ``cxr-triage predict`` and for
``predict --engine ray`` with 1 and 2 workers on ``--n`` images, and with 2 workers on 16 images (Ray's fixed cost).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from itertools import chain, zip_longest
from pathlib import Path
from tempfile import TemporaryDirectory

import pyarrow.parquet as pq

from cxr_triage.batch.archive import ray_session, score_archive
from cxr_triage.batch.shards import predictions_table
from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.runtime.predictor import Predictor

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
    preds = [s.prediction for s in Predictor().predict_files(paths)]
    seconds = time.perf_counter() - t0
    return seconds, {r["path"]: r for r in predictions_table(preds).to_pylist()}  # rows as the Parquet file holds them


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
TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far) for every process."""
    table = {}
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            table[int(proc.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
        except (OSError, ValueError, IndexError):
            continue
    return table


def command_cpu(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and all its descendants) for one command."""
    t0, used = time.perf_counter(), {}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        table, tree = _proc_table(), {proc.pid}
        for _ in range(8):  # descendants down to 8 levels (driver -> raylet -> workers)
            tree |= {pid for pid, (ppid, _) in table.items() if ppid in tree}
        used |= {pid: table[pid][1] for pid in tree if pid in table}
        time.sleep(0.2)
    return time.perf_counter() - t0, sum(used.values())


def cpu_costs(paths: list[str], tmp: Path) -> dict:
    """CPU seconds of the plain CLI and of Ray (2 workers) on all and on a third of ``paths``, Ray with 1 worker on
    all: the difference between the two sizes is the cost per image, what is left the fixed cost of a job."""
    exe = [sys.executable, "-m", "cxr_triage.cli", "predict"]
    small = paths[: len(paths) // 3]
    runs = {
        "cli_small": exe + small + ["--format", "csv", "--out", str(tmp / "c1.csv")],
        "cli": exe + paths + ["--format", "csv", "--out", str(tmp / "c2.csv")],
        "ray2_small": exe + small + ["--engine", "ray", "--workers", "2", "--out", str(tmp / "r1.parquet")],
        "ray2": exe + paths + ["--engine", "ray", "--workers", "2", "--out", str(tmp / "r2.parquet")],
        "ray1": exe + paths + ["--engine", "ray", "--workers", "1", "--out", str(tmp / "r3.parquet")],
    }
    res: dict = {}
    for name, cmd in runs.items():
        wall, cpu = command_cpu(cmd)
        n = len(small) if name.endswith("_small") else len(paths)
        res[name] = {"images": n, "wall_s": wall, "cpu_s": cpu}
        print(f"{name:<11} {n} images: {cpu:7.1f} CPU s, {wall:6.1f} s wall", flush=True)
    for kind in ("cli", "ray2"):
        per = (res[kind]["cpu_s"] - res[f"{kind}_small"]["cpu_s"]) / (len(paths) - len(small))
        res[f"{kind}_ms_per_image"] = 1e3 * per
        res[f"{kind}_fixed_cpu_s"] = res[kind]["cpu_s"] - per * len(paths)
        print(f"{kind}: {1e3 * per:.2f} CPU ms per image, {res[f'{kind}_fixed_cpu_s']:.1f} CPU s per job", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cpu", action="store_true", help="CPU seconds per image instead of the timed run")
    args = ap.parse_args()
    paths = pick(args.data, args.n)
    if args.cpu:
        with TemporaryDirectory() as tmp:
            res = cpu_costs(paths, Path(tmp))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")
        return
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
