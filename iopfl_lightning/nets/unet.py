"""The 2D UNet used by the IOP-FL paper (Jiang et al., IEEE TMI 2023).

Layout (written from the paper and the structure of the reference code, not copied):

- four encoder levels with ``features * (1, 2, 4, 8)`` channels, a bottleneck with
  ``features * 16`` channels (32, 64, 128, 256 and 512 for the default ``features=32``);
- every level is a :func:`conv_block`: two ``3x3`` convolutions without bias (the
  BatchNorm that follows makes a bias redundant), each followed by BatchNorm and ReLU;
- ``2x2`` max-pooling on the way down, ``2x2`` stride-2 ``ConvTranspose2d`` (with bias) on
  the way up, the skip connection concatenated as ``[upsampled, skip]``;
- a final ``1x1`` convolution (with bias) to ``num_classes`` logits.

The reference network also carries an unused self-supervised head (a BatchNorm, pooling and
a linear layer on the bottleneck); it is left out here because it never affects segmentation.
Module names (``encoder1..4``, ``bottleneck``, ``upconv4..1``, ``decoder4..1``, ``head``) are
stable: routed layers and saved state dicts refer to them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

#: Number of 2x poolings; inputs must be divisible by ``2 ** DEPTH``.
DEPTH = 4


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two ``3x3`` conv -> BatchNorm -> ReLU stages (the UNet's basic level)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, c_in in enumerate((in_channels, out_channels), start=1):
        layers[f"conv{i}"] = nn.Conv2d(c_in, out_channels, kernel_size=3, padding=1, bias=False)
        layers[f"bn{i}"] = nn.BatchNorm2d(out_channels)
        layers[f"relu{i}"] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


def check_spatial_size(height: int, width: int, multiple: int = 2**DEPTH) -> None:
    """Raise a ValueError if ``height`` or ``width`` is not a multiple of ``multiple``.

    Checked up front because a mismatch otherwise surfaces deep in the decoder as an opaque
    ``torch.cat`` size error.
    """
    if height % multiple or width % multiple:
        raise ValueError(
            f"UNet input size {height}x{width} is not divisible by {multiple}; "
            f"crop or pad the image to a multiple of {multiple} (e.g. 384x384)."
        )


class UNet(nn.Module):
    """The IOP-FL paper's 2D UNet; ``forward`` maps ``[B, C, H, W]`` to logits ``[B, K, H, W]``.

    Args:
        in_channels: Input channels (3 adjacent MRI slices in the prostate task).
        num_classes: Output classes including background.
        features: Channels of the first level; doubled at every level down.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, features: int = 32) -> None:
        super().__init__()
        for arg, value in (("in_channels", in_channels), ("num_classes", num_classes),
                           ("features", features)):
            if int(value) < 1:
                raise ValueError(f"UNet {arg} must be a positive integer, got {value!r}.")
        self.in_channels, self.num_classes, self.features = in_channels, num_classes, features
        widths = [features * 2**i for i in range(DEPTH + 1)]  # 32, 64, 128, 256, 512
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        c_in = in_channels
        for level in range(1, DEPTH + 1):
            self.add_module(f"encoder{level}", conv_block(c_in, widths[level - 1]))
            c_in = widths[level - 1]
        self.bottleneck = conv_block(widths[-2], widths[-1])
        for level in range(DEPTH, 0, -1):
            wide, narrow = widths[level], widths[level - 1]
            self.add_module(f"upconv{level}", nn.ConvTranspose2d(wide, narrow, 2, stride=2))
            self.add_module(f"decoder{level}", conv_block(2 * narrow, narrow))
        self.head = nn.Conv2d(features, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return per-pixel class logits for ``x`` of shape ``[B, in_channels, H, W]``."""
        check_spatial_size(x.shape[-2], x.shape[-1])
        skips = []
        for level in range(1, DEPTH + 1):
            x = getattr(self, f"encoder{level}")(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for level in range(DEPTH, 0, -1):
            x = getattr(self, f"upconv{level}")(x)
            x = torch.cat((x, skips[level - 1]), dim=1)
            x = getattr(self, f"decoder{level}")(x)
        return self.head(x)
