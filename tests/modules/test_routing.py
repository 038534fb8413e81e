"""RoutingModule: label-free fitting, trainable set, uniform start, baselines, clear errors."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from iopfl_lightning.data.sampler import ClientBatchSampler
from iopfl_lightning.federated.routing_space import write_routing_space
from iopfl_lightning.modules.routing import RoutingModule
from iopfl_lightning.modules.routing_experts import average_states
from iopfl_lightning.nets import build_from_spec, net_spec
from iopfl_lightning.nets.routed import norm_affine_parameters, routed_layers, router_parameters
from tests.helpers import eager_compiles, tiny_datamodule, tiny_trainer

INSIDE = ["BIDMC", "HK"]


def random_states(spec: dict, count: int) -> list[dict]:
    """``count`` distinct state dicts of ``spec`` with perturbed BatchNorm statistics."""
    states = []
    for seed in range(count):
        torch.manual_seed(seed)
        net = build_from_spec(spec)
        for name, value in net.state_dict().items():
            if "running" in name:
                value.copy_(torch.rand_like(value) + 0.5)
        states.append(net.state_dict())
    return states


def write_space(path, sites=INSIDE, features=4, num_classes=2, **changes) -> str:
    spec = net_spec("unet", in_channels=3, num_classes=num_classes, features=features)
    *site_states, global_state = random_states(spec, len(sites) + 1)
    personalized = dict(zip(sites, site_states, strict=True))
    personalized.update(changes)
    write_routing_space(path, net_spec=spec, sites=list(sites), global_state=global_state,
                        personalized=personalized)
    return str(path)


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> str:
    return write_space(tmp_path_factory.mktemp("space") / "routing_space.pt")


def outside_dm(**kw):
    return tiny_datamodule(outside=["UCL"], train_on="outside", **kw)


class GarbageMasks(Dataset):
    """The outside site's labelled test slices with every mask replaced by random labels."""

    def __init__(self, base):
        self.base = base
        self.rng = torch.Generator().manual_seed(123)  # not the global RNG the fit draws from

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        item["mask"] = torch.randint(0, 2, item["mask"].shape, generator=self.rng)
        return item


def fitted_trainables(space, loader_or_dm, tmp_path) -> list[torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    module = RoutingModule(space, eval_mode="offline", baselines=[])
    trainer = tiny_trainer(1, [], tmp_path)
    if isinstance(loader_or_dm, DataLoader):
        trainer.fit(module, train_dataloaders=loader_or_dm)
    else:
        trainer.fit(module, datamodule=loader_or_dm)
    return [p.detach().clone() for p in router_parameters(module.net)
            + norm_affine_parameters(module.net)]


def test_fit_never_uses_labels(space, tmp_path):
    dm = outside_dm()
    without = fitted_trainables(space, dm, tmp_path / "a")
    labelled = GarbageMasks(dm.dataset("UCL", "test", labels=True))
    # the outside loader's own order: seeded per epoch by (seed, epoch)
    garbage = DataLoader(labelled, batch_sampler=ClientBatchSampler(
        [len(labelled)], dm.eval_batch_size, seed=dm.seed))
    with_garbage = fitted_trainables(space, garbage, tmp_path / "b")
    start = [p.detach() for p in router_parameters(RoutingModule(space, baselines=[]).net)]
    assert any(not torch.equal(a, b) for a, b in zip(without, start, strict=False))  # it moved
    assert all(torch.equal(a, b) for a, b in zip(without, with_garbage, strict=True))


def test_only_routers_and_norm_affine_train_and_all_routers_get_gradients(space):
    module = RoutingModule(space, baselines=[])
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    expected = router_parameters(module.net) + norm_affine_parameters(module.net)
    assert trainable == {id(p) for p in expected}
    assert all(b.requires_grad is False for b in module.net.buffers())
    optimizer = torch.optim.Adam(expected, lr=1e-2)
    image = outside_dm().dataset("UCL", "test", labels=False)[0]["image"]
    batch = torch.stack([image, image.flip(-1), image.flip(-2)])
    for _ in range(2):  # zero-init last router layers: first layers get gradients from step 2
        optimizer.zero_grad()
        module.routed_objective(batch)[0].backward()
        optimizer.step()
    for name, layer in routed_layers(module.net):
        for pname, p in layer.router.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.router.{pname}"


def test_uniform_start_is_the_uniform_weight_average(space):
    module = RoutingModule(space, start="uniform", norm="running", baselines=[]).eval()
    states = module._states
    uniform = average_states(states)
    state = dict(states[-1])  # norm parameters and buffers of the global model
    for name, _ in routed_layers(module.net):
        for key in (f"{name}.weight", f"{name}.bias"):
            if key in state:
                state[key] = uniform[key]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = functional_call(module.plain, state, (x,))
        assert torch.allclose(module.net(x), expected, atol=1e-5)
        # the 'global' baseline is a different model
        assert not torch.allclose(functional_call(module.plain, states[-1], (x,)), expected)


def _running_statistics(module: RoutingModule) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.clone() for name, net in module.adapted_nets().items()
            for key, value in net.state_dict().items() if "running" in key}


@pytest.mark.parametrize("mode,mix", [("offline", "kernels"), ("online", "kernels"),
                                      ("offline", "auto")])
def test_running_norm_fits_with_the_running_statistics_and_never_moves_them(
        space, tmp_path, mode, mix):
    """``norm="running"``: every BatchNorm forward of the adapted nets while fitting is in eval
    mode, so the stored statistics normalise and stay as they were. Lightning does not call
    ``train()`` when fitting starts, and ``mix="auto"`` times the layers in eval mode first."""
    module = RoutingModule(space, norm="running", eval_mode=mode, baselines=["tent"], mix=mix)
    before = _running_statistics(module)
    modes = []
    for net in module.adapted_nets().values():
        for layer in net.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    tiny_trainer(1, [], tmp_path).fit(module, datamodule=outside_dm())
    assert modes and not any(modes)
    after = _running_statistics(module)
    assert before.keys() == after.keys() and before
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert module.net.training and all(r.training for _, layer in routed_layers(module.net)
                                       for r in [layer.router])


def test_mix_and_memory_format_fit_the_same_routers(space):
    """``mix="outputs"`` and ``channels_last`` are other ways to compute the same routed step:
    same objective and router gradients as the default, to float rounding."""
    image = outside_dm().dataset("UCL", "test", labels=False)[0]["image"]
    batch = torch.stack([image, image.flip(-1), image.flip(-2)])
    results = []
    for mix, channels_last in (("kernels", False), ("outputs", False), ("kernels", True),
                               ("outputs", True)):
        torch.manual_seed(0)  # the same random router start, and the same augmented view
        module = RoutingModule(space, baselines=[], start="random", mix=mix,
                               channels_last=channels_last)
        assert {layer.mix for _, layer in routed_layers(module.net)} == {mix}
        loss = module.routed_objective(module._prepare(batch))[0]
        loss.backward()
        results.append((loss.detach(), [p.grad for p in module.net.parameters() if p.requires_grad]))
    (loss_k, grads_k), *others = results
    for loss, grads in others:
        torch.testing.assert_close(loss, loss_k, atol=1e-5, rtol=1e-5)
        for a, b in zip(grads, grads_k, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("mode,channels_last", [("online", False), ("offline", False),
                                                ("online", True)])
def test_fit_then_test_reports_every_model(space, tmp_path, mode, channels_last):
    module = RoutingModule(space, eval_mode=mode, channels_last=channels_last)
    dm = outside_dm()
    trainer = tiny_trainer(1, [], tmp_path)
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    rows = module.test_results
    assert [r["model"] for r in rows] == ["global", "uniform", "ensemble", "tent", "routed"]
    assert {r["site"] for r in rows} == {"UCL"}
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "results.md").is_file()


def test_online_test_without_fit_is_refused(space, tmp_path):
    with pytest.raises(ValueError, match="online"):
        tiny_trainer(1, [], tmp_path).test(RoutingModule(space), datamodule=outside_dm())


def test_bad_choices_are_refused_early(space):
    for kwargs, word in [({"gate": "relu"}, "gate"), ({"start": "zero"}, "start"),
                         ({"norm": "instance"}, "norm"), ({"eval_mode": "best"}, "eval_mode"),
                         ({"baselines": ["oracle"]}, "baselines"), ({"lr": 0}, "lr"),
                         ({"mix": "experts"}, "mix")]:
        with pytest.raises(ValueError, match=word):
            RoutingModule(space, **kwargs)


def test_routing_space_errors_name_the_site_or_layer(tmp_path):
    with pytest.raises(ValueError, match="K = 0"):
        RoutingModule(write_space(tmp_path / "k0.pt", sites=[]))
    spec = net_spec("unet", in_channels=3, num_classes=2, features=4)
    wide = build_from_spec({**spec, "features": 8}).state_dict()
    with pytest.raises(ValueError, match=r"site 'HK'.*encoder1\.conv1"):
        RoutingModule(write_space(tmp_path / "arch.pt", HK=wide))
    space = write_space(tmp_path / "stranger.pt")
    payload = torch.load(space, weights_only=True)
    payload["personalized"]["UCL"] = payload["personalized"].pop("HK")
    torch.save(payload, space)
    with pytest.raises(ValueError, match=r"\['UCL'\], which are not among its inside sites"):
        RoutingModule(space)


def test_outside_site_that_trained_inside_is_refused(tmp_path):
    space = write_space(tmp_path / "leak.pt", sites=["BIDMC", "UCL"])
    with pytest.raises(ValueError, match="UCL"):
        tiny_trainer(1, [], tmp_path).fit(RoutingModule(space), datamodule=outside_dm())


def test_outside_site_of_the_federation_without_a_copy_is_refused_too(tmp_path):
    """UCL trained the global model but has no personalized copy (never answered, never drawn):
    it is still no unseen site."""
    space = write_space(tmp_path / "leak.pt", sites=["BIDMC", "UCL"])
    payload = torch.load(space, weights_only=True)
    del payload["personalized"]["UCL"]
    torch.save(payload, space)
    module = RoutingModule(space)
    assert module.inside_sites == ["BIDMC"] and module.federation_sites == ["BIDMC", "UCL"]
    with pytest.raises(ValueError, match=r"outside site\(s\) \['UCL'\] were inside sites"):
        tiny_trainer(1, [], tmp_path).fit(module, datamodule=outside_dm())


def test_empty_target_is_refused(space, tmp_path):
    empty = DataLoader(GarbageMasks([]), batch_size=2)
    with pytest.raises(ValueError, match="empty target"):
        tiny_trainer(1, [], tmp_path).fit(RoutingModule(space), train_dataloaders=empty)


def test_inside_training_data_is_refused(space, tmp_path):
    dm = tiny_datamodule(outside=["UCL"])
    with pytest.raises(ValueError, match="train_on"):
        tiny_trainer(1, [], tmp_path).fit(RoutingModule(space), datamodule=dm)


def test_compile_option_runs_the_adaptation_forwards_compiled_with_the_same_step(
    space, monkeypatch
):
    """``compile=True`` puts the routed net's two adaptation forwards through torch.compile
    (the eager backend here: real graph capture, no code generation): same objective and
    router gradients, same state dict keys."""
    calls = eager_compiles(monkeypatch)
    image = outside_dm().dataset("UCL", "test", labels=False)[0]["image"]
    batch = torch.stack([image, image.flip(-1)])
    results = []
    for compile_ in (False, True):
        torch.manual_seed(0)  # the same random router start, and the same augmented view
        module = RoutingModule(space, baselines=[], start="random", compile=compile_,
                               compile_mode="reduce-overhead")
        loss = module.routed_objective(batch)[0]
        loss.backward()
        grads = [p.grad for p in module.net.parameters() if p.requires_grad]
        results.append((loss.detach(), grads, list(module.state_dict())))
    assert [kwargs for _, kwargs in calls] == [{"mode": "reduce-overhead"}]
    (loss_e, grads_e, keys_e), (loss_c, grads_c, keys_c) = results
    assert keys_c == keys_e
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b)


def test_unknown_compile_mode_is_refused(space):
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        RoutingModule(space, compile=True, compile_mode="fast")


def test_compiled_fit_adapts_like_the_eager_one(space, tmp_path, monkeypatch):
    """A whole online fit (Lightning's manual optimization, the online predictions) with the
    compiled adaptation forwards trains the same routers as the eager fit."""
    eager_compiles(monkeypatch)
    trained = []
    for compile_ in (False, True):
        pl.seed_everything(0, verbose=False)
        module = RoutingModule(space, baselines=[], compile=compile_)
        tiny_trainer(1, [], tmp_path / str(compile_)).fit(module, datamodule=outside_dm())
        trained.append([p.detach().clone() for p in router_parameters(module.net)])
    pl.seed_everything(0, verbose=False)
    start = [p.detach() for p in router_parameters(RoutingModule(space, baselines=[]).net)]
    assert any(not torch.equal(a, b) for a, b in zip(trained[0], start, strict=True))  # it fit
    for a, b in zip(*trained, strict=True):
        torch.testing.assert_close(a, b)


def test_mix_auto_times_both_mixes_at_the_first_batch_and_fits_like_kernels(space, tmp_path):
    """``mix="auto"``: at the first training batch every routed convolution is timed both ways
    and keeps the faster; the fit then trains the routers as the default mix does (to float
    rounding), and the random streams are untouched by the timing."""
    trained, modules = [], []
    for mix in ("kernels", "auto"):
        pl.seed_everything(0, verbose=False)
        module = RoutingModule(space, baselines=[], mix=mix)
        tiny_trainer(1, [], tmp_path / mix).fit(module, datamodule=outside_dm())
        trained.append([p.detach().clone() for p in router_parameters(module.net)])
        modules.append(module)
    auto = modules[1]
    assert modules[0].mix_choice is None and auto.mix_choice
    layers = dict(routed_layers(auto.net))
    for name, row in auto.mix_choice.items():
        assert layers[name].mix == row["chosen"] and row["kernels"] > 0 and row["outputs"] > 0
    for a, b in zip(*trained, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="mix must be one of"):
        RoutingModule(space, mix="fastest")


def test_a_routing_checkpoint_scores_and_resumes_without_refitting(space, tmp_path):
    """The online predictions, steps and mixtures travel in the checkpoint: ``test`` from it
    gives the fit's table, a finished run resumes to nothing left to do, and a checkpoint
    written mid-pass or over a routing space that changed since is refused."""
    import shutil

    from lightning.pytorch.callbacks import ModelCheckpoint

    local = tmp_path / "space.pt"
    shutil.copyfile(space, local)

    def trainer(root, epochs, **checkpoint):
        saver = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1,
                                filename="{epoch}-{step}", **checkpoint)
        return tiny_trainer(epochs, [saver], root, enable_checkpointing=True)

    dm = outside_dm(eval_batch_size=2)
    fitted = RoutingModule(str(local), baselines=["global", "tent"])
    trainer(tmp_path / "a", 2).fit(fitted, datamodule=dm)
    trainer(tmp_path / "a", 2).test(fitted, datamodule=dm, verbose=False)
    last = sorted((tmp_path / "a" / "ckpt").glob("epoch=1-*.ckpt"))[-1]

    restored = RoutingModule(str(local), baselines=["global", "tent"])
    trainer(tmp_path / "b", 2).test(restored, datamodule=dm, ckpt_path=str(last), verbose=False)
    assert restored.test_results == fitted.test_results
    trainer(tmp_path / "c", 2).fit(RoutingModule(str(local), baselines=["global", "tent"]),
                                   datamodule=dm, ckpt_path=str(last))  # no "empty target"

    steps = trainer(tmp_path / "d", 1, every_n_train_steps=1)
    steps.fit(RoutingModule(str(local), baselines=[]), datamodule=dm)
    mid = tmp_path / "d" / "ckpt" / "epoch=0-step=1.ckpt"
    with pytest.raises(ValueError, match="middle of a pass"):
        trainer(tmp_path / "e", 1).test(RoutingModule(str(local), baselines=[]), datamodule=dm,
                                        ckpt_path=str(mid))
    payload = torch.load(local, weights_only=True)
    payload["global"] = {k: v + 1 if v.is_floating_point() else v
                         for k, v in payload["global"].items()}
    torch.save(payload, local)
    with pytest.raises(ValueError, match="changed since this checkpoint was written"):
        trainer(tmp_path / "f", 2).test(RoutingModule(str(local), baselines=["global", "tent"]),
                                        datamodule=dm, ckpt_path=str(last), verbose=False)
