# Source of notebooks/outside_site.ipynb (python notebooks/build.py). Notebook style: a
# parameters cell before the imports, and expressions shown as cell outputs.
# ruff: noqa: E402, B018
# %% [markdown]
# # Outside personalization: a site that never joined the federation
#
# IOP-FL's outside personalization gives an unseen site (a new scanner) a model mixed, layer by
# layer, from the K personalized models of the federation plus the global model. A small router
# per layer maps the layer's input to mixture weights over the K + 1 expert kernels, per image.
# The routers (and the normalization affine parameters) are fitted on the new site's
# **unlabelled** images with entropy, augmentation-consistency and shape losses; its labels are
# only used afterwards, to score.
#
# This notebook trains a small federation with one site held out, builds the routed model from
# the federation's `routing_space.pt`, fits it on the held-out site, plots the routing weights,
# and shows the segmentations before and after. Defaults are tiny (CPU, well under a minute).

# %%
SITES = ["BIDMC", "HK", "I2CVB", "UCL"]
NEW_SITE = "UCL"  # held out of the federation
SIZE, SLICES = 32, 6
CASES = {"train": 4, "val": 1, "test": 2}
ROUNDS = 5  # federated rounds without NEW_SITE
PASSES = 4  # passes of the routing fit over NEW_SITE's unlabelled images

# %%
# %matplotlib inline
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import torch
from lightning.pytorch.loggers import CSVLogger

from iopfl_lightning.data import MultiSiteDataModule
from iopfl_lightning.federated import FederatedTrainer, read_routing_space
from iopfl_lightning.modules import RoutingModule, SegmentationModule
from iopfl_lightning.nets import (
    build_from_spec,
    mixture_weights,
    routed_layers,
    set_mixture_recording,
)
from iopfl_lightning.viz import overlay_grid, routing_heatmap, site_bar_chart

SEED = pl.seed_everything(0)
DATA = dict(
    format="synthetic",
    sites=SITES,
    outside=[NEW_SITE],
    batch_size=4,
    normalize="zscore",
    synthetic={"size": SIZE, "slices": SLICES, "cases_per_split": CASES},
)

# %% [markdown]
# ## 1. The federation, without the new site
#
# `outside=[NEW_SITE]` keeps the site out of training. At the end of `fit`, the
# `FederatedTrainer` writes `routing_space.pt` into the run folder: the global weights, every
# site's personalized weights, the site names and the network spec. (The command-line way:
# `python -m iopfl_lightning fit --config experiments/demo.yaml --data.outside UCL`.)

# %%
federation = pl.Trainer(
    max_epochs=ROUNDS,
    callbacks=[FederatedTrainer(alpha=0.1)],
    accelerator="cpu",
    logger=CSVLogger("runs", name="outside_federation"),
    limit_val_batches=0,
    enable_checkpointing=False,
    enable_model_summary=False,
    enable_progress_bar=False,
    deterministic=True,
)
segmenter = SegmentationModule(net="unet", features=8, loss="dice_ce", lr=2e-3, val_hd95=False)
federation.fit(segmenter, datamodule=MultiSiteDataModule(**DATA))
space_path = Path(federation.log_dir) / "routing_space.pt"
space = read_routing_space(space_path)
print("experts:", space["sites"], "+ global;", "net:", space["net_spec"])

# %% [markdown]
# ## 2. Build the routed model
#
# `RoutingModule` replaces every convolution of the network with a routed layer holding the
# K + 1 expert kernels (frozen) and a router (trained). Mixing is batched: one einsum mixes the
# kernels per image, one grouped convolution applies them. `start="uniform"` makes step 0 the
# uniform mixture; `eval_mode="offline"` scores the final weights after fitting (the paper's
# `online` mode scores each batch right after its update).

# %%
router = RoutingModule(routing_space=str(space_path), start="uniform", eval_mode="offline")
trainable = sum(p.numel() for p in router.net.parameters() if p.requires_grad)
stored = sum(t.numel() for t in router.net.state_dict().values())
print(f"{len(list(routed_layers(router.net)))} routed layers; {trainable:,} trainable router and "
      f"norm parameters; {stored:,} numbers in the routed net's state (experts included)")

# %% [markdown]
# ## 3. The new site, before fitting
#
# With `train_on="outside"` the datamodule's training loader yields the new site's test images
# **without masks**; the test loader (with masks) is only used to score. Predictions of the
# global model and of the routed model at step 0, batch by batch as `test` makes them:

# %%
target = MultiSiteDataModule(**DATA, train_on="outside")
target.setup("test")
test_batches = list(target.test_dataloader()[0])
images = torch.cat([b["image"] for b in test_batches])
masks = torch.cat([b["mask"] for b in test_batches])
cases = torch.cat([b["case"] for b in test_batches])

global_net = build_from_spec(space["net_spec"])
global_net.load_state_dict(space["global"])
global_net.eval()


def predict(net):
    """Label maps of ``net`` on every test slice of the new site, one loader batch at a time."""
    with torch.no_grad():
        return torch.cat([net(b["image"]).argmax(1) for b in test_batches])


router.eval()
before = {"global": predict(global_net), "routed, step 0": predict(router)}

# %% [markdown]
# ## 4. Fit the routing on the unlabelled images, then score
#
# `fit` adapts only the routers and normalization affine parameters (and, as a baseline, TENT:
# entropy minimisation of the global model's normalization parameters). `test` scores, on the
# new site, the global model, the uniform weight average, the output ensemble, TENT and the
# routed model, and writes `results.csv` into the run folder.

# %%
adapt = pl.Trainer(
    max_epochs=PASSES,
    accelerator="cpu",
    logger=CSVLogger("runs", name="outside_routing"),
    enable_checkpointing=False,
    enable_model_summary=False,
    enable_progress_bar=False,
    deterministic=True,
)
adapt.fit(router, datamodule=target)
adapt.test(router, datamodule=target, verbose=False)
pd.DataFrame(router.test_results).set_index("model")[["dice", "hd95"]].round(3)

# %%
site_bar_chart(router.test_results, metric=["dice", "hd95"], add_mean=False,
               title=f"{NEW_SITE}, never seen by the federation")

# %% [markdown]
# ## 5. Routing weights
#
# The mean mixture weight of every expert in every routed layer over the new site's test
# images. Step 0 was uniform (one flat colour); a bright cell is a layer that leans on one
# site's model for this scanner.

# %%
router.eval()
set_mixture_recording(router.net, True)
totals = {}
with torch.no_grad():
    for b in test_batches:
        router(b["image"])
        for layer, weight in mixture_weights(router.net).items():
            totals[layer] = totals.get(layer, 0) + weight * len(b["image"])
set_mixture_recording(router.net, False)
mean_weights = {layer: total / len(images) for layer, total in totals.items()}
routing_heatmap(mean_weights, expert_names=[*router.inside_sites, "global"],
                title=f"Mean routing weights on {NEW_SITE}")

# %% [markdown]
# ## 6. Before and after
#
# Each test case's slice with the largest annotated area: the global model, the routed model
# at step 0 and after fitting.

# %%
after = predict(router)
area = (masks > 0).flatten(1).sum(1)
pick = [int(torch.where(cases == c, area, -1).argmax()) for c in cases.unique()]
overlay_grid(
    images[pick],
    masks[pick],
    {**{name: p[pick] for name, p in before.items()}, "routed, fitted": after[pick]},
    [f"{NEW_SITE} case {int(cases[i])}" for i in pick],
)
