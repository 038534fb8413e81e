"""Leave-one-site-out matrix: every site held out in turn, inside federation then routing.

For each site S: ``fit --config INSIDE --data.outside [S]`` trains the federation without S
and writes its ``routing_space.pt``; ``fit --config OUTSIDE --data.outside [S]
--model.routing_space FILE`` fits the routing on S's unlabelled images and scores every model
on S. The rows of all sites go into one ``results.csv`` / ``results.md`` (site x method, Dice
and HD95, mean over sites) in ``--out``. A site whose ``SITE/results.csv`` exists is read back,
not rerun, so an interrupted matrix resumes; the texts of both configs and the arguments after
``--`` (``SITE/settings.json``) must be this command's, else it is refused naming the folder.
Arguments after ``--`` go to both fits::

    python -m iopfl_lightning.tools.loso --inside experiments/prostate/inside.yaml \\
        --outside experiments/prostate/outside.yaml --out runs/prostate_loso \\
        -- --data.root /data/Prostate/preprocessed

Both configs must log with a logger whose ``save_dir`` can be set (e.g. CSVLogger).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import yaml

from iopfl_lightning.cli import main as cli_main
from iopfl_lightning.fileio import atomic_write_text
from iopfl_lightning.results import write_results

log = logging.getLogger(__name__)


def config_sites(config: str | Path) -> list[str]:
    """The ``data.sites`` list of a config (None or absent: ask for ``--sites``)."""
    sites = (yaml.safe_load(Path(config).read_text()).get("data") or {}).get("sites")
    if not sites:
        raise ValueError(f"{config} lists no data.sites; pass --sites")
    return list(sites)


def _fit(config: str, folder: Path, extra: Sequence[str]):
    """One CLI fit (+ test) writing into ``folder``; returns the CLI object."""
    return cli_main(["fit", "--config", config, *extra,
                     "--trainer.default_root_dir", str(folder),
                     "--trainer.logger.init_args.save_dir", str(folder)])


def _read_rows(path: Path) -> list[dict]:
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["dice"], row["hd95"], row["cases"] = float(row["dice"]), float(row["hd95"]), int(row["cases"])
    return rows


SETTINGS = "settings.json"


def save_settings(folder: Path, settings: dict) -> None:
    """What a run was made with, beside its results (checked before they are reused)."""
    atomic_write_text(folder / SETTINGS, json.dumps(settings, indent=1, sort_keys=True) + "\n")


def check_same_settings(folder: Path, settings: dict) -> None:
    """Refuse to reuse ``folder``'s results for other settings (they would be reported as
    this command's)."""
    path = folder / SETTINGS
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved != json.loads(json.dumps(settings)):
        what = "were made with other settings" if saved is not None else f"have no {SETTINGS}"
        raise ValueError(f"{folder}: the results there {what} than this command's (config, "
                         "arguments after --); use another --out, or remove that folder to "
                         "run it again")


def run_site(site: str, inside: str, outside: str, out: Path, extra: Sequence[str]) -> list[dict]:
    """Inside fit without ``site``, then routing on ``site``; returns the outside rows."""
    done = out / site / "results.csv"
    settings = {"inside": Path(inside).read_text(), "outside": Path(outside).read_text(),
                "extra": list(extra)}
    if done.is_file():
        check_same_settings(out / site, settings)
        log.info("%s: reusing %s", site, done)
        return _read_rows(done)
    (out / site).mkdir(parents=True, exist_ok=True)
    save_settings(out / site, settings)
    held = ["--data.outside", f"[{site}]"]
    cli = _fit(inside, out / site / "inside", [*held, *extra])
    space = Path(cli.trainer.log_dir) / "routing_space.pt"
    cli = _fit(outside, out / site / "outside", [*held, "--model.routing_space", str(space), *extra])
    shutil.copyfile(Path(cli.trainer.log_dir) / "results.csv", done)
    return _read_rows(done)


def run_matrix(inside: str, outside: str, out: str | Path, sites: Sequence[str] | None = None,
               extra: Sequence[str] = ()) -> list[dict]:
    """Hold out every site of ``sites`` (default: the inside config's) in turn; write the table."""
    out = Path(out)
    rows: list[dict] = []
    for site in sites or config_sites(inside):
        rows += run_site(site, inside, outside, out, extra)
    write_results(rows, out, title="Leave-one-site-out outside personalization")
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inside", required=True, help="inside (federation) config")
    parser.add_argument("--outside", required=True, help="outside (routing) config")
    parser.add_argument("--out", required=True, help="output folder of the matrix")
    parser.add_argument("--sites", nargs="+", help="sites to hold out (default: data.sites)")
    parser.add_argument("extra", nargs="*", help="after --: arguments for both fits")
    args = parser.parse_args(argv)
    return run_matrix(args.inside, args.outside, args.out, args.sites, args.extra)


if __name__ == "__main__":
    main()
