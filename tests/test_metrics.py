"""Tests for per-case Dice and HD95 against plain NumPy / loop implementations."""

import math

import numpy as np
import pytest
import torch

from iopfl_lightning.metrics import (
    CaseDice,
    CaseHD95,
    dice_reference_style,
    foreground_counts,
    hd95,
)

# ---------------------------------------------------------------- loop references


def np_case_dice(preds, target, case, num_classes):
    """Foreground Dice per case with slices pooled, by explicit loops."""
    out = {}
    for c_id in sorted(set(case.tolist())):
        sel = case == c_id
        p, t = preds[sel], target[sel]
        scores = []
        for c in range(1, num_classes):
            inter = np.sum((p == c) & (t == c))
            denom = np.sum(p == c) + np.sum(t == c)
            scores.append(1.0 if denom == 0 else 2.0 * inter / denom)
        out[c_id] = scores
    return out


def np_surface(mask):
    """Voxels of mask with a face neighbour (or the border) outside it, by shifting."""
    padded = np.pad(mask, 1)
    interior = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            shifted = np.roll(padded, step, axis=axis)[tuple([slice(1, -1)] * mask.ndim)]
            interior &= shifted
    return mask & ~interior


def np_hd95(pred, target):
    """Brute-force pooled symmetric 95th-percentile surface distance (no distance transform)."""
    sp, st = np.argwhere(np_surface(pred)), np.argwhere(np_surface(target))
    d = np.sqrt(((sp[:, None, :] - st[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def square(size=32, top=8, left=8, side=12, slices=None):
    img = np.zeros((size, size), dtype=np.int64)
    img[top:top + side, left:left + side] = 1
    return img if slices is None else np.repeat(img[None], slices, axis=0)


def t(x):
    return torch.as_tensor(np.asarray(x))


# ---------------------------------------------------------------- Dice


def test_foreground_counts_match_loops():
    g = torch.Generator().manual_seed(0)
    p, y = torch.randint(0, 4, (5, 9, 7), generator=g), torch.randint(0, 4, (5, 9, 7), generator=g)
    inter, psum, tsum = foreground_counts(p, y, 4)
    for b in range(5):
        for c in range(1, 4):
            assert inter[b, c - 1] == ((p[b] == c) & (y[b] == c)).sum()
            assert psum[b, c - 1] == (p[b] == c).sum() and tsum[b, c - 1] == (y[b] == c).sum()


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_dice_random_matches_numpy(num_classes):
    rng = np.random.default_rng(num_classes)
    target = rng.integers(0, num_classes, (20, 16, 16))
    preds = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, num_classes, target.shape))
    case = rng.integers(0, 4, 20)
    metric = CaseDice(num_classes)
    metric.update(t(preds), t(target), t(case))
    ref = np_case_dice(preds, target, case, num_classes)
    ids, values = metric.per_case()
    assert ids.tolist() == sorted(ref)
    np.testing.assert_allclose(values.numpy(), [ref[i] for i in ids.tolist()], rtol=1e-6)
    expected = np.mean([np.mean(v) for v in ref.values()])
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)


def test_perfect_and_disjoint_dice():
    y = t(square(slices=3))
    metric = CaseDice(2)
    metric.update(y, y, 0)
    assert metric.compute().item() == 1.0
    metric.reset()
    metric.update(t(square(left=0, side=4, slices=3)), t(square(left=20, side=4, slices=3)), 0)
    assert metric.compute().item() == 0.0


def test_pooling_over_slices_differs_from_slice_average():
    # Slice 0: large object, predicted perfectly. Slice 1: tiny object, missed entirely.
    target = np.stack([square(side=16), square(side=2)])
    preds = np.stack([square(side=16), np.zeros((32, 32), dtype=np.int64)])
    metric = CaseDice(2)
    metric.update(t(preds), t(target), t([7, 7]))
    pooled = 2 * 256 / (256 + 260)
    assert metric.compute().item() == pytest.approx(pooled)
    assert pooled != pytest.approx((1.0 + 0.0) / 2)


def test_dice_multi_batch_equals_single_batch():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 3, (24, 8, 8))
    preds = np.where(rng.random(target.shape) < 0.6, target, 0)
    case = np.repeat(np.arange(4), 6)
    single, multi = CaseDice(3), CaseDice(3)
    single.update(t(preds), t(target), t(case))
    order = rng.permutation(24)
    for chunk in np.array_split(order, 5):
        multi.update(t(preds[chunk]), t(target[chunk]), t(case[chunk]))
    assert multi.compute().item() == pytest.approx(single.compute().item(), rel=1e-6)


def test_dice_empty_class_conventions():
    empty = np.zeros((2, 16, 16), dtype=np.int64)
    metric = CaseDice(3)
    metric.update(t(empty), t(empty), 0)  # nothing anywhere: both classes perfect
    metric.update(t(empty), t(square(size=16, top=2, left=2, side=4, slices=2)), 1)
    _, values = metric.per_case()
    assert values.tolist() == [[1.0, 1.0], [0.0, 1.0]]  # class 2 absent in both -> 1.0


def test_dice_forward_returns_batch_value_and_accumulates():
    y = t(square(slices=2))
    metric = CaseDice(2)
    assert metric(y, y, t([0, 0])).item() == 1.0
    assert metric(torch.zeros_like(y), y, t([1, 1])).item() == 0.0
    assert metric.compute().item() == pytest.approx(0.5)


def test_logits_are_argmaxed():
    y = t(square(slices=2))
    logits = torch.nn.functional.one_hot(y, 2).permute(0, 3, 1, 2).float()
    metric = CaseDice(2)
    metric.update(logits, y, 0)
    assert metric.compute().item() == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preds": torch.full((1, 4, 4), 3)}, "outside \\[0, 2\\)"),
        ({"preds": torch.zeros(1, 4, 5, dtype=torch.long)}, "equal shape"),
        ({"preds": torch.zeros(1, 4, 4)}, "integer labels"),
        ({"case": torch.zeros(3, dtype=torch.long)}, "case has 3 entries"),
    ],
)
@pytest.mark.parametrize("cls", [CaseDice, CaseHD95])
def test_input_errors(cls, kwargs, match):
    args = {"preds": torch.zeros(1, 4, 4, dtype=torch.long),
            "target": torch.zeros(1, 4, 4, dtype=torch.long), "case": torch.zeros(1)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cls(2).update(**args)


def test_needs_foreground_class():
    with pytest.raises(ValueError, match="num_classes"):
        CaseDice(1)


def test_compute_before_update_is_nan():
    with pytest.warns(UserWarning):
        assert math.isnan(CaseDice(2).compute().item())


def test_reference_style_dice_matches_loop():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, (4, 10, 10))
    p = np.where(rng.random(y.shape) < 0.5, y, 0)
    total = 0.0
    for c in range(3):
        per_sample = [2 * np.sum((p[b] == c) & (y[b] == c))
                      / (np.sum(p[b] == c) + np.sum(y[b] == c) + 1e-5) for b in range(4)]
        total += np.mean(per_sample)
    assert dice_reference_style(t(p), t(y), 3).item() == pytest.approx(total / 3, rel=1e-5)


# ---------------------------------------------------------------- HD95


def test_hd95_perfect_is_zero():
    y = t(square(slices=4))
    metric = CaseHD95(2)
    metric.update(y, y, 0)
    assert metric.compute().item() == 0.0


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("slices", [None, 6])
def test_shifted_square_hd95_is_shift(k, slices):
    target = square(left=8, slices=slices)
    preds = square(left=8 + k, slices=slices)
    assert hd95(preds == 1, target == 1) == pytest.approx(k, abs=1e-6)
    if slices:
        metric = CaseHD95(2)
        metric.update(t(preds), t(target), 0)
        assert metric.compute().item() == pytest.approx(k, abs=1e-6)


def test_hd95_matches_brute_force_on_random_volumes():
    rng = np.random.default_rng(4)
    for _ in range(5):
        shape = (rng.integers(1, 5), 12, 14)
        pred, target = rng.random(shape) < 0.2, rng.random(shape) < 0.2
        pred[0, 3:8, 3:8] = target[-1, 5:10, 6:12] = True
        assert hd95(pred, target) == pytest.approx(np_hd95(pred, target), rel=1e-6)


def test_hd95_disjoint_matches_brute_force():
    pred, target = square(left=0, side=4) == 1, square(left=24, side=4) == 1
    assert hd95(pred, target) == pytest.approx(np_hd95(pred, target))
    assert hd95(pred, target) >= 20


def test_hd95_empty_conventions():
    empty = np.zeros((3, 16, 20), dtype=np.int64)
    target = empty.copy()
    target[1, 4:8, 4:8] = 1
    metric = CaseHD95(2)
    metric.update(t(empty), t(empty), 0)
    metric.update(t(empty), t(target), 1)
    _, values = metric.per_case()
    assert values[:, 0].tolist() == pytest.approx([0.0, math.sqrt(3**2 + 16**2 + 20**2)])


def test_hd95_averages_foreground_classes_and_cases():
    rng = np.random.default_rng(5)
    target = rng.integers(0, 3, (8, 12, 12))
    preds = np.where(rng.random(target.shape) < 0.8, target, 0)
    case = np.repeat([3, 1], 4)
    metric = CaseHD95(3)
    metric.update(t(preds), t(target), t(case))
    ids, values = metric.per_case()
    assert ids.tolist() == [1, 3]
    for row, c_id in enumerate(ids.tolist()):
        sel = case == c_id
        for c in (1, 2):
            expected = np_hd95(preds[sel] == c, target[sel] == c)
            assert values[row, c - 1].item() == pytest.approx(expected, rel=1e-5)
    assert metric.compute().item() == pytest.approx(values.mean().item())


def test_slice_indices_order_the_volume():
    # An object that shrinks over slices 0..3; the prediction repeats the previous slice's
    # larger outline on slices 1 and 2. Slices arrive scrambled: with slice indices the case
    # volume is rebuilt in order, without them it is stacked in arrival order (a different
    # volume with another HD95).
    vol_t = np.zeros((6, 20, 20), dtype=np.int64)
    for z in range(4):
        vol_t[z, 2 + 2 * z:18 - 2 * z, 2 + 2 * z:18 - 2 * z] = 1
    vol_p = vol_t.copy()
    vol_p[1:3] = vol_t[0:2]
    arrival = np.array([0, 3, 5, 1, 4, 2])
    with_idx, without_idx = CaseHD95(2), CaseHD95(2)
    for i in arrival:
        with_idx.update(t(vol_p[i:i + 1]), t(vol_t[i:i + 1]), 0, slice=t([i]))
        without_idx.update(t(vol_p[i:i + 1]), t(vol_t[i:i + 1]), 0)
    ordered = hd95(vol_p == 1, vol_t == 1)
    scrambled = hd95(vol_p[arrival] == 1, vol_t[arrival] == 1)
    assert ordered != pytest.approx(scrambled)
    assert with_idx.compute().item() == pytest.approx(ordered)
    assert without_idx.compute().item() == pytest.approx(scrambled)


def test_hd95_multi_batch_equals_single_batch():
    rng = np.random.default_rng(6)
    target = np.zeros((12, 16, 16), dtype=np.int64)
    target[:, 4:12, 5:11] = 1
    preds = np.roll(target, 1, axis=2)
    preds[rng.random(preds.shape) < 0.02] = 1
    case, sl = np.repeat([0, 1, 2], 4), np.tile(np.arange(4), 3)
    single, multi = CaseHD95(2), CaseHD95(2)
    single.update(t(preds), t(target), t(case), t(sl))
    for chunk in np.array_split(rng.permutation(12), 4):
        multi.update(t(preds[chunk]), t(target[chunk]), t(case[chunk]), t(sl[chunk]))
    assert multi.compute().item() == pytest.approx(single.compute().item())


def test_hd95_spacing_scales_distances():
    target = square(left=8, slices=4)
    preds = square(left=10, slices=4)
    metric = CaseHD95(2, spacing=(3.0, 1.0, 0.5))
    metric.update(t(preds), t(target), 0)
    assert metric.compute().item() == pytest.approx(1.0)


def test_hd95_rejects_changing_slice_size():
    metric = CaseHD95(2)
    metric.update(torch.zeros(1, 8, 8, dtype=torch.long), torch.zeros(1, 8, 8, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="one slice size"):
        metric.update(torch.zeros(1, 8, 16, dtype=torch.long),
                      torch.zeros(1, 8, 16, dtype=torch.long), 1)


@pytest.mark.parametrize("cls", [CaseDice, CaseHD95])
def test_per_case_syncs_and_restores_local_state(cls):
    """With a (simulated) second rank holding another case, both see all cases."""
    other = {"count": 0}

    def fake_gather(tensor, group=None):
        other["count"] += 1
        if tensor.dtype == torch.uint8:  # the other rank's label maps: all background
            return [tensor, torch.zeros_like(tensor)]
        if tensor.ndim == 1 and other["count"] == 1:  # the case ids: the other rank's is 9
            return [tensor, torch.full_like(tensor, 9)]
        return [tensor, tensor.clone()]

    y = t(square(slices=2))
    metric = cls(2, dist_sync_fn=fake_gather, distributed_available_fn=lambda: True)
    metric.update(y, y, t([0, 0]), t([0, 1]))
    ids, _ = metric.per_case()
    assert ids.tolist() == [0, 9]
    assert len(metric.case) == 1 and metric.case[0].tolist() == [0, 0]  # unsynced again
    other["count"] = 0
    assert not math.isnan(metric.compute().item())


@pytest.mark.parametrize("cls", [CaseDice, CaseHD95])
def test_deferred_range_check_raises_at_compute(cls):
    """On an accelerator the label range is checked at compute (no sync per batch); the same
    path is forced here on the CPU. Good batches before or after do not hide a bad one."""
    metric = cls(2, eager_checks=False)
    good = torch.zeros(1, 4, 4, dtype=torch.long)
    metric.update(good, good, 0)
    metric.update(torch.full((1, 4, 4), 3), good, 1)  # no error yet: nothing was read back
    metric.update(good, good, 2)
    with pytest.raises(ValueError, match="16 pixels of preds or target had labels outside"):
        metric.compute()
    metric.reset()
    metric.update(good, good, 0)
    assert metric.compute().item() == (1.0 if cls is CaseDice else 0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_dice_equals_cpu_and_defers_the_range_check():
    g = torch.Generator().manual_seed(3)
    preds, target = torch.randint(0, 3, (6, 20, 20), generator=g), torch.randint(0, 3, (6, 20, 20), generator=g)
    case = torch.tensor([0, 0, 1, 1, 2, 2])
    cpu, gpu = CaseDice(3), CaseDice(3)
    cpu.update(preds, target, case)
    gpu = gpu.cuda()
    gpu.update(preds.cuda(), target.cuda(), case.cuda())
    # same counts; the float32 means may round differently on the GPU (seen: last bit, H200)
    torch.testing.assert_close(gpu.compute().cpu(), cpu.compute())
    bad = CaseDice(3).cuda()
    bad.update(torch.full((1, 4, 4), 5, device="cuda"), torch.zeros(1, 4, 4, dtype=torch.long,
                                                                      device="cuda"), 0)
    with pytest.raises(ValueError, match="16 pixels of preds or target had labels outside"):
        bad.compute()
