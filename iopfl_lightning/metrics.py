"""Per-case segmentation metrics: foreground Dice and HD95 with all slices of a case pooled.

The paper's data are 2D slices of 3D scans. A scan (a *case*) is the unit a clinician cares
about, so both metrics group the slices of each case, score the case, and average over the
cases seen (use one metric instance per site to get a site's score). This differs from the
reference code, which averages a per-batch Dice that includes the background class;
:func:`dice_reference_style` reproduces that number for comparison.

Inputs of ``update(preds, target, case, slice=None)``:

- ``preds``: label map ``[B, H, W]`` (integers in ``[0, num_classes)``), or logits / probabilities
  ``[B, num_classes, H, W]`` that are arg-maxed;
- ``target``: label map ``[B, H, W]``;
- ``case``: integer case id per slice ``[B]`` (a plain int applies to the whole batch). Ids must
  be unique within the metric instance (e.g. within a site);
- ``slice``: optional slice index per sample ``[B]``, used by :class:`CaseHD95` to order the
  slices of a case; without it slices are stacked in the order they arrive.

Class 0 is background; both metrics report foreground classes ``1..num_classes-1``, averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "CaseDice",
    "CaseHD95",
    "dice_from_counts",
    "dice_reference_style",
    "foreground_counts",
    "hd95",
]


def _as_labels(preds: Tensor, num_classes: int) -> Tensor:
    """Arg-max ``[B, C, H, W]`` scores to a label map; pass ``[B, H, W]`` label maps through."""
    if preds.ndim == 4:
        if preds.shape[1] != num_classes:
            raise ValueError(f"preds has {preds.shape[1]} channels, expected {num_classes}.")
        return preds.argmax(dim=1)
    return preds


def _out_of_range(labels: Tensor, num_classes: int) -> Tensor:
    """Number of labels outside ``[0, num_classes)``, as a tensor (no host synchronisation)."""
    return ((labels < 0) | (labels >= num_classes)).sum()


def _check_inputs(
    preds: Tensor, target: Tensor, case: Tensor | int, slice_: Tensor | None, num_classes: int,
    eager: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Validate and normalise ``update`` arguments; return long label maps, id vectors and,
    with ``eager=False``, the count of out-of-range labels (checked later, at ``compute``)
    instead of reading it back now."""
    preds = _as_labels(preds, num_classes)
    if preds.ndim != 3 or preds.shape != target.shape:
        raise ValueError(
            f"Expected preds and target label maps of equal shape [B, H, W], got "
            f"{tuple(preds.shape)} and {tuple(target.shape)}."
        )
    bad = None
    for what, labels in (("preds", preds), ("target", target)):
        if labels.is_floating_point():
            raise ValueError(f"{what} must hold integer labels, got dtype {labels.dtype}.")
        count = _out_of_range(labels, num_classes)
        if eager and bool(count):
            raise ValueError(f"{what} has labels outside [0, {num_classes}): "
                             f"min {int(labels.min())}, max {int(labels.max())}.")
        bad = count if bad is None else bad + count
    batch = preds.shape[0]
    case = torch.as_tensor(case, device=preds.device).long().reshape(-1)
    if case.numel() not in (1, batch):
        raise ValueError(f"case has {case.numel()} entries for a batch of {batch}.")
    case = case.expand(batch)
    if slice_ is not None:
        slice_ = torch.as_tensor(slice_, device=preds.device).long().reshape(-1)
        if slice_.numel() != batch:
            raise ValueError(f"slice has {slice_.numel()} entries for a batch of {batch}.")
    return preds.long(), target.long(), case.clone(), slice_, None if eager else bad


def foreground_counts(preds: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, ...]:
    """Per-sample, per-foreground-class (intersection, pred sum, target sum), each ``[B, C-1]``.

    One comparison with every foreground class and sums over the pixels: no loop over samples
    and no host synchronisation (a CUDA ``bincount`` reads its input's maximum back to size its
    output, which stalls the GPU queue at every evaluation batch).
    """
    classes = torch.arange(1, num_classes, device=preds.device).view(1, -1, 1, 1)
    pred_hit, target_hit = preds.unsqueeze(1) == classes, target.unsqueeze(1) == classes
    return (pred_hit & target_hit).sum((2, 3)), pred_hit.sum((2, 3)), target_hit.sum((2, 3))


def dice_from_counts(inter: Tensor, psum: Tensor, tsum: Tensor) -> Tensor:
    """Dice ``2I / (P + T)``; 1.0 where a class is absent from both prediction and target.

    Absent-in-both counts as a perfect score because predicting nothing where there is nothing
    is correct; scoring it 0 (or dropping it) would make a case's Dice depend on which classes
    happen to appear in it.
    """
    denom = (psum + tsum).double()
    dice = 2 * inter.double() / denom.clamp_min(1)
    return torch.where(denom > 0, dice, torch.ones_like(dice)).float()


def _group_by_case(case: Tensor, *values: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Sum the rows of each value tensor per case id; return sorted ids and summed rows."""
    ids, inverse = torch.unique(case, sorted=True, return_inverse=True)
    summed = []
    for val in values:
        out = torch.zeros((len(ids), *val.shape[1:]), dtype=val.dtype, device=val.device)
        summed.append(out.index_add_(0, inverse, val))
    return ids, summed


class _CaseMetric(Metric):
    """Shared plumbing: case-id state, synced ``per_case`` and the mean over cases."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, num_classes: int, eager_checks: bool | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}.")
        self.num_classes = num_classes
        # None: check label ranges in ``update`` on the CPU, at ``compute`` on an accelerator
        # (an ``update``-time check there would synchronise with the device at every batch).
        self.eager_checks = eager_checks
        self.add_state("case", default=[], dist_reduce_fx="cat")
        self.add_state("out_of_range", default=torch.tensor(0), dist_reduce_fx="sum")

    def _checked(self, preds: Tensor, target: Tensor, case: Tensor | int,
                 slice_: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        eager = self.eager_checks
        eager = preds.device.type == "cpu" if eager is None else eager
        preds, target, case, slice_, bad = _check_inputs(
            preds, target, case, slice_, self.num_classes, eager)
        if bad is not None:
            self.out_of_range += bad
        return preds, target, case, slice_

    def _raise_if_out_of_range(self) -> None:
        count = int(self.out_of_range)
        if count:
            raise ValueError(f"{count} pixels of preds or target had labels outside "
                             f"[0, {self.num_classes}) in the batches given to update().")

    def _per_case(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def per_case(self) -> tuple[Tensor, Tensor]:
        """Return ``(case_ids [n], values [n, num_classes - 1])``, synced across processes."""
        synced = self._is_synced
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            process_group=self.process_group,
            should_sync=not synced,
            should_unsync=not synced,
        ):
            self._raise_if_out_of_range()
            return self._per_case()

    def compute(self) -> Tensor:
        """Mean over foreground classes, then over cases (NaN before any update)."""
        # ``case`` is a list of batches locally and one tensor after a distributed sync.
        if not len(self.case):
            return torch.tensor(float("nan"))
        self._raise_if_out_of_range()
        return self._per_case()[1].mean(dim=1).mean()


class CaseDice(_CaseMetric):
    """Foreground Dice per case (slices pooled), averaged over classes and then over cases.

    Only per-slice counts are stored, so memory is ``O(slices * classes)``. ``slice`` is
    accepted for a uniform signature and ignored: pooled sums do not depend on slice order.
    """

    higher_is_better = True

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        for name in ("inter", "psum", "tsum"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, case: Tensor | int,
               slice: Tensor | None = None) -> None:
        """Accumulate per-slice foreground counts tagged with their case ids."""
        preds, target, case, _ = self._checked(preds, target, case, slice)
        inter, psum, tsum = foreground_counts(preds, target, self.num_classes)
        self.case.append(case)
        self.inter.append(inter)
        self.psum.append(psum)
        self.tsum.append(tsum)

    def _per_case(self) -> tuple[Tensor, Tensor]:
        cols = [dim_zero_cat(s) for s in (self.inter, self.psum, self.tsum)]
        ids, (inter, psum, tsum) = _group_by_case(dim_zero_cat(self.case), *cols)
        return ids, dice_from_counts(inter, psum, tsum)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face-neighbour outside it (the volume border counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def _crop_to_union(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one empty voxel each side.

    Exact for surface distances (every surface voxel stays inside) and makes the distance
    transform several times cheaper on typical small organs.
    """
    union = pred | target
    box = []
    for axis in range(union.ndim):
        hits = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(hits[0], hits[-1] + 1))
    pad = [(1, 1)] * union.ndim
    return np.pad(pred[tuple(box)], pad), np.pad(target[tuple(box)], pad)


def hd95(pred: np.ndarray | Tensor, target: np.ndarray | Tensor,
         spacing: Sequence[float] | None = None) -> float:
    """95th percentile of the symmetric surface distance between two binary masks (2D or 3D).

    Distances from each surface voxel of one mask to the nearest surface voxel of the other,
    both directions pooled, 95th percentile with linear interpolation (the medpy ``hd95``
    convention). Units are pixels, or ``spacing`` units per axis if given.
    Both masks empty -> 0.0; exactly one empty -> the length of the volume's diagonal, an upper
    bound on any distance inside it (a missed or hallucinated structure is the worst error).

    Implementation note: on a 16x128x128 volume (2 CPU cores) scipy's exact Euclidean distance
    transform took ~60 ms, against ~660 ms for torchmetrics' ``mask_edges`` plus a pairwise
    ``torch.cdist`` between edge voxels (whose memory also grows with edges squared;
    torchmetrics' own ``distance_transform`` is 2D only). Hence scipy; cropping to the union's
    bounding box brings it to ~40 ms there.
    """
    pred = np.asarray(torch.as_tensor(pred).cpu(), dtype=bool)
    target = np.asarray(torch.as_tensor(target).cpu(), dtype=bool)
    spacing = [1.0] * pred.ndim if spacing is None else [float(s) for s in spacing]
    has_p, has_t = pred.any(), target.any()
    if not (has_p or has_t):
        return 0.0
    if not (has_p and has_t):
        return math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing, strict=True)))
    pred, target = _crop_to_union(pred, target)
    surf_p, surf_t = _surface(pred), _surface(target)
    to_t = ndimage.distance_transform_edt(~surf_t, sampling=spacing)[surf_p]
    to_p = ndimage.distance_transform_edt(~surf_p, sampling=spacing)[surf_t]
    return float(np.percentile(np.concatenate([to_t, to_p]), 95))


class CaseHD95(_CaseMetric):
    """HD95 per case on the case's slices stacked into a volume ``[N, H, W]``, in pixels.

    Foreground classes are averaged per case, then cases are averaged. Conventions per class
    are those of :func:`hd95` (both empty -> 0, one empty -> the volume's diagonal).
    The label maps themselves are kept (as uint8) until ``compute``, because distances need the
    whole volume; all slices must share one ``H x W``. ``spacing`` (z, y, x) rescales distances.
    """

    higher_is_better = False

    def __init__(self, num_classes: int, spacing: Sequence[float] | None = None, **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        if num_classes > 256:
            raise ValueError(f"CaseHD95 stores labels as uint8; num_classes {num_classes} > 256.")
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        for name in ("preds", "target", "slice"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, case: Tensor | int,
               slice: Tensor | None = None) -> None:
        """Store the slices' label maps with their case ids and slice indices."""
        preds, target, case, slice_ = self._checked(preds, target, case, slice)
        if self.preds and self.preds[0].shape[1:] != preds.shape[1:]:
            raise ValueError(
                f"CaseHD95 needs one slice size; got {tuple(preds.shape[1:])} after "
                f"{tuple(self.preds[0].shape[1:])}."
            )
        self.preds.append(preds.to(torch.uint8))
        self.target.append(target.to(torch.uint8))
        self.case.append(case)
        # Without slice indices, -1 everywhere: the stable sort below keeps arrival order.
        self.slice.append(slice_ if slice_ is not None else torch.full_like(case, -1))

    def _volumes(self) -> tuple[Tensor, Tensor, Tensor]:
        """All stored slices sorted by (case, slice), stable so arrival order breaks ties."""
        case, slice_ = dim_zero_cat(self.case), dim_zero_cat(self.slice)
        order = torch.sort(slice_, stable=True).indices
        order = order[torch.sort(case[order], stable=True).indices]
        return case[order], dim_zero_cat(self.preds)[order], dim_zero_cat(self.target)[order]

    def _per_case(self) -> tuple[Tensor, Tensor]:
        case, preds, target = self._volumes()
        ids, counts = torch.unique_consecutive(case, return_counts=True)
        preds, target = preds.cpu().numpy(), target.cpu().numpy()
        values = np.zeros((len(ids), self.num_classes - 1))
        start = 0
        for row, n in enumerate(counts.tolist()):
            p, t = preds[start:start + n], target[start:start + n]
            for c in range(1, self.num_classes):
                values[row, c - 1] = hd95(p == c, t == c, self.spacing)
            start += n
        return ids, torch.as_tensor(values, dtype=torch.float32, device=case.device)


def dice_reference_style(preds: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """The reference code's Dice: per batch, background included, for comparison only.

    For every class (background too) and every sample: ``2I / (P + T + 1e-5)``; mean over
    the batch, then over classes. An absent class scores ~0, and background inflates the score,
    so it is not comparable with :class:`CaseDice`.
    """
    preds = _as_labels(preds, num_classes).long()
    target = target.long().reshape(preds.shape)
    batch = preds.shape[0]
    offset = torch.arange(batch, device=preds.device).view(-1, 1, 1) * num_classes
    size = batch * num_classes
    hit = preds == target
    inter = torch.bincount((offset + target).expand_as(target)[hit], minlength=size)
    psum = torch.bincount((offset + preds).reshape(-1), minlength=size)
    tsum = torch.bincount((offset + target).reshape(-1), minlength=size)
    dice = 2.0 * inter / (psum + tsum + 1e-5)
    return dice.view(batch, num_classes).mean(dim=0).mean()
