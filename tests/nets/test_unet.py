"""Tests for the paper's UNet: output shapes, layout and the input-size check."""

import pytest
import torch
from torch import nn

from iopfl_lightning.nets import UNet


@pytest.mark.parametrize("num_classes", [1, 2, 3, 5])
def test_output_shape_matches_classes(num_classes):
    net = UNet(in_channels=3, num_classes=num_classes, features=8).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 48))
    assert out.shape == (2, num_classes, 32, 48)


def test_single_channel_input():
    net = UNet(in_channels=1, num_classes=2, features=4).eval()
    assert net(torch.randn(1, 1, 16, 16)).shape == (1, 2, 16, 16)


def test_default_widths_match_paper():
    net = UNet()
    assert [getattr(net, f"encoder{i}").conv1.out_channels for i in range(1, 5)] == [
        32, 64, 128, 256]
    assert net.bottleneck.conv2.out_channels == 512
    assert net.upconv4.in_channels == 512 and net.upconv1.out_channels == 32
    assert net.head.kernel_size == (1, 1)
    # Paper UNet: about 7.76 M parameters with 3 input channels and 2 classes.
    assert sum(p.numel() for p in net.parameters()) == 7_763_074


def test_block_layout_conv_without_bias_then_bn_relu():
    block = UNet(features=4).decoder2
    kinds = [type(m) for m in block]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
    assert block.conv1.bias is None and block.conv2.bias is None
    assert block.conv1.in_channels == 2 * block.conv1.out_channels  # skip concatenated


def test_gradients_reach_first_layer():
    net = UNet(features=4)
    net(torch.randn(2, 3, 16, 16)).sum().backward()
    assert net.encoder1.conv1.weight.grad is not None


@pytest.mark.parametrize("size", [(30, 32), (32, 40), (8, 8)])
def test_indivisible_size_raises_clear_error(size):
    net = UNet(features=4)
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]}.*divisible by 16"):
        net(torch.randn(1, 3, *size))


def test_rejects_non_positive_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        UNet(num_classes=0)
