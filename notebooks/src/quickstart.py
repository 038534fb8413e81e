# Source of notebooks/quickstart.ipynb (python notebooks/build.py). Notebook style: a
# parameters cell before the imports, and expressions shown as cell outputs.
# ruff: noqa: E402, B018
# %% [markdown]
# # Quickstart: IOP-FL on generated sites
#
# Make a few synthetic hospitals, look at them, train a federation for a few rounds on the CPU
# with the Python API (`MultiSiteDataModule`, `SegmentationModule`, `FederatedTrainer`), and
# compare, site by site, the **global** model (FedAvg) with each site's **personalized** model
# (IOP-FL inside personalization: an exponential moving average of the site's local models).
#
# The defaults are tiny so the notebook runs in well under a minute. For a closer look raise
# `ROUNDS`, `SIZE` and `CASES` (`make demo` uses six sites, 16 rounds, 48 px, 6/2/4 cases).

# %%
SITES = ["BIDMC", "HK", "I2CVB", "UCL"]  # generated sites (their styles: SITE_STYLES)
SIZE = 32  # slice size in pixels
SLICES = 6  # slices per case
CASES = {"train": 4, "val": 1, "test": 2}  # cases per site and split
ROUNDS = 5  # federated rounds (one Lightning epoch each)
ALPHA = 0.1  # EMA weight of the previous personalized copy (the paper's 0.1)

# %%
# %matplotlib inline
import dataclasses
from pathlib import Path

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import pandas as pd
import torch
from lightning.pytorch.loggers import CSVLogger

from iopfl_lightning.data import MultiSiteDataModule, site_style
from iopfl_lightning.federated import FederatedTrainer
from iopfl_lightning.modules import SegmentationModule
from iopfl_lightning.viz import overlay_grid, site_bar_chart

SEED = pl.seed_everything(0)

# %% [markdown]
# ## 1. Make the sites
#
# Every generated site shares one anatomy (an organ with two unlabelled neighbours) but
# acquires and annotates it its own way: intensity curve, contrast, noise, blur, bias field,
# field of view (`zoom`) and annotation style (`mask_scale` > 1 draws generous contours, < 1
# tight ones). The same seed gives the same data. Real data uses the same datamodule with
# `format="iopfl_npy"`, `"png_slices"` or `"fundus"` and a `root` folder.

# %%
dm = MultiSiteDataModule(
    format="synthetic",
    sites=SITES,
    batch_size=4,
    normalize="zscore",  # per-slice z-score, as MRI pipelines do
    synthetic={"size": SIZE, "slices": SLICES, "cases_per_split": CASES},
)
dm.setup("fit")
pd.DataFrame({site: dataclasses.asdict(site_style(site)) for site in SITES}).T

# %% [markdown]
# ## 2. Look at them
#
# The middle slice of each site's first training case, raw intensities on one shared gray
# scale (before the z-score), with the site's annotation outlined.

# %%
fig, axes = plt.subplots(1, len(SITES), figsize=(2.4 * len(SITES), 2.6))
for ax, site in zip(axes, SITES, strict=True):
    case = dm.site_data[site]["train"][0]
    middle = case.num_slices // 2
    ax.imshow(case.image[middle, :, :, 1], cmap="gray", vmin=0, vmax=1)
    ax.contour(case.mask[middle], levels=[0.5], colors="cyan", linewidths=1.2)
    ax.set_title(site)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 3. Train a few federated rounds
#
# One Lightning epoch is one round. The training loader yields each site's batches in turn;
# `FederatedTrainer` loads the global weights when a site starts, collects its locally trained
# weights when it ends, averages the updates weighted by sample count (FedAvg) and updates
# the site's personalized copy `p = alpha * p + (1 - alpha) * w_local`. `trainer.test` then
# scores the global and every personalized model on every site's test split and writes
# `results.csv` into the run folder.

# %%
module = SegmentationModule(net="unet", features=8, loss="dice_ce", lr=2e-3, val_hd95=False)
trainer = pl.Trainer(
    max_epochs=ROUNDS,
    callbacks=[FederatedTrainer(alpha=ALPHA)],
    accelerator="cpu",
    logger=CSVLogger("runs", name="quickstart"),
    enable_checkpointing=False,
    enable_model_summary=False,
    deterministic=True,
)
trainer.fit(module, datamodule=dm)
trainer.test(module, datamodule=dm, verbose=False)
print("run folder:", trainer.log_dir)

# %% [markdown]
# ## 4. Global vs personalized, per site
#
# `module.test_results` holds the rows of `results.csv`: foreground Dice per case (all slices
# of a case pooled) and HD95 in pixels, averaged over the site's test cases.

# %%
results = pd.DataFrame(module.test_results)
results.pivot(index="site", columns="model", values=["dice", "hd95"]).round(3)

# %%
site_bar_chart(module.test_results, metric=["dice", "hd95"], title=f"after {ROUNDS} rounds")

# %% [markdown]
# ## 5. Look at the segmentations
#
# For every site, its test slice with the largest annotated area, segmented by the global
# model and by the site's personalized model. `module(image, state)` runs the network with the
# personalized weights through a functional call: nothing is copied into the module.

# %%
module.eval()
images, masks, titles = [], [], []
preds = {"global": [], "personalized": []}
with torch.no_grad():
    for site, loader in zip(dm.test_sites, dm.test_dataloader(), strict=True):
        batch = max(loader, key=lambda b: int((b["mask"] > 0).sum()))
        i = int((batch["mask"] > 0).flatten(1).sum(1).argmax())
        image = batch["image"][i : i + 1]
        images.append(image[0])
        masks.append(batch["mask"][i])
        titles.append(f"{site} case {int(batch['case'][i])}")
        preds["global"].append(module(image).argmax(1)[0])
        personal = module.personalized_states[site]
        preds["personalized"].append(module(image, personal).argmax(1)[0])

overlay_grid(
    torch.stack(images),
    torch.stack(masks),
    {name: torch.stack(p) for name, p in preds.items()},
    titles,
)

# %% [markdown]
# ## 6. The run folder
#
# `results.csv` / `results.md` hold the table above; `routing_space.pt` holds the global and
# every personalized model, which is what an unseen site needs for outside personalization
# (see `outside_site.ipynb`). `results_tables.ipynb` reads such folders back.

# %%
sorted(path.name for path in Path(trainer.log_dir).iterdir())
