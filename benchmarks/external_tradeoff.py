"""What trade-offs between COVID-19 recall and No-finding called normal a bundle can make on labelled images of other
hospitals (issue 22's external target): a shift added to the COVID-19 log-probability of every image, from -4 to +4
in steps of 0.25, and the Pareto front of (COVID-19 called COVID-19, normal called normal) over those shifts.

A diagnostic, not a way to choose: a bundle's decision point is fitted on validation. The front says whether any
point would meet a target, i.e. whether the network ranks the other hospitals' COVID-19 images above their normals
well enough, or whether only a different threshold is missing.

Usage: python benchmarks/external_tradeoff.py EVAL_DIR [EVAL_DIR ...]
       (EVAL_DIR: the --out folder of `cxr-triage evaluate --data ../shared/data/external`, with predictions.csv)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_triage.core.classes import CLASS_IDS

SHIFTS = np.arange(-4.0, 4.0 + 1e-9, 0.25)


def tradeoffs(predictions: pd.DataFrame) -> list[tuple[int, int]]:
    """(COVID-19 recall count, normal-called-normal count) for each shift of the COVID-19 log-probability."""
    p = predictions[predictions["true"].isin(["covid", "normal"])]
    logp = np.log(p[[f"p_{c}" for c in CLASS_IDS]].to_numpy(np.float64) + 1e-12)
    y = p["true"].to_numpy()
    covid = CLASS_IDS.index("covid")
    points = []
    for shift in SHIFTS:
        shifted = logp.copy()
        shifted[:, covid] += shift
        pred = np.asarray(CLASS_IDS)[shifted.argmax(1)]
        points.append((int((pred[y == "covid"] == "covid").sum()), int((pred[y == "normal"] == "normal").sum())))
    return points


def pareto(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The points no other point matches or beats on both counts, by COVID-19 count."""
    unique = sorted(set(points))
    return [a for a in unique if not any(b != a and b[0] >= a[0] and b[1] >= a[1] for b in unique)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_dirs", nargs="+", type=Path)
    args = ap.parse_args()
    for d in args.eval_dirs:
        p = pd.read_csv(d / "predictions.csv")
        n_covid, n_normal = int((p["true"] == "covid").sum()), int((p["true"] == "normal").sum())
        front = " ".join(f"({c}, {n})" for c, n in pareto(tradeoffs(p)))
        print(f"{d}: Pareto front (COVID-19 / {n_covid}, normal / {n_normal}): {front}")


if __name__ == "__main__":
    main()
