"""The comparison table: per-run result rows -> site x method, mean and std over seeds.

Input rows (one per run, site and evaluated model) carry ``method`` (the run's label),
``seed``, ``site``, ``model``, ``dice``, ``hd95``. For each method the *deployed* model is the one
the method puts at a site (``personalized`` where the method keeps a per-site model, else
``global``); the markdown table and the charts show that one, the CSV keeps every model.
Over sites: each seed's mean over sites first, then mean and std over seeds (so the std is the
spread between runs, not between sites); the sites are those every method's deployed model was
scored on (a held-out site has a global row only), named in the row when some are left out.
Std is the sample std (n - 1); NaN with one seed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from iopfl_lightning.fileio import atomic_write_text
from iopfl_lightning.results import shared_sites
from iopfl_lightning.viz import save_figure, site_bar_chart

log = logging.getLogger(__name__)
MEAN = "mean"
METRICS = ("dice", "hd95")


def summarize(rows: Sequence[dict], deployed: dict[str, str]) -> pd.DataFrame:
    """Long table: method, model, site (plus ``mean``), ``{metric}_mean``/``_std``, seeds,
    deployed (bool). ``deployed`` maps a method label to its deployed model name."""
    runs = pd.DataFrame(list(rows))
    per_site = runs[["method", "model", "seed", "site", *METRICS]]
    chosen = {m: _deployed_model(deployed.get(m), set(part["model"]))
              for m, part in per_site.groupby("method", sort=False)}
    shown = per_site[[chosen[m] == model for m, model
                      in zip(per_site["method"], per_site["model"], strict=True)]]
    # the mean over the sites every deployed model was scored on (a held-out site has a
    # global row but no personalized one): the methods are compared on the same sites
    shared = shared_sites([{"site": site, "model": method}
                           for method, site in zip(shown["method"], shown["site"], strict=True)])
    over_sites = per_site[per_site["site"].isin(shared)].groupby(
        ["method", "model", "seed"], sort=False)[list(METRICS)].mean()
    over_sites = over_sites.reset_index().assign(site=MEAN)
    both = pd.concat([per_site, over_sites], ignore_index=True)
    grouped = both.groupby(["method", "model", "site"], sort=False)
    table = grouped[list(METRICS)].agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table["seeds"] = grouped["seed"].nunique()
    table = table.reset_index()
    table["deployed"] = [chosen[m] == model
                         for m, model in zip(table["method"], table["model"], strict=True)]
    table.attrs["mean_sites"] = shared
    return table


def _deployed_model(wanted: str | None, present: set[str]) -> str:
    """``personalized`` where the runs kept a per-site model (a method's own copy, or per-site
    normalization with ``norm_policy: local``), else the method's own choice if evaluated, else
    ``global``."""
    if "personalized" in present and wanted in (None, "global", "personalized"):
        return "personalized"
    return wanted if wanted in present else "global"


def _cell(mean: float, std: float, digits: int) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def to_markdown(table: pd.DataFrame) -> str:
    """Two site x method tables (Dice, HD95) of the deployed models, ``mean ± std`` over seeds."""
    shown = table[table["deployed"]]
    methods = list(dict.fromkeys(shown["method"]))
    sites = [s for s in dict.fromkeys(shown["site"]) if s != MEAN] + [MEAN]
    lookup = {(r.method, r.site): r for r in shown.itertuples()}
    shared = table.attrs.get("mean_sites")
    mean_name = ("**mean over sites**" if shared is None or len(shared) == len(sites) - 1
                 else f"**mean over {', '.join(shared)}**")
    out = []
    for metric, title, digits in (("dice", "Foreground Dice per case", 4), ("hd95", "HD95 (px)", 2)):
        out += [f"### {title}", "", "| site | " + " | ".join(methods) + " |",
                "|---|" + "---:|" * len(methods)]
        for site in sites:
            cells = []
            for m in methods:
                r = lookup.get((m, site))
                cell = "-" if r is None else _cell(getattr(r, f"{metric}_mean"),
                                                   getattr(r, f"{metric}_std"), digits)
                cells.append(f"**{cell}**" if site == MEAN else cell)
            name = mean_name if site == MEAN else site
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot_sites(table: pd.DataFrame, folder: Path) -> list[Path]:
    """One PNG per site (and for the mean): Dice and HD95 bars per method, std as error bars
    (drawn by :func:`iopfl_lightning.viz.site_bar_chart`, as the run folder's chart is)."""
    shown = table[table["deployed"]].rename(columns={f"{m}_mean": m for m in METRICS})
    paths = []
    for site, part in shown.groupby("site", sort=False):
        fig = site_bar_chart(part.to_dict("records"), metric=METRICS, group="method",
                             error="{metric}_std", add_mean=False, title=str(site))
        paths.append(save_figure(fig, folder / f"compare_{_safe(site)}.png"))
    return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def write_comparison(rows: Sequence[dict], deployed: dict[str, str], out: Path, note: str = "",
                     ) -> pd.DataFrame:
    """Writes ``compare.csv``, ``compare.md`` and ``plots/compare_<site>.png`` into ``out``."""
    table = summarize(rows, deployed)
    atomic_write_text(out / "compare.csv", table.to_csv(index=False, float_format="%.6f"))
    markdown = to_markdown(table)
    atomic_write_text(out / "compare.md", f"# Inside methods compared\n\n{markdown}\n{note}\n")
    plot_sites(table, out / "plots")
    log.info("comparison written to %s\n%s", out / "compare.md", markdown)
    return table
