"""choose_mixes: each routed convolution keeps its faster mix; nothing else changes."""

from __future__ import annotations

import pytest
import torch

from iopfl_lightning.nets import mix_choice
from iopfl_lightning.nets.mix_choice import choose_mixes, layer_inputs, time_layer
from iopfl_lightning.nets.routed import build_routed_net, routed_layers, router_parameters
from tests.nets.test_routed import E, SmallNet, expert_states


def routed_small_net():
    torch.manual_seed(0)
    net = SmallNet()
    return build_routed_net(net, expert_states(net, E, share_norms=False), start="random")


def test_layer_inputs_are_the_inputs_of_the_convolutions_that_can_mix_outputs():
    routed = routed_small_net()
    x = torch.randn(3, 3, 10, 10)
    inputs = layer_inputs(routed, lambda: routed(x))
    both = [n for n, layer in routed_layers(routed) if getattr(layer, "groups", None) == 1]
    assert sorted(inputs) == sorted(both) and "fc" not in inputs  # linear: kernels only
    assert inputs["conv1"].shape == x.shape


def test_the_faster_mix_is_kept_per_layer(monkeypatch):
    """With timings made up (outputs faster only for the transposed convolution), each layer
    gets the mix its timing says; layers that cannot mix outputs are left alone."""
    routed = routed_small_net()

    def made_up(layer, x, mix, reps=3):
        faster = "outputs" if layer.__class__.__name__ == "RoutedConvTranspose2d" else "kernels"
        return 1.0 if mix == faster else 2.0

    monkeypatch.setattr(mix_choice, "time_layer", made_up)
    report = choose_mixes(routed, lambda: routed(torch.randn(2, 3, 10, 10)))
    layers = dict(routed_layers(routed))
    for name, row in report.items():
        assert layers[name].mix == row["chosen"] == min(("kernels", "outputs"), key=row.get)
    assert report["up"]["chosen"] == "outputs" and report["conv1"]["chosen"] == "kernels"
    assert layers["fc"].mix == "kernels" and "fc" not in report


def test_choosing_changes_no_result_no_gradient_and_no_random_stream():
    routed = routed_small_net()
    routed.train()
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        before = routed(x)
    state = {k: v.clone() for k, v in routed.state_dict().items()}
    torch.manual_seed(5)
    expected_draw = torch.rand(4)
    torch.manual_seed(5)
    report = choose_mixes(routed, lambda: routed(x), reps=1)
    assert torch.equal(torch.rand(4), expected_draw)  # the random stream is as it was
    assert routed.training and all(p.grad is None for p in router_parameters(routed))
    for key, value in routed.state_dict().items():  # no running statistic moved
        assert torch.equal(value, state[key]), key
    assert report and all(row["kernels"] > 0 and row["outputs"] > 0 for row in report.values())
    with torch.no_grad():
        torch.testing.assert_close(routed(x), before, atol=1e-5, rtol=1e-5)


def test_time_layer_restores_the_mix_and_the_gradients():
    routed = routed_small_net()
    layer = dict(routed_layers(routed))["head"]  # a 1x1 convolution: it can mix outputs
    marker = [torch.full_like(p, 7.0) for p in layer.parameters() if p.requires_grad]
    for p, g in zip([p for p in layer.parameters() if p.requires_grad], marker, strict=True):
        p.grad = g
    seconds = time_layer(layer, torch.randn(2, layer.in_channels, 8, 8), "outputs", reps=2)
    assert seconds > 0 and layer.mix == "kernels"
    assert all(p.grad is g for p, g in zip(
        [p for p in layer.parameters() if p.requires_grad], marker, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_choice_times_on_the_gpu():
    routed = routed_small_net().cuda()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    report = choose_mixes(routed, lambda: routed(x))
    assert report and {row["chosen"] for row in report.values()} <= {"kernels", "outputs"}
