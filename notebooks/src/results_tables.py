# Source of notebooks/results_tables.ipynb (python notebooks/build.py). Notebook style: a
# parameters cell before the imports, and expressions shown as cell outputs.
# ruff: noqa: E402, B018
# %% [markdown]
# # Results tables: read a run folder and a comparison back, and plot them
#
# Every `fit`/`test` writes `results.csv` (`site, model, dice, hd95, cases`: one row per site
# and evaluated model) into its run folder. The comparison tool
# (`python -m iopfl_lightning.tools.compare`) writes `compare.csv`: per method, model and site
# (plus `mean`), the mean and sample std over seeds, and which model the method deploys.
#
# Point `RUN_DIR` and `COMPARE_DIR` at your own folders (for example
# `runs/demo/version_0` and `runs/compare_cpu`). Left as `None`, the notebook first makes tiny
# ones: a two-method, two-seed comparison on three generated sites (CPU, well under a minute).
# Tiny runs are undertrained: their numbers only show the mechanics. The repository's measured
# comparison is `docs/results/compare_demo_3seeds.csv` (see `docs/methods.md`; the earlier
# 4-site table: `compare_cpu_3seeds.csv`).

# %%
RUN_DIR = None  # a run folder holding results.csv
COMPARE_DIR = None  # a folder written by iopfl_lightning.tools.compare (compare.csv)

# %%
# %matplotlib inline
from pathlib import Path

import pandas as pd
import yaml
from IPython.display import Markdown

from iopfl_lightning.results import model_means
from iopfl_lightning.tools.compare import compare
from iopfl_lightning.viz import site_bar_chart

# %% [markdown]
# ## 0. Tiny results to read (skipped when both folders are given)
#
# A federated config written from a dict, then `compare` runs FedAvg and IOP-FL with seeds 0
# and 1 through the same CLI path as `python -m iopfl_lightning.tools.compare --config
# tiny.yaml --methods fedavg iopfl --seeds 0 1 --out runs/compare_tiny`. Each run's
# `results.csv` is kept at `runs/compare_tiny/<method>/seed<seed>/results.csv`.

# %%
TINY = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu", "devices": 1, "max_epochs": 2, "deterministic": True,
        "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "limit_val_batches": 0,
        "callbacks": [{"class_path": "iopfl_lightning.federated.FederatedTrainer",
                       "init_args": {"alpha": 0.1}}],
    },
    "model": {"class_path": "iopfl_lightning.modules.SegmentationModule",
              "init_args": {"net": "unet", "features": 8, "loss": "dice_ce", "lr": 0.002,
                            "val_hd95": False}},
    "data": {"format": "synthetic", "sites": ["BIDMC", "HK", "UCL"], "batch_size": 4,
             "normalize": "zscore",
             "synthetic": {"size": 32, "slices": 4,
                           "cases_per_split": {"train": 3, "val": 1, "test": 1}}},
}
if RUN_DIR is None or COMPARE_DIR is None:
    Path("tiny.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    compare("tiny.yaml", methods=["fedavg", "iopfl"], seeds=[0, 1], out="runs/compare_tiny")
    RUN_DIR = RUN_DIR or "runs/compare_tiny/iopfl/seed0"
    COMPARE_DIR = COMPARE_DIR or "runs/compare_tiny"

# %% [markdown]
# ## 1. One run: `results.csv`

# %%
run = pd.read_csv(Path(RUN_DIR) / "results.csv")
run

# %% [markdown]
# Site x model, with the mean over the sites every model was scored on (the same table as the
# run's `results.md`):

# %%
wide = run.pivot(index="site", columns="model", values=["dice", "hd95"])
means = model_means(run.to_dict("records"))
wide.loc["mean"] = [means[model][metric] for metric, model in wide.columns]
wide.round(3)

# %%
site_bar_chart(run.to_dict("records"), metric=["dice", "hd95"], title=str(RUN_DIR))

# %% [markdown]
# ## 2. A comparison: `compare.csv`
#
# `deployed` marks the model a method puts at a site: the personalized one where the method
# keeps one per site (IOP-FL, FedBN, Ditto, ...), else the global one. The tool's own
# `compare.md` shows those, mean ± std over seeds:

# %%
table = pd.read_csv(Path(COMPARE_DIR) / "compare.csv")
Markdown((Path(COMPARE_DIR) / "compare.md").read_text())

# %%
deployed = table[table["deployed"]]
deployed.pivot(index="site", columns="method", values="dice_mean").round(3)

# %% [markdown]
# Per-site bars of the deployed models, error bars = std over seeds (the site `mean` is taken
# per seed first, so its error bar is the spread between runs, not between sites):

# %%
bars = deployed.rename(columns={"dice_mean": "dice", "hd95_mean": "hd95"})
site_bar_chart(bars.to_dict("records"), metric=["dice", "hd95"], group="method",
               error="{metric}_std", add_mean=False, title=str(COMPARE_DIR))
