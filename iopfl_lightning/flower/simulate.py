"""Run a Flower federation on one machine with ``flwr.simulation.run_simulation``.

    python -m iopfl_lightning.flower.simulate --config experiments/demo.yaml --rounds 2 \\
        --out runs/flower_sim

One virtual SuperNode per inside site of the YAML (``partition-id`` i is site i), each running
the same ClientApp as a real deployment, on Ray. Outputs: ``<out>/routing_space.pt``,
``checkpoint.pt``, ``rounds.json``, ``results.{csv,md}``, and each site's folder
``<out>/sites/<site>`` (its personalized copy and local results).

Ray: each ClientApp gets ``--client-cpus`` CPUs (default 1) and ``--client-gpus`` GPUs, and Ray
itself ``--ray-cpus`` (default: all), so at most ``ray-cpus / client-cpus`` sites train at once.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any


def simulate(
    config: str, out: str, rounds: int = 0, client_cpus: float = 1.0, client_gpus: float = 0.0,
    ray_cpus: int | None = None, **run_config: Any,
) -> Path:
    """Runs the simulation; returns ``<out>/routing_space.pt``. ``run_config`` takes the other
    run config keys with underscores (``min_replies=2``, ``test_at_end=False``...)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.simulation import run_simulation

    from iopfl_lightning.flower.client_app import make_client_app
    from iopfl_lightning.flower.experiment import load_experiment
    from iopfl_lightning.flower.server_app import make_server_app

    overrides = {"config": str(config), "out": str(out), "num-rounds": int(rounds),
                 "site-root": str(Path(out) / "sites")}
    overrides.update({k.replace("_", "-"): v for k, v in run_config.items()})
    sites = load_experiment(str(config)).sites
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "warning"}
    if ray_cpus:
        init_args["num_cpus"] = int(ray_cpus)
    run_simulation(
        server_app=make_server_app(overrides), client_app=make_client_app(overrides),
        num_supernodes=len(sites),
        backend_config={"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
                        "init_args": init_args},
    )
    path = Path(out) / "routing_space.pt"
    if not path.is_file():
        raise RuntimeError(f"the simulation ended without writing {path}; see the log above")
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML (as for fit --config)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--rounds", type=int, default=0, help="0 = the YAML's max_epochs")
    parser.add_argument("--client-cpus", type=float, default=1.0)
    parser.add_argument("--client-gpus", type=float, default=0.0)
    parser.add_argument("--ray-cpus", type=int, default=None)
    parser.add_argument("--min-replies", type=int, default=0)
    parser.add_argument("--no-test", action="store_true", help="skip the final test evaluation")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    parser.add_argument("--torch-threads", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return simulate(
        args.config, args.out, args.rounds, args.client_cpus, args.client_gpus, args.ray_cpus,
        min_replies=args.min_replies, test_at_end=not args.no_test, resume=args.resume,
        torch_threads=args.torch_threads,
    )


if __name__ == "__main__":
    main()
