"""Exploratory data analysis of a manifest: PNG figures, tables and one self-contained HTML report.

``run_eda(manifest_csv, out_dir)`` writes the figures, ``counts.csv`` (class x split), ``summary.json`` and
``report.html`` (figures embedded as data URIs, so the file stands alone). Sizes, means, origins and duplicate
groups come from the manifest; only the few sample and duplicate images on show are opened.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from cxr_triage.core.classes import CLASS_IDS, DISPLAY_NAMES
from cxr_triage.core.preprocess import ImageReadError, load_grey
from cxr_triage.data.manifest import atomic_write_text, load_manifest

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SAMPLES_PER_CLASS = 6  # also the most images shown of one duplicate group
DUP_GROUPS_SHOWN = 6
DUP_GROUPS_LISTED = 25
THUMB_PX = 256
SEED = 0
CLASS_COLORS = dict(zip(CLASS_IDS, ("#d62728", "#ff7f0e", "#2ca02c", "#1f77b4"), strict=True))
ImageRow = tuple[str, list[tuple[str, str]]]  # (row label, [(image path, caption)])


def _figure(width: float, height: float) -> Figure:
    """A figure drawn by the Agg canvas, without touching pyplot's global backend or state."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _present(df: pd.DataFrame) -> list[str]:
    """Class ids that occur in the manifest, in CLASS_IDS order."""
    return [c for c in CLASS_IDS if c in set(df["label"])]


def _names(ids: list[str] | pd.Index) -> list[str]:
    return [DISPLAY_NAMES.get(c, str(c)) for c in ids]


def split_table(df: pd.DataFrame) -> pd.DataFrame:
    """Images per class (rows, all CLASS_IDS) and split (columns train/val/test, any others, total)."""
    splits = list(SPLITS) + sorted(set(df["split"].astype(str)) - set(SPLITS))
    table = pd.crosstab(df["label"], df["split"].astype(str))
    table = table.reindex(index=list(CLASS_IDS), columns=splits, fill_value=0).astype(int)
    table["total"] = table.sum(axis=1)
    table.index.name, table.columns.name = "label", None
    return table


def by_class(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Images per value of ``column`` (rows) and present class (columns, display names)."""
    table = pd.crosstab(df[column].astype(str), df["label"]).reindex(columns=_present(df), fill_value=0)
    table.columns = _names(table.columns)
    table.index.name, table.columns.name = column, None
    return table


def duplicate_groups(df: pd.DataFrame) -> pd.DataFrame:
    """One row per duplicate group (more than one file): size, classes, splits, exact (byte-identical)."""
    dups = df[df["group"].map(df["group"].value_counts()) > 1]
    if dups.empty:
        return pd.DataFrame(columns=["group", "files", "classes", "splits", "exact", "names"])
    joined = ", ".join
    table = dups.groupby("group").agg(
        files=("path", "size"),
        classes=("label", lambda s: joined(_names(sorted(set(s))))),
        splits=("split", lambda s: joined(sorted(set(s)))),
        exact=("sha256", lambda s: s.nunique() == 1),
        names=("path", lambda s: joined(Path(p).name for p in s)),
    )
    return table.reset_index().sort_values(["files", "group"], ascending=[False, True], kind="stable")


def mix_notes(df: pd.DataFrame, column: str, unit: str = "") -> list[str]:
    """One line per present class: the shares of each value of ``column``, largest first."""
    notes = []
    for c in _present(df):
        share = df.loc[df["label"] == c, column].astype(str).value_counts(normalize=True)
        parts = [f"{v * 100:.0f}% {k}{unit}" for k, v in share.items() if k != ""]
        notes.append(f"{DISPLAY_NAMES[c]}: {', '.join(parts) or 'unknown'}")
    return notes


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in values.value_counts().sort_index().items()}


def summarise(df: pd.DataFrame, groups: pd.DataFrame) -> dict:
    """Counts for summary.json: images, classes, splits, origins, copy_px and duplicate groups."""
    dup_files = df[df["group"].isin(groups["group"])]
    return {
        "n_images": len(df),
        "classes": {c: int((df["label"] == c).sum()) for c in CLASS_IDS},
        "splits": {k: int(v) for k, v in split_table(df).drop(columns="total").sum().items()},
        "origins": _counts(df["origin"]),
        "copy_px": _counts(df.loc[df["copy_px"] != "", "copy_px"]),
        "duplicates": {
            "groups": len(groups),
            "files": len(dup_files),
            "exact_groups": int((df["sha256"].value_counts() > 1).sum()),
            "by_class": {c: int((dup_files["label"] == c).sum()) for c in CLASS_IDS},
            "cross_class_groups": int(groups["classes"].str.contains(",").sum()),
            "cross_split_groups": int(groups["splits"].str.contains(",").sum()),
        },
    }


def plot_class_counts(df: pd.DataFrame) -> Figure:
    """Bar chart and pie chart of images per class."""
    counts = df["label"].value_counts().reindex(list(CLASS_IDS), fill_value=0)
    fig = _figure(11, 4.2)
    ax_bar, ax_pie = fig.subplots(1, 2)
    bars = ax_bar.bar(_names(counts.index), counts.to_numpy(), color=[CLASS_COLORS[c] for c in CLASS_IDS])
    ax_bar.bar_label(bars, padding=2)
    ax_bar.set(ylabel="images", title="Images per class")
    ax_bar.margins(y=0.12)
    nz = counts[counts > 0]
    ax_pie.pie(
        nz.to_numpy(),
        labels=_names(nz.index),
        colors=[CLASS_COLORS[c] for c in nz.index],
        autopct="%1.1f%%",
        startangle=90,
        counterclock=False,
        wedgeprops={"edgecolor": "white"},
    )
    ax_pie.set_title("Share of images per class")
    return fig


def _stacked_bars(ax: Axes, table: pd.DataFrame, title: str, percent: bool) -> None:
    """Horizontal stacked bars: a bar per row, a segment per column, labelled where wide enough."""
    share = table.div(table.sum(axis=1).replace(0, 1), axis=0)
    data = share * 100 if percent else table
    width = share if percent else table / max(table.sum(axis=1).max(), 1)  # fraction of the axis
    left = np.zeros(len(data))
    for i, col in enumerate(data.columns):
        vals = data[col].to_numpy(float)
        bars = ax.barh(list(data.index), vals, left=left, label=str(col), color=f"C{i % 10}")
        text = [f"{v:.0f}%" if percent else f"{v:.0f}" for v in vals]
        ax.bar_label(
            bars,
            labels=[t if w >= 0.07 else "" for t, w in zip(text, width[col], strict=True)],
            label_type="center",
            fontsize=8,
            color="white",
        )
        left += vals
    ax.invert_yaxis()
    ax.set(title=title, xlabel="% of the class" if percent else "images")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


def plot_splits(df: pd.DataFrame) -> Figure:
    """Images per class stacked by split, as counts and as shares."""
    table = split_table(df).drop(columns="total").loc[_present(df)]
    table.index = _names(table.index)
    fig = _figure(12, 1.0 + 0.55 * len(table) + 1.5)
    ax_n, ax_p = fig.subplots(1, 2)
    _stacked_bars(ax_n, table, "Images per class and split", percent=False)
    _stacked_bars(ax_p, table, "Split shares within each class", percent=True)
    return fig


def plot_origins(df: pd.DataFrame) -> Figure:
    """Origin x class heatmap of counts, and the origin mix of each class as 100% bars."""
    table = by_class(df, "origin")
    fig = _figure(13, 2.5 + 0.45 * max(len(table), len(table.columns)))
    ax_h, ax_s = fig.subplots(1, 2)
    values = table.to_numpy()
    ax_h.imshow(values, cmap="Blues", aspect="auto", vmin=0)
    ax_h.set_xticks(range(len(table.columns)), labels=[c.replace(" ", "\n") for c in table.columns])
    ax_h.set_yticks(range(len(table.index)), labels=table.index)
    for (i, j), v in np.ndenumerate(values):
        ax_h.text(j, i, str(v), ha="center", va="center", color="white" if v > values.max() / 2 else "black")
    ax_h.set_title("Images per origin and class")
    _stacked_bars(ax_s, table.T, "Origin mix of each class", percent=True)
    return fig


def plot_sizes(df: pd.DataFrame) -> Figure:
    """Box plots of image width and height per class, and copy_px shares per class where it is known."""
    present, has_copy = _present(df), bool((df["copy_px"] != "").any())
    fig = _figure(17 if has_copy else 11, 4.0)
    axes = fig.subplots(1, 3 if has_copy else 2, width_ratios=[1, 1, 1.5] if has_copy else None)
    for ax, col in zip(axes, ("width", "height"), strict=False):
        values = [df.loc[df["label"] == c, col].to_numpy(float) for c in present]
        ax.boxplot(values, tick_labels=_names(present))
        for i, v in enumerate(values, start=1):
            if len(v) and v.min() == v.max():  # a flat box is easy to miss: say it
                ax.annotate(f"all {v[0]:.0f}", (i, v[0]), (0, 6), textcoords="offset points", ha="center")
        ax.set(title=f"Image {col} per class (px)", ylabel="px")
    if has_copy:
        table = by_class(df[df["copy_px"] != ""], "copy_px").T
        table.columns = [f"{c} px" for c in table.columns]
        _stacked_bars(axes[2], table, "Resize history: copy_px (size of the copy rebuilt from)", percent=True)
    return fig


def plot_intensity(df: pd.DataFrame) -> Figure:
    """Mean grey level per image, per class: box plots and overlaid histograms."""
    present = _present(df)
    values = [df.loc[df["label"] == c, "mean"].to_numpy(float) for c in present]
    fig = _figure(12, 4.0)
    ax_b, ax_h = fig.subplots(1, 2)
    ax_b.boxplot(values, tick_labels=_names(present))
    ax_b.set(title="Mean intensity per image", ylabel="mean grey level (0-255)")
    bins = np.linspace(0, 255, 52)
    for c, v in zip(present, values, strict=True):
        ax_h.hist(
            v,
            bins=bins,
            density=True,
            histtype="step",
            linewidth=1.6,
            color=CLASS_COLORS[c],
            label=DISPLAY_NAMES[c],
        )
    ax_h.set(title="Distribution of mean intensity", xlabel="mean grey level (0-255)", ylabel="density")
    ax_h.legend(fontsize=8, frameon=False)
    return fig


def _thumbnail(path: str) -> np.ndarray | None:
    """A grey thumbnail of an image file, or None (with a warning) when it cannot be read."""
    try:
        im = Image.fromarray(load_grey(path))
    except (ImageReadError, OSError) as exc:
        log.warning("cannot show %s in the EDA report: %s", path, exc)
        return None
    im.thumbnail((THUMB_PX, THUMB_PX))
    return np.asarray(im)


def plot_image_rows(rows: list[ImageRow], ncols: int) -> Figure:
    """A grid of images, one labelled row per entry; unreadable files show a placeholder."""
    fig = _figure(1.75 * ncols + 0.6, 2.0 * len(rows))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for ax_row, (label, items) in zip(axes, rows, strict=True):
        for ax, item in zip(ax_row, items + [None] * (ncols - len(items)), strict=True):
            ax.set(xticks=[], yticks=[])
            if item is None:
                ax.set_axis_off()
                continue
            img = _thumbnail(item[0])
            if img is None:
                ax.set_facecolor("#eeeeee")
                ax.text(0.5, 0.5, "image\nmissing", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            ax.set_title(item[1], fontsize=7)
        ax_row[0].set_ylabel(label, fontsize=9)
    return fig


def sample_rows(df: pd.DataFrame, k: int = SAMPLES_PER_CLASS, seed: int = SEED) -> list[ImageRow]:
    """k random images per present class (fixed seed), captioned with file name and split."""
    rows = []
    for c in _present(df):
        sub = df[df["label"] == c]
        sub = sub.sample(n=min(k, len(sub)), random_state=seed)
        rows.append(
            (
                DISPLAY_NAMES[c],
                [
                    (p, f"{Path(n).name}\n{s}")
                    for p, n, s in zip(sub["abspath"], sub["path"], sub["split"], strict=True)
                ],
            )
        )
    return rows


def duplicate_rows(df: pd.DataFrame, groups: pd.DataFrame) -> list[ImageRow]:
    """The largest group of each label mix, then the largest others; one row each, with class, split, name."""
    shown = pd.concat([groups.drop_duplicates("classes"), groups]).drop_duplicates("group")
    shown = shown.head(DUP_GROUPS_SHOWN).sort_values(["files", "group"], ascending=[False, True])
    rows = []
    for g in shown.itertuples():
        members = df[df["group"] == g.group].head(SAMPLES_PER_CLASS)
        items = [
            (r.abspath, f"{DISPLAY_NAMES.get(r.label, r.label)} · {r.split}\n{Path(r.path).name}")
            for r in members.itertuples()
        ]
        rows.append((f"group {g.group}\n{g.files} files", items))
    return rows


def _make_figures(df: pd.DataFrame, groups: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """Draw every figure into out_dir; returns name -> PNG path."""
    figs = {
        "class_counts": plot_class_counts(df),
        "splits": plot_splits(df),
        "origins": plot_origins(df),
        "sizes": plot_sizes(df),
        "intensity": plot_intensity(df),
    }
    figs["samples"] = plot_image_rows(sample_rows(df), SAMPLES_PER_CLASS)
    if len(groups):
        rows = duplicate_rows(df, groups)
        figs["duplicates"] = plot_image_rows(rows, max(len(items) for _, items in rows))
    for name, fig in figs.items():
        fig.savefig(out_dir / f"{name}.png", format="png")
    return {name: out_dir / f"{name}.png" for name in figs}


def _html_table(table: pd.DataFrame, index: bool = True) -> dict:
    """A DataFrame as {'columns': [...], 'rows': [[...]]} for the template (which escapes every cell)."""
    frame = table.reset_index() if index else table
    return {"columns": [str(c) for c in frame.columns], "rows": frame.astype(str).to_numpy().tolist()}


def _tables(df: pd.DataFrame, groups: pd.DataFrame) -> dict[str, dict]:
    """Every table the report shows."""
    counts = split_table(df)
    counts.loc["total"] = counts.sum()
    counts.index = pd.Index(_names(counts.index[:-1]) + ["total"], name="class")
    sizes = df.groupby("label")[["width", "height", "mean"]].agg(["min", "median", "max"])
    sizes = sizes.reindex(_present(df)).map(lambda v: f"{v:.4g}")
    sizes.columns = [f"{col} {stat}" for col, stat in sizes.columns]
    sizes.index = pd.Index(_names(sizes.index), name="class")
    listed = groups.head(DUP_GROUPS_LISTED).assign(exact=lambda t: t["exact"].map({True: "yes", False: "no"}))
    tables = {"counts": counts, "origins": by_class(df, "origin"), "sizes": sizes}
    if (df["copy_px"] != "").any():
        tables["copy_px"] = by_class(df[df["copy_px"] != ""], "copy_px")
    out = {name: _html_table(t) for name, t in tables.items()}
    out["duplicates"] = _html_table(listed, index=False)
    return out


def template_env() -> jinja2.Environment:
    """The Jinja2 environment of the package's HTML templates (shared by the EDA and evaluation reports)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("cxr_triage", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_report(figures: dict[str, Path], summary: dict, **context: object) -> str:
    """Render the self-contained HTML report from the package template, with the figures embedded."""
    env = template_env()
    images = {
        name: "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii") for name, p in figures.items()
    }
    return env.get_template("eda.html.j2").render(
        summary=summary,
        images=images,
        names=DISPLAY_NAMES,
        dup_listed=DUP_GROUPS_LISTED,
        dup_shown=min(DUP_GROUPS_SHOWN, summary["duplicates"]["groups"]),
        **context,
    )


def run_eda(manifest_csv: Path, out_dir: Path) -> Path:
    """Write EDA figures, counts.csv, summary.json and report.html for a manifest; returns the report path."""
    start = time.perf_counter()
    manifest_csv, out_dir = Path(manifest_csv), Path(out_dir)
    df = load_manifest(manifest_csv)
    df[["origin", "copy_px"]] = df[["origin", "copy_px"]].astype(str)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = duplicate_groups(df)
    summary = {"manifest": str(manifest_csv.resolve()), **summarise(df, groups)}
    figures = _make_figures(df, groups, out_dir)
    summary["figures"] = [p.name for p in figures.values()]
    atomic_write_text(out_dir / "counts.csv", split_table(df).to_csv(lineterminator="\n"))
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    notes = {"origin": mix_notes(df, "origin"), "copy_px": mix_notes(df, "copy_px", " px")}
    html = render_report(
        figures,
        summary,
        tables=_tables(df, groups),
        notes=notes,
        title=f"Dataset report: {manifest_csv.name}",
    )
    report = out_dir / "report.html"
    atomic_write_text(report, html)
    log.info("EDA of %d images written to %s in %.1f s", len(df), report, time.perf_counter() - start)
    return report
