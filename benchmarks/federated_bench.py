"""Federated rounds: the Lightning engine (FederatedTrainer) vs a plain PyTorch FedAvg+EMA loop.

Both run the same net, data, loss, Adam (amsgrad, fresh per client and round), EMA
personalization (alpha 0.1), sample-weighted FedAvg and per-round evaluation of the global and
every personalized model on every client's validation split. The plain loop is written the way
people usually write it: ``copy.deepcopy`` of state dicts, averaging whole state dicts, and a
deep-copied module to evaluate each personalized copy.

Round time runs from the first batch of a round to the end of its evaluation; round 0 is warm-up
(cuDNN autotuning, torch.compile) and is left out of the statistics.
"""

from __future__ import annotations

import copy
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from common import (
    MemoryMeter,
    Stopwatch,
    as_run,
    autocast,
    grad_scaler,
    profile_tables,
    profiler_activities,
    summary,
    sync,
    time_methods,
)
from lightning.pytorch.profilers import SimpleProfiler
from torch.utils.data import DataLoader

from iopfl_lightning.data import MultiSiteDataModule
from iopfl_lightning.data.synthetic import SITE_STYLES
from iopfl_lightning.federated import FederatedTrainer, methods_basic
from iopfl_lightning.federated import callback as callback_module
from iopfl_lightning.federated.aggregate import (
    FlatAccumulator,
    ServerOptimizer,
    UpdateAccumulator,
)
from iopfl_lightning.modules import SegmentationModule
from iopfl_lightning.modules.losses import SegmentationLoss
from iopfl_lightning.nets import build_net

ALPHA = 0.1
LR = 1e-3


@dataclass
class FedConfig:
    clients: int = 3
    size: int = 64
    batch: int = 8
    features: int = 16
    rounds: int = 3
    train_cases: int = 2
    val_cases: int = 1
    slices: int = 8
    workers: int = 0
    precision: str = "32-true"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode (both engines), with compile
    compile_eval: bool = True  # engine only, with compile: evaluation compiled too
    pin_memory: bool = False
    device_cache: bool = False  # engine only: data finished once and kept on the device
    seed: int = 0
    profile: bool = False  # Lightning SimpleProfiler: where a round's host time goes
    torch_profile: bool = False  # torch.profiler over the last round: top ops, syncs, copies
    flat_state: bool = True  # engine only: FederatedTrainer(flat_state=...)
    switch_parts: bool = False  # engine only: time the calls inside a client switch too


def make_datamodule(cfg: FedConfig) -> MultiSiteDataModule:
    sites = list(SITE_STYLES)
    if not 1 <= cfg.clients <= len(sites):
        raise ValueError(f"clients must be 1..{len(sites)} (synthetic sites), got {cfg.clients}")
    dm = MultiSiteDataModule(
        format="synthetic",
        sites=sites[: cfg.clients],
        batch_size=cfg.batch,
        num_workers=cfg.workers,
        pin_memory=cfg.pin_memory,
        device_cache=cfg.device_cache,
        synthetic={"size": cfg.size, "slices": cfg.slices,
                   "cases_per_split": {"train": cfg.train_cases, "val": cfg.val_cases, "test": 1}},
        seed=cfg.seed,
    )
    dm.setup("fit")
    return dm


def quiet_trainer(device: torch.device, root: str, **kwargs) -> pl.Trainer:
    """A Trainer on ``device`` without logger, checkpoints, progress bar or summary (each can
    be given in ``kwargs``), writing into ``root``."""
    defaults = dict(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=root)
    return pl.Trainer(**{**defaults, **kwargs})


class RoundClock(pl.Callback):
    """Round wall/CPU time and images trained; ``start`` goes first, ``end`` last."""

    def __init__(self, device: torch.device, shared: dict | None = None, role: str = "start"):
        self.device, self.role = device, role
        self.shared = shared if shared is not None else {"rounds": [], "images": 0}

    def on_train_epoch_start(self, trainer, pl_module):
        if self.role == "start":
            sync(self.device)
            self.shared.update(t0=time.perf_counter(), c0=time.process_time(), images=0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.role == "start":
            self.shared["images"] += int(batch["image"].shape[0])

    def on_train_epoch_end(self, trainer, pl_module):
        if self.role == "end":
            sync(self.device)
            s = self.shared
            s["rounds"].append({"wall": time.perf_counter() - s["t0"],
                                "cpu": time.process_time() - s["c0"], "images": s["images"]})


class _TorchProfileLastRound(pl.Callback):
    """torch.profiler over the last round (warm); keeps the op table sorted by host time."""

    def __init__(self, rounds: int, device: torch.device):
        self.rounds, self.device, self.table = rounds, device, ""
        self._prof = None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.rounds - 1:
            self._prof = torch.profiler.profile(activities=profiler_activities(self.device))
            self._prof.__enter__()

    def on_train_epoch_end(self, trainer, pl_module):
        if self._prof is not None:
            sync(self.device)
            self._prof.__exit__(None, None, None)
            self.table = profile_tables(self._prof, self.device)
            self._prof = None


# The calls inside a client switch (``--switch-parts``): where its host time goes. The
# callback module's names are what the callback calls, so they are wrapped there (the EMA
# likewise in the methods module that calls it).
SWITCH_PARTS = {
    "optimizer reset": (callback_module, "reset_optimizer_state"),
    "NaN/inf check": (callback_module, "all_finite"),
    "load weights": (callback_module, "copy_into"),
    "accumulator add (flat)": (FlatAccumulator, "add"),
    "accumulator add (per tensor)": (UpdateAccumulator, "add"),
    "EMA update": (methods_basic, "ema_update"),  # the personalized copy
    "server step": (ServerOptimizer, "step"),  # aggregation: the new global parameters
}


@contextmanager
def timed_switch_parts(device: torch.device):
    """Inclusive ms of every call of SWITCH_PARTS while the block runs (CUDA-synchronised, so
    they add syncs of their own); the originals are put back after."""
    originals = {label: getattr(obj, name) for label, (obj, name) in SWITCH_PARTS.items()}
    records: dict[str, list[float]] = {}
    try:
        for label, (obj, name) in SWITCH_PARTS.items():
            records[label] = time_methods(obj, [name], device)[name]
        yield records
    finally:
        for label, (obj, name) in SWITCH_PARTS.items():
            setattr(obj, name, originals[label])


def _round_stats(rounds: list[dict]) -> dict:
    measured = rounds[1:] if len(rounds) > 1 else rounds
    walls = [r["wall"] for r in measured]
    images = measured[0]["images"]
    best = min(walls)
    return {
        "images_per_round": images,
        "round_s": summary(walls),
        "round_cpu_s": summary([r["cpu"] for r in measured]),
        "images_per_s": images / best,  # best round (noisy shared CPU)
        "images_per_s_median": images / summary(walls)["median"],
    }


def lightning_rounds(cfg: FedConfig, device: torch.device,
                     dm: MultiSiteDataModule | None = None) -> dict:
    """Rounds through ``Trainer.fit`` with the FederatedTrainer callback."""
    pl.seed_everything(cfg.seed, verbose=False)
    dm = dm or make_datamodule(cfg)
    module = SegmentationModule(net="unet", features=cfg.features, lr=LR, val_hd95=False,
                                channels_last=cfg.channels_last,
                                **({"compile": True, "compile_mode": cfg.compile_mode,
                                    "compile_eval": cfg.compile_eval} if cfg.compile else {}))
    fed = FederatedTrainer(alpha=ALPHA, flat_state=cfg.flat_state)
    methods = time_methods(fed, ["_start_client", "_finish_client", "_finish_round"], device,
                           when={"_finish_round": lambda: fed._accumulator is not None})
    shared: dict = {"rounds": [], "images": 0}
    profiler = SimpleProfiler(extended=False) if cfg.profile else None
    torch_profile = _TorchProfileLastRound(cfg.rounds, device) if cfg.torch_profile else None
    extra = [torch_profile] if torch_profile is not None else []
    with tempfile.TemporaryDirectory() as root:
        trainer = quiet_trainer(
            device, root,
            precision=cfg.precision,
            max_epochs=cfg.rounds,
            callbacks=[RoundClock(device, shared, "start"), fed, *extra,
                       RoundClock(device, shared, "end")],
            num_sanity_val_steps=0,
            profiler=profiler,
        )
        began = time.perf_counter()
        parts = timed_switch_parts(device) if cfg.switch_parts else nullcontext({})
        with MemoryMeter(device) as mem, parts as part_ms:
            trainer.fit(module, datamodule=dm)
    out = _round_stats(shared["rounds"])
    out["fit_s"] = time.perf_counter() - began  # warm-up included: device-time planning
    out["precision"] = trainer.precision  # as run: Lightning runs 16-mixed as bf16 on a CPU
    # Per-round method times, warm-up round (its first K + 1 calls) left out.
    k = cfg.clients
    start, finish = methods["_start_client"][k:], methods["_finish_client"][k:]
    agg = methods["_finish_round"][1:]
    out["client_switch_ms"] = summary([a + b for a, b in zip(start, finish, strict=False)])
    out["aggregation_ms"] = summary(agg)
    overhead = sum(start) + sum(finish) + sum(agg)
    total = sum(r["wall"] for r in shared["rounds"][1:]) * 1e3
    out["switch_agg_pct_of_round"] = 100.0 * overhead / total if total else float("nan")
    out["peak_mb"], out["peak_delta_mb"] = mem.peak_mb, mem.delta_mb
    if cfg.switch_parts:  # the first round's calls are warm-up, as for the switch itself
        out["switch_parts_ms"] = {label: summary(v[len(v) // cfg.rounds:])
                                  for label, v in part_ms.items() if v}
    if profiler is not None:
        out["profile"] = profiler.summary()
    if torch_profile is not None:
        out["torch_profile"] = torch_profile.table
    return out


# ----------------------------------------------------------------------------- plain loop
def _dice(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Foreground Dice of a batch, on the device: read back once a round, not per batch (a
    read-back per batch would stall the GPU queue, which the engine's evaluation avoids)."""
    pred = logits.argmax(1) > 0
    fg = mask > 0
    inter = (pred & fg).sum()
    denom = pred.sum() + fg.sum()
    return torch.where(denom == 0, 1.0, 2.0 * inter / denom.clamp_min(1))


def plain_rounds(cfg: FedConfig, device: torch.device,
                 dm: MultiSiteDataModule | None = None) -> dict:
    """The same rounds as a plain PyTorch loop (deepcopy / state_dict based)."""
    torch.manual_seed(cfg.seed)
    dm = dm or make_datamodule(cfg)
    sites = dm.inside_sites
    gen = torch.Generator().manual_seed(cfg.seed)
    workers = {"num_workers": cfg.workers, "persistent_workers": cfg.workers > 0,
               "pin_memory": cfg.pin_memory}
    train = [DataLoader(dm.dataset(s, "train"), batch_size=cfg.batch, shuffle=True,
                        generator=gen, **workers) for s in sites]
    val = [DataLoader(dm.dataset(s, "val"), batch_size=cfg.batch, **workers) for s in sites]
    counts = [len(loader.dataset) for loader in train]
    model = build_net("unet", in_channels=dm.in_channels, num_classes=dm.num_classes,
                      features=cfg.features).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    mode = {} if cfg.compile_mode == "default" else {"mode": cfg.compile_mode}
    forward = torch.compile(model, **mode) if cfg.compile else model
    loss_fn = SegmentationLoss("dice")
    precision = as_run(device, cfg.precision)  # what the engine computes in (Lightning's rule)
    scaler = grad_scaler(device, precision)  # 16-mixed only; one for the run, as Lightning's
    global_state = copy.deepcopy(model.state_dict())
    personalized: dict[int, dict] = {}
    rounds, switch_ms, agg_ms = [], [], []

    def to_dev(x):
        return x.to(device, non_blocking=True).contiguous(memory_format=memory_format)

    with MemoryMeter(device) as mem:
        for _ in range(cfg.rounds):
            with Stopwatch(device) as round_clock:
                images, local_states = 0, []
                for k, loader in enumerate(train):
                    with Stopwatch(device) as sw:
                        model.load_state_dict(global_state)
                        opt = torch.optim.Adam(model.parameters(), lr=LR, amsgrad=True)
                    switch = sw.wall
                    model.train()
                    for batch in loader:
                        x, y = to_dev(batch["image"]), batch["mask"].to(device, non_blocking=True)
                        with autocast(device, precision):
                            loss = loss_fn(forward(x), y)
                        opt.zero_grad(set_to_none=True)
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                        images += x.shape[0]
                    with Stopwatch(device) as sw:
                        local = copy.deepcopy(model.state_dict())
                        local_states.append(local)
                        if k not in personalized:
                            personalized[k] = copy.deepcopy(local)
                        else:
                            personalized[k] = {
                                n: ALPHA * p + (1 - ALPHA) * local[n] if p.is_floating_point()
                                else local[n].clone() for n, p in personalized[k].items()}
                    switch_ms.append((switch + sw.wall) * 1e3)
                with Stopwatch(device) as sw:
                    total = float(sum(counts))
                    global_state = {
                        n: sum(s[n] * (c / total) for s, c in zip(local_states, counts, strict=True))
                        if v.is_floating_point() else torch.stack([s[n] for s in local_states]).amax(0)
                        for n, v in local_states[0].items()}
                    model.load_state_dict(global_state)
                agg_ms.append(sw.wall * 1e3)
                model.eval()
                scores = []
                with torch.no_grad(), autocast(device, precision):
                    for k, loader in enumerate(val):
                        own = copy.deepcopy(model)
                        own.load_state_dict(personalized[k])
                        for batch in loader:
                            x, y = to_dev(batch["image"]), batch["mask"].to(device)
                            scores += [_dice(model(x), y), _dice(own(x), y)]
            rounds.append({"wall": round_clock.wall, "cpu": round_clock.cpu, "images": images})
    out = _round_stats(rounds)
    k = cfg.clients
    out["client_switch_ms"] = summary(switch_ms[k:])
    out["aggregation_ms"] = summary(agg_ms[1:])
    total = sum(r["wall"] for r in rounds[1:]) * 1e3
    out["switch_agg_pct_of_round"] = 100.0 * (sum(switch_ms[k:]) + sum(agg_ms[1:])) / total
    out["peak_mb"], out["peak_delta_mb"] = mem.peak_mb, mem.delta_mb
    out["val_dice_last"] = torch.stack(scores).mean().item()
    out["precision"] = precision
    return out
