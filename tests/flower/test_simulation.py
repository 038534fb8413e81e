"""The Flower simulation (``run_simulation``, Ray) against the in-process engine.

Same YAML (tests/configs/demo_tiny.yaml: three tiny synthetic sites, seed 0), two rounds. The
two engines run the same float operations in the same order (same initial weights from the
seeded YAML, the same batches in the same order, a fresh Adam per client and round, updates
summed in client order by the same ``UpdateAccumulator``, one torch thread on both sides), so
the global model and every personalized copy come out bit-for-bit equal on this machine. The
assertion allows 1e-6, room only for a BLAS that reorders a reduction between processes; it is
1000x below one Adam step (lr 1e-3), and a wrong rule (averaging weights by the wrong counts,
another EMA weight, a kept optimizer state, another batch order) moves weights by >= 1e-4.
"""

import csv

import torch

from iopfl_lightning.federated import FederatedTrainer, read_routing_space
from iopfl_lightning.flower.simulate import simulate
from tests.flower.conftest import SITES, TINY_CONFIG
from tests.helpers import run_cli


def test_simulation_matches_the_in_process_engine(tmp_path):
    path = simulate(TINY_CONFIG, str(tmp_path / "sim"), rounds=2, ray_cpus=1, torch_threads=1)
    space = read_routing_space(path)
    cli = run_cli(["fit", "--config", TINY_CONFIG, "--test_after_fit", "false",
                   "--trainer.limit_val_batches", "0"], tmp_path / "engine")
    engine = next(c for c in cli.trainer.callbacks if isinstance(c, FederatedTrainer))

    assert space["sites"] == engine.sites == SITES and space["rounds"] == engine.round == 2
    differences = [_max_difference(engine.global_state, space["global"])]
    for client, site in enumerate(SITES):
        copy = space["personalized"][site]
        differences.append(_max_difference(engine.personalized[client], copy))
    assert max(differences) <= 1e-6, differences
    weight = "encoder1.conv1.weight"  # the copies are genuinely personal
    assert not torch.equal(space["personalized"]["HK"][weight], space["global"][weight])

    with open(tmp_path / "sim" / "results.csv") as handle:  # the final test evaluation ran
        rows = list(csv.DictReader(handle))
    assert sorted((r["site"], r["model"]) for r in rows) == sorted(
        (s, m) for s in SITES for m in ("global", "personalized"))


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
