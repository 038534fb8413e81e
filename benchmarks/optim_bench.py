"""Adam's step by implementation: PyTorch's per-parameter loop, multi-tensor (foreach), fused.

On the CPU PyTorch picks the per-parameter loop by default; ``modules.optim.adam`` picks the
multi-tensor one there (fused on CUDA). This times one step of each on a UNet's parameters
(Adam with amsgrad, as the modules build it) and checks whether the weights after
``--steps`` steps equal the loop's bit for bit.

Run: ``OMP_NUM_THREADS=1 python benchmarks/optim_bench.py [--features 8 16 32] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import sync

from iopfl_lightning.nets import build_net

IMPLEMENTATIONS = {"loop": {"foreach": False}, "foreach": {"foreach": True},
                   "fused": {"fused": True}}


def time_adam(start: list[torch.Tensor], options: dict, steps: int, weight_decay: float,
              device: torch.device) -> tuple[list[torch.Tensor], float]:
    """Weights after ``steps`` steps on seeded gradients, and the median step in ms (the first
    step, which creates the state, left out)."""
    params = [torch.nn.Parameter(s.clone()) for s in start]
    optimizer = torch.optim.Adam(params, lr=1e-3, amsgrad=True, weight_decay=weight_decay,
                                 **options)
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device=device)
        sync(device)
        began = time.perf_counter()
        optimizer.step()
        sync(device)
        times.append((time.perf_counter() - began) * 1e3)
    return [p.detach() for p in params], statistics.median(times[1:])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    print(f"Adam (amsgrad) step, ms (median of {args.steps - 1}); equal = bitwise the loop's "
          f"weights after {args.steps} steps; device {device}, torch {torch.__version__}")
    for features in args.features:
        torch.manual_seed(0)
        net = build_net("unet", in_channels=3, num_classes=2, features=features).to(device)
        start = [p.detach().clone() for p in net.parameters()]
        results = {name: time_adam(start, options, args.steps, args.weight_decay, device)
                   for name, options in IMPLEMENTATIONS.items()}
        reference = results["loop"][0]
        row = {"features": features, "tensors": len(start),
               "parameters": sum(s.numel() for s in start)}
        for name, (weights, ms) in results.items():
            row[f"{name}_ms"] = ms
            row[f"{name}_equal"] = all(torch.equal(a, b)
                                       for a, b in zip(reference, weights, strict=True))
        rows.append(row)
        print(f"features {features:3d} ({row['parameters'] / 1e6:.2f} M): " + ", ".join(
            f"{name} {row[f'{name}_ms']:.2f} (equal: {row[f'{name}_equal']})"
            for name in IMPLEMENTATIONS))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__,
                       "weight_decay": args.weight_decay, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
