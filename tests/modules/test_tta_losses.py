"""Label-free test-time losses and the invertible augmented view."""

import math

import pytest
import torch
import torch.nn.functional as F

from iopfl_lightning.modules import tta_losses as tl


def test_view_inverts_exactly_without_noise():
    torch.manual_seed(0)
    x = torch.randn(8, 2, 6, 6)
    view, turns, flips = tl.augment_view(x, noise_std=0.0)
    assert not torch.equal(view, x)  # some sample was turned or flipped
    assert torch.equal(tl.invert_view(view, turns, flips), x)


def test_view_matches_per_sample_flip_then_rotation():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 2, 5, 5)
    view, turns, flips = tl.augment_view(x, noise_std=0.0, generator=gen)
    assert set(turns.tolist()) == {0, 1, 2, 3} and flips.any() and not flips.all()
    for b in range(x.shape[0]):
        want = x[b].flip(-1) if flips[b] else x[b]
        want = torch.rot90(want, int(turns[b]), dims=(-2, -1))
        assert torch.equal(view[b], want)


def test_view_is_reproducible_with_a_generator():
    x = torch.randn(4, 1, 8, 8)
    a = tl.augment_view(x, 0.3, torch.Generator().manual_seed(1))
    b = tl.augment_view(x, 0.3, torch.Generator().manual_seed(1))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_view_non_square_keeps_shape():
    x = torch.randn(6, 1, 4, 8)
    view, turns, flips = tl.augment_view(x, noise_std=0.0)
    assert view.shape == x.shape and set(turns.tolist()) <= {0, 2}
    assert torch.equal(tl.invert_view(view, turns, flips), x)


def test_noise_has_requested_std():
    x = torch.zeros(4, 3, 32, 32)
    view, turns, flips = tl.augment_view(x, noise_std=0.5)
    assert view.std().item() == pytest.approx(0.5, rel=0.05)


def test_entropy_bounds():
    assert tl.entropy_loss(torch.zeros(2, 3, 4, 4)).item() == pytest.approx(1.0)
    sure = torch.zeros(2, 2, 4, 4)
    sure[:, 1] = 50.0
    assert tl.entropy_loss(sure).item() == pytest.approx(0.0, abs=1e-6)


def test_consistency_and_shape():
    a = torch.randn(2, 2, 8, 8)
    assert tl.consistency_loss(a, a).item() == 0.0
    assert tl.consistency_loss(a, -a).item() > 0
    flat = torch.zeros(1, 2, 8, 8)
    assert tl.shape_loss(flat, "maxpool").item() == 0.0
    edge = torch.zeros(1, 2, 8, 8)
    edge[:, 1, :, 4:] = 10.0
    assert tl.shape_loss(edge, "maxpool", radius=1).item() > 0
    assert tl.shape_loss(edge, "none").item() == 0.0
    with pytest.raises(ValueError, match="shape_loss"):
        tl.shape_loss(edge, "sdf")  # type: ignore[arg-type]
    assert math.isfinite(tl.smoothness_loss(edge).item())


@pytest.mark.parametrize("radius,shape", [(1, (2, 1, 7, 9)), (3, (1, 2, 12, 10)), (10, (2, 1, 30, 25))])
def test_window_max_is_max_pool(radius, shape):
    """Column max then row max is the square max pool exactly, and without ties (random data)
    the gradient reaches the same pixels."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(radius), requires_grad=True)
    y = torch.randn(*shape, generator=torch.Generator().manual_seed(radius + 1))
    want = F.max_pool2d(x, 2 * radius + 1, 1, radius)
    got = tl.window_max(x, radius)
    assert torch.equal(got, want)
    (grad_want,) = torch.autograd.grad((want * y).sum(), x)
    (grad_got,) = torch.autograd.grad((got * y).sum(), x)
    torch.testing.assert_close(grad_got, grad_want)
