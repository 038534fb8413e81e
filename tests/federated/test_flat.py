"""Flat state buffers: layout, the net moved into them in place, and the fast paths giving the
per-tensor paths' results bit for bit (on the CPU a foreach op runs the same kernel per tensor)."""

import io

import pytest
import torch
from torch import nn

from iopfl_lightning.federated import FederatedTrainer
from iopfl_lightning.federated.aggregate import (
    FlatAccumulator,
    UpdateAccumulator,
    make_accumulator,
)
from iopfl_lightning.federated.flat import (
    FlatLayout,
    FlatState,
    as_flat,
    backs,
    detached_views,
    flatten_module,
)
from iopfl_lightning.federated.personalize import ema_update
from iopfl_lightning.federated.state import all_finite, clone_state, copy_into
from iopfl_lightning.nets import build_from_spec
from tests.helpers import tiny_datamodule, tiny_module, tiny_trainer

SPEC = {"name": "unet", "in_channels": 1, "num_classes": 3, "features": 4}


def _net(seed=0, channels_last=False):
    torch.manual_seed(seed)
    net = build_from_spec(SPEC)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _params(net):
    return {k for k, _ in net.named_parameters()}


def _perturbed(state, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if torch.is_floating_point(v):
            out[k] = v.detach() + torch.randn(v.shape, generator=g).to(v)
        else:
            out[k] = v.detach() + seed
    return out


def _equal(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_layout_puts_parameters_first_aligned_and_views_round_trip():
    net = _net()
    state = net.state_dict()
    layout = FlatLayout(state, _params(net))
    flat = as_flat(state, layout)
    assert isinstance(flat, FlatState) and list(flat) == list(state)
    _equal(flat, state)
    for k, slot in layout.slots.items():
        assert slot.offset % (128 // state[k].element_size()) == 0, k
        in_params = slot.offset < layout.param_numel[slot.group]
        assert in_params == (k in _params(net)), k
    assert layout.dtypes == [torch.float32, torch.int64]  # num_batches_tracked
    # the gaps between views are zeros
    covered = torch.zeros(layout.numel[0], dtype=torch.bool)
    for k, slot in layout.slots.items():
        if slot.group == 0:
            covered[slot.offset:slot.offset + state[k].numel()] = True
    assert covered.sum() < covered.numel() and (flat.buffers[0][~covered] == 0).all()


def test_as_flat_leaves_a_state_of_other_keys_or_shapes_alone():
    state = _net().state_dict()
    layout = FlatLayout(state)
    fewer = dict(list(state.items())[:-1])
    assert as_flat(fewer, layout) is fewer
    flat = as_flat(state, layout)
    assert as_flat(flat, layout) is flat


@pytest.mark.parametrize("channels_last", [False, True])
def test_flatten_module_keeps_objects_values_strides_and_training(channels_last):
    net = _net(channels_last=channels_last)
    before = {k: (t, t.detach().clone(), t.stride()) for k, t in net.state_dict(keep_vars=True).items()}
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    flat = flatten_module(net, _params(net))
    assert flat is not None and backs(flat, net)
    for k, t in net.state_dict(keep_vars=True).items():
        obj, value, stride = before[k]
        assert t is obj and torch.equal(t, value) and t.stride() == stride, k
    reference = _net(channels_last=channels_last)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    x = torch.randn(2, 1, 16, 16)
    for model, opt in ((net, optimizer), (reference, ref_opt)):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    _equal(net.state_dict(), reference.state_dict())  # the step landed in the flat buffers
    views = detached_views(flat)
    _equal(views, net.state_dict())
    assert views["encoder1.conv1.weight"].data_ptr() == net.encoder1.conv1.weight.data_ptr()


def test_flatten_module_refuses_shared_tensors_and_moving_the_net_is_noticed():
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    address = tied[0].weight.data_ptr()
    assert flatten_module(tied, _params(tied)) is None
    assert tied[0].weight.data_ptr() == address  # untouched
    net = _net()
    flat = flatten_module(net, _params(net))
    net.double()
    assert not backs(flat, net)


def test_flat_copy_finite_clone_and_ema_match_the_per_tensor_paths():
    net = _net()
    state = net.state_dict()
    layout = FlatLayout(state, _params(net))
    a, b = _perturbed(state, 1), _perturbed(state, 2)
    fa, fb = as_flat(a, layout), as_flat(b, layout)
    copy_into(fa, fb)
    _equal(fa, b)
    clone = clone_state(fb)
    assert isinstance(clone, FlatState) and clone.buffers[0].data_ptr() != fb.buffers[0].data_ptr()
    _equal(clone, b)
    plain_prev, flat_prev = clone_state(a), as_flat(a, layout)
    for alpha, update in ((0.1, b), (0.7, _perturbed(state, 3))):
        ema_update(plain_prev, update, alpha)
        assert ema_update(flat_prev, as_flat(update, layout), alpha) is flat_prev
        _equal(flat_prev, plain_prev)
    assert all_finite(flat_prev)
    for key in ("encoder1.conv1.weight", "encoder1.bn1.running_var"):  # a parameter, a buffer
        bad = clone_state(flat_prev)
        bad[key].view(-1)[0] = float("nan")
        assert not all_finite(bad), key
        bad[key].view(-1)[0] = float("-inf")
        assert not all_finite(bad), key
    huge = clone_state(flat_prev)  # finite, but its sum overflows to inf
    huge["encoder1.conv1.weight"].view(-1)[:2] = 3e38
    assert torch.isinf(huge.buffers[0].sum()) and all_finite(huge)


def test_flat_accumulator_matches_the_per_tensor_accumulator():
    net = _net()
    state = net.state_dict()
    params = _params(net)
    layout = FlatLayout(state, params)
    global_state = _perturbed(state, 0)
    flat_global = as_flat(global_state, layout)
    plain, flat = UpdateAccumulator(global_state, params), make_accumulator(flat_global, params)
    assert isinstance(flat, FlatAccumulator)
    for seed, weight in ((1, 3.0), (2, 5.0), (3, 1.0)):
        client = _perturbed(state, seed)
        plain.add(client, weight)
        flat.add(as_flat(client, layout) if seed != 2 else client, weight)  # plain dicts too
    assert flat.num_clients == 3 and flat.total_weight == plain.total_weight
    _equal(flat.mean_delta(), plain.mean_delta())
    _equal(flat.mean_buffers(), plain.mean_buffers())
    with pytest.raises(ValueError, match="does not match"):
        flat.add(dict(list(state.items())[1:]), 1.0)


def test_accumulator_stays_per_tensor_for_plain_or_other_parameter_sets():
    state = _net().state_dict()
    assert isinstance(make_accumulator(state, set()), UpdateAccumulator)
    flat = as_flat(state, FlatLayout(state, {"encoder1.conv1.weight"}))
    assert isinstance(make_accumulator(flat, {"encoder1.conv1.weight", "encoder1.bn1.weight"}),
                      UpdateAccumulator)


def _fit(tmp_path, flat_state, **options):
    dm = tiny_datamodule()
    module = tiny_module()
    callback = FederatedTrainer(alpha=0.3, flat_state=flat_state, **options)
    tiny_trainer(2, [callback], tmp_path, limit_val_batches=0).fit(module, datamodule=dm)
    return module, callback


@pytest.mark.parametrize("options", [
    {},
    {"server_optimizer": "fedadam", "server_lr": 0.01, "optimizer_state": "keep"},
    {"method": "fedbn"},
    {"method": "ditto"},
], ids=["iopfl", "fedadam-keep", "fedbn", "ditto"])
def test_trainer_with_flat_state_trains_the_same_federation(tmp_path, options):
    flat_module, flat = _fit(tmp_path / "flat", True, **options)
    plain_module, plain = _fit(tmp_path / "plain", False, **options)
    assert isinstance(flat.global_state, FlatState) and not isinstance(plain.global_state, FlatState)
    _equal(flat.global_state, plain.global_state)
    _equal(flat_module.net.state_dict(), plain_module.net.state_dict())
    flat_models, plain_models = flat.personal_models(), plain.personal_models()
    assert flat_models.keys() == plain_models.keys() and flat_models
    for k in flat_models:
        _equal(flat_models[k], plain_models[k])
    if "server_optimizer" in options:
        server_flat, server_plain = flat.server.state_dict(), plain.server.state_dict()
        for i, entry in server_plain["state"].items():
            for name, value in entry.items():
                assert torch.equal(server_flat["state"][i][name], value), (i, name)
    saved = io.BytesIO()
    torch.save(flat.state_dict(), saved)  # plain dicts: loads without unpickling our classes
    saved.seek(0)
    loaded = torch.load(saved, weights_only=True)
    _equal(loaded["global_state"], plain.global_state)


def test_iopfl_personalized_copies_stay_flat(tmp_path):
    _, flat = _fit(tmp_path, True)
    assert flat.personalized and all(isinstance(s, FlatState) for s in flat.personalized.values())


def test_after_fit_the_net_and_the_routing_space_hold_tensors_of_their_own(tmp_path):
    module, flat = _fit(tmp_path, True)
    state = module.net.state_dict()
    storages = {t.untyped_storage().data_ptr() for t in state.values()}
    assert len(storages) == len(state)  # unflattened at the end of fit (safetensors-safe)
    assert flat._live_flat is None
    saved = torch.load(next(tmp_path.rglob("routing_space.pt")), weights_only=True)
    for tensors in (saved["global"], *saved["personalized"].values()):
        assert len({t.untyped_storage().data_ptr() for t in tensors.values()}) == len(tensors)
        for t in tensors.values():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_a_net_whose_tensors_already_share_a_buffer_is_laid_out_again():
    """Views into one storage at different places (a net loaded from a flat save) are not tied
    weights: the net is flattened into a fresh layout, its values kept."""
    net = _net()
    flat = flatten_module(net, _params(net))
    other = _net(seed=1)
    other.load_state_dict(dict(detached_views(flat)), assign=True)  # views of flat's buffers
    assert other.encoder1.conv1.weight.data_ptr() == net.encoder1.conv1.weight.data_ptr()
    again = flatten_module(other, _params(other))
    assert again is not None and again.buffers[0].data_ptr() != flat.buffers[0].data_ptr()
    assert backs(flat, net) and backs(again, other)  # each net on its own buffers now
    _equal(other.state_dict(), net.state_dict())
