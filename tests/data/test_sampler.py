"""ClientBatchSampler: one epoch = one round, clients contiguous, seeded shuffles."""

import math

import pytest

from iopfl_lightning.data import ClientBatchSampler

SIZES = [7, 0, 5, 12]


def _client_of(index, sizes=SIZES):
    start = 0
    for client, n in enumerate(sizes):
        if start <= index < start + n:
            return client
        start += n
    raise AssertionError(index)


def _clients_in_order(batches):
    out = []
    for batch in batches:
        owners = {_client_of(i) for i in batch}
        assert len(owners) == 1, f"batch mixes clients: {batch}"
        out.append(owners.pop())
    return out


def test_clients_contiguous_ascending_and_complete():
    sampler = ClientBatchSampler(SIZES, batch_size=3, seed=1)
    batches = list(sampler)
    order = _clients_in_order(batches)
    assert order == sorted(order)  # contiguous and ascending
    assert sorted(i for b in batches for i in b) == list(range(sum(SIZES)))
    assert len(sampler) == len(batches) == 3 + 0 + 2 + 4
    assert [len(b) for b in batches][:3] == [3, 3, 1]  # drop_last=False


def test_same_seed_and_epoch_reproducible_other_epoch_differs():
    a = ClientBatchSampler(SIZES, 3, seed=5)
    b = ClientBatchSampler(SIZES, 3, seed=5)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.sampler.set_epoch(1)  # where Lightning calls it: batch_sampler.sampler.set_epoch
    assert list(a) == list(b)
    assert list(ClientBatchSampler(SIZES, 3, seed=6)) != first


def test_shuffle_off_is_natural_order():
    batches = list(ClientBatchSampler([4, 2], 3, shuffle=False))
    assert batches == [[0, 1, 2], [3], [4, 5]]


def test_participants_select_clients_per_epoch():
    sampler = ClientBatchSampler(SIZES, 4, participants=lambda e: [3, 0] if e % 2 else [2])
    assert set(_clients_in_order(sampler)) == {2} and len(sampler) == 2
    sampler.set_epoch(1)
    order = _clients_in_order(sampler)
    assert order == [0, 0, 3, 3, 3] and len(sampler) == 5
    assert sampler.client_batch_counts() == {0: 2, 3: 3}


def test_participants_out_of_range():
    sampler = ClientBatchSampler(SIZES, 4, participants=lambda e: [4])
    with pytest.raises(ValueError, match=r"returned client indices \[4\]; valid are 0\.\.3"):
        list(sampler)


def test_local_epochs_repeat_each_client_with_fresh_shuffles():
    sampler = ClientBatchSampler([5, 6], 2, seed=0, local_epochs=2)
    plan = sampler.plan()
    assert [c for c, _ in plan] == [0] * 6 + [1] * 6
    assert len(sampler) == 12 == 2 * (math.ceil(5 / 2) + math.ceil(6 / 2))
    first, second = [i for _, b in plan[:3] for i in b], [i for _, b in plan[3:6] for i in b]
    assert sorted(first) == sorted(second) == list(range(5)) and first != second


def test_empty_round():
    sampler = ClientBatchSampler(SIZES, 4, participants=lambda e: [])
    assert len(sampler) == 0 and list(sampler) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [({"batch_size": 0}, "batch_size"), ({"batch_size": 2, "local_epochs": 0}, "local_epochs")],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClientBatchSampler(SIZES, **kwargs)
