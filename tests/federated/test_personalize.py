import pytest
import torch

from iopfl_lightning.federated.participation import select_clients
from iopfl_lightning.federated.personalize import ema_update


def test_first_update_copies_then_interpolates():
    local1 = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    copy = ema_update(None, local1, alpha=0.1)
    assert torch.equal(copy["w"], local1["w"]) and copy["w"] is not local1["w"]
    local2 = {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(7)}
    copy = ema_update(copy, local2, alpha=0.1)
    torch.testing.assert_close(copy["w"], 0.1 * local1["w"] + 0.9 * local2["w"])
    assert int(copy["n"]) == 7 and copy["n"].dtype == torch.int64
    assert torch.equal(local2["w"], torch.tensor([3.0, 4.0]))  # local untouched


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5])
def test_alpha_outside_unit_interval_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha"):
        ema_update(None, {"w": torch.zeros(1)}, alpha)


def test_client_selection_is_seeded_and_sized():
    assert select_clients(5, 1.0, 0, 3) == [0, 1, 2, 3, 4]
    # 0.07 * 100 is 7.000000000000001 in floats: still 7 clients, not 8
    assert [len(select_clients(n, f, 0, 0)) for n, f in ((100, 0.07), (25, 0.28), (50, 0.14))
            ] == [7, 7, 7]
    a = select_clients(6, 0.5, seed=1, round_idx=4)
    assert a == select_clients(6, 0.5, seed=1, round_idx=4) and len(a) == 3 and a == sorted(a)
    rounds = {tuple(select_clients(6, 0.5, seed=1, round_idx=r)) for r in range(10)}
    assert len(rounds) > 1
    with pytest.raises(ValueError, match="client_fraction"):
        select_clients(4, 0.0, 0, 0)
