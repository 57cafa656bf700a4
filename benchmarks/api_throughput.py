"""End-to-end throughput of the public API, this checkout against another source tree (issue 23's "not slower").

Usage: python benchmarks/api_throughput.py --other <worktree>/src [--rounds 10]
       (e.g. `git worktree add /tmp/old d36181a`, then --other /tmp/old/src)

Each round runs, in fresh processes and alternating which tree goes first, ``Triage().predict_many`` over the
bundled samples x 12 (batch 32, decoding included, after a 32-image warm-up), without and with heatmaps; prints
every round and the medians. Both trees must offer ``cxr_triage.api.Triage.predict_many`` (every version since
issue 6 does). The shipped bundle of each tree is used.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"
ONE_ROUND = """
import sys, time
from importlib import resources
from pathlib import Path
from cxr_triage.api import Triage
heat = sys.argv[1] == "1"
folder = Path(str(resources.files("cxr_triage") / "assets" / "samples"))
files = sorted(p for p in folder.iterdir() if p.is_file()) * 12
t = Triage()
list(t.predict_many(files[:32], heatmaps=heat))
t0 = time.perf_counter()
n = sum(1 for _ in t.predict_many(files, heatmaps=heat))
print(n / (time.perf_counter() - t0))
"""


def one_round(src: Path, heatmaps: bool) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", ONE_ROUND, "1" if heatmaps else "0"], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", type=Path, required=True, help="the other tree's src/ folder")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    trees = {"this": HERE, "other": args.other.resolve()}
    results: dict[str, dict[bool, list[float]]] = {name: {False: [], True: []} for name in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            for heat in (False, True):
                results[name][heat].append(one_round(trees[name], heat))
            print(f"round {r + 1} {name}: {results[name][False][-1]:.1f} img/s, heatmaps {results[name][True][-1]:.1f}")
    for name, src in trees.items():
        plain, heat = results[name][False], results[name][True]
        print(
            f"{name} ({src}): median {statistics.median(plain):.1f} img/s ({min(plain):.1f}-{max(plain):.1f}), "
            f"heatmaps {statistics.median(heat):.1f} ({min(heat):.1f}-{max(heat):.1f})"
        )


if __name__ == "__main__":
    main()
