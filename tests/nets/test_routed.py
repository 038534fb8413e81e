"""Tests of routed layers and build_routed_net: batched == per-sample loop, starts, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iopfl_lightning.nets.routed import (
    build_routed_net,
    mixture_weights,
    norm_affine_parameters,
    routed_layers,
    router_parameters,
    set_gate_override,
    set_mix,
    set_mixture_recording,
)
from iopfl_lightning.nets.routed_layers import (
    RoutedConv2d,
    RoutedConvTranspose2d,
    RoutedLayer,
    RoutedLinear,
    RouterConfig,
)

E = 3
RANDOM = RouterConfig(start="random")


# --------------------------------------------------------------------------- helpers


def per_sample_loop(layer: RoutedLayer, x: Tensor) -> Tensor:
    """Straightforward reference: for each sample, route, mix kernels, apply the layer."""
    outs = []
    for xi in x:
        xi = xi.unsqueeze(0)
        if isinstance(layer, RoutedLinear):
            pooled = xi.reshape(1, -1, layer.in_features).mean(dim=1)
        else:
            pooled = xi.mean(dim=(2, 3))
        w = layer.router(pooled)[0]
        kernel = sum(w[e] * layer.expert_kernels[e] for e in range(layer.num_experts))
        bias = None
        if layer.expert_bias is not None:
            bias = sum(w[e] * layer.expert_bias[e] for e in range(layer.num_experts))
        if isinstance(layer, RoutedLinear):
            outs.append(F.linear(xi, kernel, bias))
        elif isinstance(layer, RoutedConvTranspose2d):
            outs.append(F.conv_transpose2d(xi, kernel, bias, layer.stride, layer.padding,
                                           layer.output_padding, layer.groups, layer.dilation))
        else:
            if layer.padding_mode != "zeros":
                xi = F.pad(xi, layer._explicit_pad, mode=layer.padding_mode)
                padding = 0
            else:
                padding = layer.padding
            outs.append(F.conv2d(xi, kernel, bias, layer.stride, padding, layer.dilation,
                                 layer.groups))
    return torch.cat(outs)


def grads(layer: RoutedLayer, x: Tensor, fn) -> tuple[Tensor, list[Tensor], Tensor]:
    """Output, router-parameter gradients and input gradient of a fixed linear loss."""
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = fn(layer, x)
    probe = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    (out * probe).sum().backward()
    return out.detach(), [p.grad.clone() for p in layer.router.parameters()], x.grad.clone()


def assert_batched_matches_loop(layer: RoutedLayer, x: Tensor) -> None:
    out_b, g_b, gx_b = grads(layer, x, lambda m, v: m(v))
    out_l, g_l, gx_l = grads(layer, x, per_sample_loop)
    torch.testing.assert_close(out_b, out_l, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_b, g_l, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_b, gx_l, atol=1e-5, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in g_b)


class SmallNet(nn.Module):
    """Conv / BN / grouped strided conv / transposed conv / linear-ish head, for net tests."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.bn2 = nn.GroupNorm(2, 8)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Conv2d(4, 2, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        seg = self.head(F.relu(self.up(h)))
        return seg + self.fc(h.mean(dim=(2, 3)))[:, :, None, None]


def expert_states(net: nn.Module, count: int, share_norms: bool, seed: int = 0) -> list[dict]:
    """``count`` states of ``net``: conv/linear weights perturbed; norms shared or perturbed."""
    gen = torch.Generator().manual_seed(seed)
    routed_keys = {f"{n}.{p}" for n, m in net.named_modules()
                   if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear)
                   for p in ("weight", "bias")}
    states = []
    for _ in range(count):
        state = {k: v.clone() for k, v in net.state_dict().items()}
        for key, value in state.items():
            if not value.is_floating_point():
                continue
            if key in routed_keys or not share_norms:
                noise = torch.randn(value.shape, generator=gen) * 0.3
                state[key] = (value + noise).abs() if key.endswith("running_var") else value + noise
        states.append(state)
    return states


def conv_layer(cin, cout, k, groups, bias=True, **kw) -> RoutedConv2d:
    weight = torch.randn(E, cout, cin // groups, *((k, k) if isinstance(k, int) else k))
    return RoutedConv2d(weight, torch.randn(E, cout) if bias else None, groups=groups,
                        config=kw.pop("config", RANDOM), **kw)


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize(
    "cin,cout,k,kw",
    [
        (4, 6, 3, dict(padding=1)),
        (4, 6, 3, dict(stride=2, padding=2, dilation=2, groups=2)),
        (6, 4, (3, 1), dict(stride=(2, 1), padding=(1, 0), groups=2, bias=False)),
        (4, 4, 3, dict(padding=1, padding_mode="reflect")),
        (4, 4, 3, dict(padding="same", dilation=2, padding_mode="circular")),
        (4, 4, 3, dict(padding=1, groups=4, config=RouterConfig(start="random", gate="sigmoid"))),
    ],
)
@pytest.mark.parametrize("mix", ["kernels", "outputs"])
def test_conv2d_batched_matches_loop(cin, cout, k, kw, mix):
    torch.manual_seed(0)
    kw = dict(kw)
    groups = kw.pop("groups", 1)
    layer = conv_layer(cin, cout, k, groups, **kw)
    layer.mix = mix
    assert_batched_matches_loop(layer, torch.randn(3, cin, 9, 7))


@pytest.mark.parametrize(
    "kw",
    [
        dict(stride=2),
        dict(stride=2, padding=1, output_padding=1, groups=2),
        dict(stride=3, padding=1, output_padding=(2, 0), dilation=2),
    ],
)
@pytest.mark.parametrize("mix", ["kernels", "outputs"])
def test_conv_transpose2d_batched_matches_loop(kw, mix):
    torch.manual_seed(0)
    groups = kw.get("groups", 1)
    weight = torch.randn(E, 4, 6 // groups, 3, 3)
    layer = RoutedConvTranspose2d(weight, torch.randn(E, 6), config=RANDOM, **kw)
    layer.mix = mix
    assert_batched_matches_loop(layer, torch.randn(3, 4, 5, 6))


def test_conv_transpose2d_output_size():
    torch.manual_seed(0)
    ref = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1)
    layer = RoutedConvTranspose2d.from_conv(ref, ref.weight.detach().expand(E, -1, -1, -1, -1),
                                            ref.bias.detach().expand(E, -1))
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(layer(x, output_size=(10, 10)), ref(x, output_size=(10, 10)))
    with pytest.raises(ValueError, match="output_size"):
        layer(x, output_size=(13, 13))


@pytest.mark.parametrize("shape", [(4, 5), (4, 3, 5)])
def test_linear_batched_matches_loop(shape):
    torch.manual_seed(0)
    layer = RoutedLinear(torch.randn(E, 7, 5), torch.randn(E, 7), config=RANDOM)
    assert_batched_matches_loop(layer, torch.randn(*shape))


def test_fixed_override_fast_path_equals_batched_path():
    torch.manual_seed(0)
    layer = conv_layer(4, 6, 3, 2, padding=1)
    x = torch.randn(3, 4, 8, 8)
    w = torch.tensor([0.2, 0.5, 0.3])
    layer.set_gate_override(w)
    shared = layer(x)
    layer.set_gate_override(w.expand(3, -1))
    torch.testing.assert_close(shared, layer(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="gate override"):
        layer.set_gate_override(torch.ones(E + 1))


@pytest.mark.parametrize("mix", ["kernels", "outputs"])
def test_channels_last_and_bf16_autocast(mix):
    torch.manual_seed(0)
    layer = conv_layer(4, 6, 3, 1, padding=1)
    layer.mix = mix
    x = torch.randn(2, 4, 8, 8)
    xc = x.contiguous(memory_format=torch.channels_last)
    layer.to(memory_format=torch.channels_last)  # the usual idiom must not trip on expert buffers
    out = layer(xc)
    # mixed outputs keep channels_last; mixed kernels fold the batch into NCHW and stay there
    assert out.is_contiguous(memory_format=torch.channels_last) == (mix == "outputs")
    torch.testing.assert_close(out, layer(x))
    up = RoutedConvTranspose2d(torch.randn(E, 6, 4, 2, 2), torch.randn(E, 4), stride=2)
    up.mix = mix
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = up(layer(xc))
        low.float().sum().backward()
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), up(layer(x)), atol=0.3, rtol=0.05)
    assert layer.router.fc2.weight.grad is not None


def test_mixing_outputs_equals_mixing_kernels_in_a_net():
    """The two ways of computing a routed net give the same logits and router gradients;
    the grouped conv and the linear layer of SmallNet stay on kernels."""
    torch.manual_seed(0)
    net = SmallNet()
    routed = build_routed_net(net, expert_states(net, E, share_norms=False), start="random")
    x = torch.randn(3, 3, 10, 10)
    results = {}
    for mix in ("kernels", "outputs"):
        set_mix(routed, mix)
        routed.zero_grad()
        out = routed(x)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results[mix] = (out.detach(), [p.grad.clone() for p in router_parameters(routed)])
    torch.testing.assert_close(results["outputs"][0], results["kernels"][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results["outputs"][1], results["kernels"][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert {layer.mix for _, layer in routed_layers(routed)} == {"outputs"}
    with pytest.raises(ValueError, match="mix must be one of"):
        set_mix(routed, "experts")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixing_outputs_equals_mixing_kernels_and_the_cpu():
    torch.manual_seed(0)
    net = SmallNet()
    routed = build_routed_net(net, expert_states(net, E, share_norms=False), start="random")
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        want = routed(x)
        routed = routed.cuda()
        for mix in ("kernels", "outputs"):
            set_mix(routed, mix)
            torch.testing.assert_close(routed(x.cuda()).cpu(), want, atol=2e-3, rtol=2e-3)  # TF32


# --------------------------------------------------------------------------- starts


@pytest.mark.parametrize("gate,normalize", [("softmax", True), ("sigmoid", True),
                                            ("sigmoid", False)])
def test_start_uniform_is_exactly_uniform(gate, normalize):
    torch.manual_seed(0)
    net = SmallNet()
    routed = build_routed_net(net, expert_states(net, 4, True), gate=gate, normalize=normalize)
    set_mixture_recording(routed)
    for scale in (0.1, 10.0):
        for layer_name, layer in routed_layers(routed):
            w = layer.router(torch.randn(5, layer.router.fc1.in_features) * scale)
            torch.testing.assert_close(w, torch.full((5, 4), 0.25), atol=1e-7, rtol=0,
                                       msg=layer_name)
        routed(torch.randn(2, 3, 16, 16) * scale)
        weights = mixture_weights(routed)
        assert set(weights) == {name for name, _ in routed_layers(routed)}
        for w in weights.values():
            torch.testing.assert_close(w, torch.full((4,), 0.25), atol=1e-7, rtol=0)


@pytest.mark.parametrize("gate,normalize", [("softmax", True), ("sigmoid", True),
                                            ("sigmoid", False)])
def test_start_global_puts_weight_on_last_expert(gate, normalize):
    torch.manual_seed(0)
    net = SmallNet()
    routed = build_routed_net(net, expert_states(net, 4, True), gate=gate, normalize=normalize,
                              start="global", global_eps=1e-3)
    for _, layer in routed_layers(routed):
        w = layer.router(torch.randn(6, layer.router.fc1.in_features))
        expected = torch.tensor([1e-3 / 3] * 3 + [1 - 1e-3]).expand(6, -1)
        torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)


def test_start_random_is_input_dependent():
    torch.manual_seed(0)
    layer = conv_layer(4, 4, 3, 1, config=RouterConfig(start="random", gate="sigmoid",
                                                       normalize=False))
    w = layer.router(torch.randn(4, 4))
    assert not torch.allclose(w[0], w[1])


# --------------------------------------------------------------------------- whole nets


def test_one_hot_override_reproduces_each_expert():
    torch.manual_seed(0)
    net = SmallNet().eval()
    states = expert_states(net, E, share_norms=True)
    routed = build_routed_net(net, states).eval()
    x = torch.randn(2, 3, 16, 16)
    for j in range(E):
        set_gate_override(routed, F.one_hot(torch.tensor(j), E).float())
        reference = copy.deepcopy(net)
        reference.load_state_dict(states[j])
        torch.testing.assert_close(routed(x), reference(x), atol=1e-5, rtol=1e-5)
    set_gate_override(routed, None)
    assert all(layer.gate_override is None for _, layer in routed_layers(routed))


def test_non_routed_state_comes_from_global_expert():
    torch.manual_seed(0)
    net = SmallNet().eval()
    states = expert_states(net, E, share_norms=False)
    routed = build_routed_net(net, states).eval()
    global_state = states[-1]
    for key in ("bn1.weight", "bn1.running_mean", "bn1.running_var", "bn2.bias"):
        torch.testing.assert_close(routed.state_dict()[key], global_state[key])
    x = torch.randn(2, 3, 16, 16)
    set_gate_override(routed, F.one_hot(torch.tensor(0), E).float())
    reference = copy.deepcopy(net)
    mixed = dict(global_state)
    mixed.update({k: v for k, v in states[0].items() if not k.startswith(("bn1.", "bn2."))})
    reference.load_state_dict(mixed)
    torch.testing.assert_close(routed(x), reference(x), atol=1e-5, rtol=1e-5)


def test_every_router_trained_and_every_expert_used():
    torch.manual_seed(0)
    net = SmallNet()
    routed = build_routed_net(net, expert_states(net, 5, True))
    layers = dict(routed_layers(routed))
    originals = [n for n, m in net.named_modules()
                 if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear)]
    assert sorted(layers) == sorted(originals)
    assert all(layer.num_experts == 5 for layer in layers.values())
    assert all(layer.expert_bias is None or layer.expert_bias.shape[0] == 5
               for layer in layers.values())
    routed(torch.randn(2, 3, 16, 16)).square().mean().backward()
    for name, layer in layers.items():
        assert layer.router.fc2.weight.grad.abs().sum() > 0, name
        assert layer.expert_weight.grad is None
    # trainable = routers + norms; experts are buffers, not parameters
    trainable = {id(p) for p in router_parameters(routed) + norm_affine_parameters(routed)}
    assert trainable == {id(p) for p in routed.parameters()}
    assert len(norm_affine_parameters(routed)) == 4


def test_state_dict_round_trip_and_dtype():
    torch.manual_seed(0)
    net = SmallNet().eval()
    states = expert_states(net, E, True)
    routed = build_routed_net(net, states, start="random").eval()
    clone = build_routed_net(net, states, start="uniform").eval()
    clone.load_state_dict(routed.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(clone(x), routed(x))
    routed.double()
    assert all(layer.expert_weight.dtype == torch.float64 for _, layer in routed_layers(routed))
    torch.testing.assert_close(routed(x.double()).float(), clone(x), atol=1e-5, rtol=1e-5)


def test_paper_unet_builds_and_reproduces_global():
    unet_module = pytest.importorskip("iopfl_lightning.nets.unet")
    torch.manual_seed(0)
    net = unet_module.UNet(in_channels=3, num_classes=2, features=4).eval()
    states = expert_states(net, E, True)
    routed = build_routed_net(net, states).eval()
    x = torch.randn(2, 3, 32, 32)
    set_gate_override(routed, F.one_hot(torch.tensor(E - 1), E).float())
    reference = copy.deepcopy(net)
    reference.load_state_dict(states[-1])
    torch.testing.assert_close(routed(x), reference(x), atol=1e-5, rtol=1e-5)


def test_smp_unet_forward_backward():
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    net = smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=2)
    states = [net.state_dict()] * 2 + [expert_states(net, 1, True)[0]]
    routed = build_routed_net(net, states).train()
    out = routed(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2, 64, 64)
    out.square().mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in router_parameters(routed)[2::4])  # fc2 weights


# --------------------------------------------------------------------------- errors


def test_needs_at_least_one_personalized_model():
    net = SmallNet()
    with pytest.raises(ValueError, match="need at least one personalized model"):
        build_routed_net(net, [net.state_dict()])


def test_missing_key_names_layer_and_expert():
    net = SmallNet()
    states = expert_states(net, E, True)
    del states[1]["up.bias"]
    with pytest.raises(ValueError, match=r"expert 1 .*'up\.bias'.*layer 'up'"):
        build_routed_net(net, states)


def test_wrong_shape_names_layer_expert_and_shapes():
    net = SmallNet()
    states = expert_states(net, E, True)
    states[2]["conv2.weight"] = torch.zeros(8, 4, 5, 5)
    with pytest.raises(ValueError, match=r"expert 2 \(the global model\).*'conv2\.weight'.*"
                                         r"\(8, 4, 5, 5\).*\(8, 4, 3, 3\)"):
        build_routed_net(net, states)


def test_extra_key_and_bad_options_and_rerouting():
    net = SmallNet()
    states = expert_states(net, E, True)
    states[0]["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="expert 0 .*'extra.weight'"):
        build_routed_net(net, states)
    good = expert_states(net, E, True)
    with pytest.raises(ValueError, match="gate"):
        build_routed_net(net, good, gate="relu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start"):
        build_routed_net(net, good, start="zeros")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already routed"):
        build_routed_net(build_routed_net(net, good), good)
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="bare Conv2d.*nn.Sequential"):
        build_routed_net(conv, [conv.state_dict(), conv.state_dict()])


def test_net_is_not_modified():
    net = SmallNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    build_routed_net(net, expert_states(net, E, False))
    assert isinstance(net.conv1, nn.Conv2d)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key])
