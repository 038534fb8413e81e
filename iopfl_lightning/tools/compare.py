"""Compare inside methods on one config: every method x seed through the CLI, one table.

::

    python -m iopfl_lightning.tools.compare --config experiments/demo.yaml \\
        --methods fedavg fedprox fedbn iopfl --seeds 0 1 2 --out runs/compare

A method is a registered name with optional arguments, ``name:key=value,key=value`` (the label in
the table is the whole string), e.g. ``fedprox:mu=0.1`` or ``iopfl:alpha=0.5``. For each method
and seed the config is copied with the FederatedTrainer's ``method``/``method_args``/``seed``,
``seed_everything`` and the data shuffling seed set (generated synthetic data stays the same
across seeds), and run in-process with ``fit`` (+ test); its ``results.csv`` is copied to
``OUT/<method>/seed<seed>/results.csv``. A run whose copy exists is read back, not rerun, so an
interrupted comparison resumes; its settings (``settings.json``: the run's config and the
arguments after ``--``) must be this command's, else it is refused naming the folder.
Arguments after ``--`` go to every fit.

Writes ``OUT/compare.csv`` (every model), ``OUT/compare.md`` (site x method, deployed model,
mean ± std over seeds, mean over sites) and ``OUT/plots/compare_<site>.png``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from iopfl_lightning.federated.methods import METHODS
from iopfl_lightning.tools.compare_table import write_comparison
from iopfl_lightning.tools.loso import _read_rows, check_same_settings, save_settings

log = logging.getLogger(__name__)
CALLBACK = "FederatedTrainer"


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``fedprox:mu=0.1,...`` -> (``fedprox``, {``mu``: 0.1}); values are parsed as YAML, so a
    list may hold commas (``fedper:local_modules=[head,up4]``)."""
    name, _, rest = spec.partition(":")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} in {spec!r}; registered: {sorted(METHODS)}")
    args = {}
    for item in _top_level_items(rest):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method {spec!r}: expected key=value, got {item!r}")
        args[key.strip()] = yaml.safe_load(value)
    return name, args


def _top_level_items(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and braces."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item.strip()]


def run_config(config: dict, spec: str, seed: int, folder: Path) -> dict:
    """A copy of ``config`` for one method and seed, logging into ``folder``."""
    name, args = parse_method(spec)
    cfg = copy.deepcopy(config)
    trainer = cfg.setdefault("trainer", {})
    feds = [c for c in trainer.get("callbacks") or []
            if isinstance(c, dict) and str(c.get("class_path", "")).endswith(CALLBACK)]
    if len(feds) != 1:
        raise ValueError(f"the config needs exactly one {CALLBACK} callback, found {len(feds)}")
    init = feds[0].setdefault("init_args", {})
    init.update(method=name, method_args=args or None, seed=seed)
    cfg["seed_everything"] = seed
    data = cfg.setdefault("data", {})
    base_seed = data.get("seed", 0)
    data["seed"] = seed
    if data.get("format", "synthetic") == "synthetic":
        synthetic = data.get("synthetic") or {}
        data["synthetic"] = {**synthetic, "seed": synthetic.get("seed", base_seed)}
    trainer["default_root_dir"] = str(folder)
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        logger.setdefault("init_args", {}).update(save_dir=str(folder), name="")
    else:
        trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                             "init_args": {"save_dir": str(folder), "name": ""}}
    return cfg


def run_one(config: dict, spec: str, seed: int, out: Path, extra: Sequence[str]) -> list[dict]:
    """Fit + test one method and seed (or read its earlier result); rows tagged with both."""
    from iopfl_lightning.cli import main as cli_main  # heavy import, only when running

    folder = out / _label_dir(spec) / f"seed{seed}"
    done = folder / "results.csv"
    settings = {"config": run_config(config, spec, seed, folder), "extra": list(extra)}
    if done.is_file():
        check_same_settings(folder, settings)
        log.info("%s seed %d: reusing %s", spec, seed, done)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "run_config.yaml"
        path.write_text(yaml.safe_dump(settings["config"], sort_keys=False))
        save_settings(folder, settings)
        log.info("%s seed %d: fit --config %s", spec, seed, path)
        cli = cli_main(["fit", "--config", str(path), *extra])
        shutil.copyfile(Path(cli.trainer.log_dir) / "results.csv", done)
    return [{**row, "method": spec, "seed": seed} for row in _read_rows(done)]


def _label_dir(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "._-=" else "_" for c in spec)


def compare(config: str | Path, methods: Sequence[str], seeds: Sequence[int], out: str | Path,
            extra: Sequence[str] = ()) -> list[dict]:
    """Runs every method x seed and writes the comparison into ``out``; returns all rows."""
    for spec in methods:
        parse_method(spec)  # fail before the first fit
    out = Path(out)
    base = yaml.safe_load(Path(config).read_text())
    # seed-major: a partial comparison already has every method for the first seeds
    rows = [row for seed in seeds for spec in methods for row in run_one(base, spec, seed, out, extra)]
    deployed = {spec: METHODS[parse_method(spec)[0]].deployed for spec in methods}
    given = f", arguments `{' '.join(extra)}`" if extra else ""
    note = (f"Config `{config}`{given}, seeds {list(seeds)}; test split; Dice and HD95 per case "
            "averaged per site; mean ± sample std over seeds; the mean over sites is taken per "
            "seed first, over the sites every method shown was scored on. Each method's "
            "deployed model: personalized where its run kept one per site, else global.")
    write_comparison(rows, deployed, out, note=note)
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a federated (inside) experiment config")
    parser.add_argument("--methods", nargs="+", required=True, help="name[:key=value,...] each")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", required=True, help="output folder")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return compare(args.config, args.methods, args.seeds, args.out, extra)


if __name__ == "__main__":
    main()
