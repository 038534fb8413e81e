"""Label-free test-time losses of IOP-FL outside personalization (pure torch, no Lightning).

Every function takes logits ``[B, C, H, W]`` and returns a scalar; none of them sees a label.

- :func:`entropy_loss`: mean per-pixel prediction entropy over classes, divided by ``log C`` so
  it lies in [0, 1]. (The reference code sums over the batch axis instead of the class axis;
  we use the textbook per-pixel entropy.)
- :func:`consistency_loss`: mean squared difference between the softmax of an augmented view
  (mapped back with :func:`invert_view`) and the softmax of the plain view. Gradients flow
  through both sides, as in the reference.
- :func:`smoothness_loss`: the reference's max-pool shape term: the local range
  ``maxpool(p) + maxpool(-p)`` of every foreground probability map in a ``2r+1`` window,
  reduced with an L2 norm and scaled by ``1e-6`` (the reference's constants, so its default
  weight 1 means what it meant there; at this scale the term is a very weak regulariser).

:func:`augment_view` draws, per sample, Gaussian noise, a horizontal flip and a rotation by a
multiple of 90 degrees; :func:`invert_view` undoes flip and rotation on the output. Both act on
the whole batch at once (a loop over the 4 rotations, never over samples).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

ShapeLoss = Literal["maxpool", "none"]
SHAPE_LOSSES: tuple[str, ...] = ("maxpool", "none")


def entropy_loss(logits: Tensor) -> Tensor:
    """Mean per-pixel entropy of ``softmax(logits)`` over classes, normalised by ``log C``."""
    log_p = logits.float().log_softmax(dim=1)
    ent = -(log_p.exp() * log_p).sum(dim=1)
    return ent.mean() / math.log(logits.shape[1])


def consistency_loss(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Mean squared difference of the two views' class probabilities (shapes must match)."""
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"views differ in shape: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    return (logits_a.float().softmax(1) - logits_b.float().softmax(1)).pow(2).mean()


def smoothness_loss(logits: Tensor, radius: int = 10, scale: float = 1e-6) -> Tensor:
    """Reference max-pool shape term: ``scale * ||local max(p) - local min(p)||_2`` over the
    foreground probability maps ``p`` (classes 1..C-1), window ``2 * radius + 1``."""
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    fg = logits.float().softmax(1)[:, 1:]
    local_range = window_max(fg, radius) + window_max(-fg, radius)
    return scale * local_range.norm()


def window_max(x: Tensor, radius: int) -> Tensor:
    """Max over the ``(2r+1) x (2r+1)`` window around every pixel (stride 1, borders padded),
    exactly ``F.max_pool2d(x, 2r+1, 1, r)``, computed as a column max then a row max: 2(2r+1)
    comparisons per pixel instead of (2r+1)^2 (21x21 at the default radius: 4x faster on a CPU).
    Where a window holds tied maxima the gradient may go to another of the tied pixels."""
    size = 2 * radius + 1
    columns = F.max_pool2d(x, (size, 1), 1, (radius, 0))
    return F.max_pool2d(columns, (1, size), 1, (0, radius))


def shape_loss(logits: Tensor, kind: ShapeLoss, radius: int = 10) -> Tensor:
    """The configured shape term (``"none"`` gives a zero that keeps the graph)."""
    if kind == "maxpool":
        return smoothness_loss(logits, radius)
    if kind == "none":
        return logits.sum() * 0.0
    raise ValueError(f"shape_loss must be one of {SHAPE_LOSSES}, got {kind!r}")


def _rotate(x: Tensor, turns: Tensor, sign: int) -> Tensor:
    """Rotate each sample ``x[b]`` by ``sign * turns[b]`` quarter turns in the (H, W) plane.

    Every rotation is computed and selected per sample with ``torch.where``: no host sync to
    ask which rotations occur (the rotations are copies, cheap next to the net)."""
    square = x.shape[-1] == x.shape[-2]
    out = x
    for k in (1, 2, 3) if square else (2,):
        chosen = (turns == k).view(-1, *([1] * (x.dim() - 1)))
        out = torch.where(chosen, torch.rot90(x, sign * k, dims=(-2, -1)), out)
    return out


def augment_view(x: Tensor, noise_std: float, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(view, turns, flips)``: ``x`` plus N(0, noise_std) noise, flipped left-right
    where ``flips`` is True, then rotated by ``turns`` quarter turns (only 0 or 2 for
    non-square images, whose odd rotations would change the shape).

    Everything is drawn on ``x``'s device (a ``generator``, if given, must live there), so a GPU
    step makes no host-to-device copy and no host sync."""
    b, device = x.shape[0], x.device
    max_turns = 4 if x.shape[-1] == x.shape[-2] else 2
    turns = torch.randint(0, max_turns, (b,), generator=generator, device=device)
    if max_turns == 2:
        turns = turns * 2
    flips = torch.randint(0, 2, (b,), generator=generator, device=device).bool()
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    view = x + noise * noise_std
    view = torch.where(flips.view(-1, 1, 1, 1), view.flip(-1), view)
    return _rotate(view, turns, 1), turns, flips


def invert_view(y: Tensor, turns: Tensor, flips: Tensor) -> Tensor:
    """Map an output of the augmented view back onto the plain view's pixel grid."""
    y = _rotate(y, turns, -1)
    return torch.where(flips.view(-1, 1, 1, 1), y.flip(-1), y)
