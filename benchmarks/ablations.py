"""Short side-by-side training runs: recipe ablations and the Lung Opacity learning curve.

Every variant is one `cxr-triage train` run with the same short schedule (SHORT below) plus its own overrides, so
the runs differ only in what the table names. Selection uses validation metrics only (the test split is not read).

    python benchmarks/ablations.py recipe              # equalisation x degradation augmentation, 128 px
    python benchmarks/ablations.py lo-curve            # Lung Opacity training fraction 0.25 / 0.5 / 0.75 / 1.0
    python benchmarks/ablations.py lo-curve --base preprocess.equalize=false   # on top of a chosen recipe

Runs that already finished (runs/<name>/best.pt) are not repeated. The table goes to benchmarks/ablations-<set>.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

SHORT = [
    "preprocess.size=128",
    "trainer.max_epochs=5",
    "trainer.patience=99",
    "data.epoch_samples=5000",
    "trainer.progress_bar=false",
]
NO_DEGRADE = ["augment.blur_p=0", "augment.downscale_p=0", "augment.jpeg_p=0"]
SETS: dict[str, dict[str, list[str]]] = {
    "recipe": {
        "eq+degrade (session-1 recipe)": [],
        "no-eq+degrade": ["preprocess.equalize=false"],
        "eq, no degrade": NO_DEGRADE,
        "no-eq, no degrade": ["preprocess.equalize=false", *NO_DEGRADE],
    },
    "lo-curve": {f"lung_opacity x{f}": [f"data.class_fraction={{lung_opacity: {f}}}"] for f in (0.25, 0.5, 0.75, 1.0)},
}


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in text).strip("-").lower()


def best_row(run_dir: Path) -> dict:
    hist = pd.read_csv(run_dir / "history.csv")
    row = hist.loc[hist["val_macro_f1"].idxmax()]
    return {
        "best epoch": int(row["epoch"]),
        "val acc": round(float(row["val_acc"]), 4),
        "val macro-F1": round(float(row["val_macro_f1"]), 4),
        **{
            f"F1 {c}": round(float(row[f"val_f1_{c}"]), 3)
            for c in ("covid", "lung_opacity", "normal", "viral_pneumonia")
        },
        "img/s": round(float(hist["train_img_per_s"].median()), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("set", choices=sorted(SETS))
    ap.add_argument("--base", nargs="*", default=[], help="extra overrides applied to every variant")
    ap.add_argument("--prefix", default="abl", help="run-name prefix under runs/")
    args = ap.parse_args()
    rows = []
    for label, extra in SETS[args.set].items():
        name = f"{args.prefix}-{args.set}-{slug(label)}"
        run_dir = Path("runs") / name
        if not (run_dir / "best.pt").exists():
            cmd = ["cxr-triage", "train", f"name={name}", *SHORT, *args.base, *extra]
            print("$", " ".join(cmd), flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True)
            print(f"{name}: {time.time() - t0:.0f} s", flush=True)
        rows.append({"variant": label, **best_row(run_dir)})
    table = pd.DataFrame(rows)
    out = Path(__file__).with_name(f"ablations-{args.set}.md")
    header = (
        f"# Ablations: {args.set}\n\nCommand: `python benchmarks/ablations.py {args.set}"
        + (f" --base {' '.join(args.base)}" if args.base else "")
        + f"`\n\nShort schedule for every row: `{' '.join(SHORT)}`"
        + (f" plus `{' '.join(args.base)}`" if args.base else "")
        + ". Validation split only.\n\n"
    )
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in table.itertuples(index=False)]
    out.write_text(header + "\n".join(lines) + "\n")
    print(table.to_string(index=False))
    sys.exit(0)


if __name__ == "__main__":
    main()
