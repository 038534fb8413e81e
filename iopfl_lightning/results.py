"""The results contract: ``results.csv`` / ``results.md`` in the run folder, and the console table.

Rows have at least ``site, model, dice, hd95`` (foreground Dice per case and HD95 per case in
pixels, each averaged over the cases of the site), plus ``cases``. The markdown table adds a
``mean`` row per model over the sites every model was scored on.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

from iopfl_lightning.fileio import atomic_write_text

log = logging.getLogger(__name__)
COLUMNS = ("site", "model", "dice", "hd95", "cases")


def rows_to_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    extra = [k for k in rows[0] if k not in COLUMNS] if rows else []
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, *extra], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    return buffer.getvalue()


def _fmt(value):
    return f"{value:.6f}" if isinstance(value, float) else value


def shared_sites(rows: Sequence[dict]) -> list[str]:
    """Sites every model was scored on. Means are taken over these only: an inside run with a
    held-out site scores the global model there but no personalized copy, and a mean over each
    model's own sites would compare the models on different sites."""
    models = set(r["model"] for r in rows)
    scored: dict[str, set] = {}
    for r in rows:
        scored.setdefault(r["site"], set()).add(r["model"])
    return [site for site, seen in scored.items() if seen == models]


def model_means(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean Dice and HD95 of each model over the :func:`shared_sites` (NaN entries skipped)."""
    sites = set(shared_sites(rows))
    out: dict[str, dict[str, float]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r["site"] in sites]
        out[model] = {m: _nanmean([float(r[m]) for r in mine]) for m in ("dice", "hd95")}
    return out


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def rows_to_markdown(rows: Sequence[dict]) -> str:
    """A site x model table with Dice and HD95 side by side, plus the mean over sites."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    sites = list(dict.fromkeys(r["site"] for r in rows))
    lookup = {(r["site"], r["model"]): r for r in rows}
    header = "| site | " + " | ".join(f"{m} Dice | {m} HD95" for m in models) + " |"
    rule = "|---|" + "---:|---:|" * len(models)
    lines = [header, rule]
    for site in sites:
        cells = []
        for m in models:
            r = lookup.get((site, m))
            cells += ["-", "-"] if r is None else [f"{r['dice']:.4f}", f"{r['hd95']:.2f}"]
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    means, shared = model_means(rows), shared_sites(rows)
    cells = [f"**{means[m]['dice']:.4f}** | **{means[m]['hd95']:.2f}**" for m in models]
    label = "**mean**" if len(shared) == len(sites) else f"**mean over {', '.join(shared)}**"
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: Sequence[dict], folder: str | os.PathLike, title: str = "") -> Path:
    """Writes results.csv and results.md atomically into ``folder`` and logs the table."""
    if not rows:
        raise ValueError("no results to write")
    folder = Path(folder)
    atomic_write_text(folder / "results.csv", rows_to_csv(rows))
    table = rows_to_markdown(rows)
    heading = f"# {title}\n\n" if title else ""
    note = (
        "\nForeground Dice per case (slices of a case pooled) and HD95 per case in pixels, "
        "averaged over the cases of each site; test split.\n"
    )
    atomic_write_text(folder / "results.md", heading + table + note)
    log.info("results written to %s\n%s", folder / "results.md", table)
    return folder / "results.csv"
