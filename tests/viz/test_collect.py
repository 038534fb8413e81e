"""OverlayCases: the first cases per site, each by its largest-mask slice, every model kept."""

import torch

from iopfl_lightning.viz.collect import OverlayCases


def _batch(cases, slices, areas, size=8):
    mask = torch.zeros(len(cases), size, size, dtype=torch.long)
    for i, area in enumerate(areas):
        mask[i].view(-1)[:area] = 1
    image = torch.arange(len(cases) * 3 * size * size, dtype=torch.float32)
    return {"image": image.view(len(cases), 3, size, size), "mask": mask,
            "case": torch.tensor(cases), "slice": torch.tensor(slices)}


def _logits(batch, flip=False):
    fg = batch["mask"].float() if not flip else 1 - batch["mask"].float()
    return torch.stack([1 - fg, fg], 1)


def test_keeps_first_cases_by_largest_slice_across_batches():
    cases = OverlayCases(cases_per_site=2, num_classes=2)
    first = _batch([3, 3, 5], [0, 1, 0], [4, 9, 2])
    second = _batch([5, 5, 7], [1, 2, 0], [1, 6, 30])  # case 7: no room left
    for batch in (first, second):
        cases.update("A", batch, {"global": _logits(batch), "personalized": _logits(batch, True)})
    cases.update("B", first, {"global": _logits(first)})
    kept = cases._kept
    assert list(kept) == [("A", 3), ("A", 5), ("B", 3), ("B", 5)]
    assert (kept[("A", 3)].slice, kept[("A", 5)].slice) == (1, 2)
    assert kept[("A", 5)].area == 6
    assert torch.equal(kept[("A", 5)].preds["global"], second["mask"][1].to(torch.uint8))
    assert torch.equal(kept[("A", 5)].image, second["image"][1, 1])  # the middle channel
    assert set(kept[("B", 3)].preds) == {"global"}


def test_figure_marks_models_a_site_was_not_evaluated_with():
    cases = OverlayCases(cases_per_site=1)
    batch = _batch([0, 1], [0, 0], [10, 12])
    cases.update("inside", batch, {"global": _logits(batch), "personalized": _logits(batch)})
    cases.update("outside", batch, {"global": _logits(batch)})
    fig = cases.figure("Test results")
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_ylabel() for ax in panels[::2]] == ["inside case 0 slice 0",
                                                       "outside case 0 slice 0"]
    assert [t.get_text() for t in panels[3].texts] == ["not evaluated"]
    assert OverlayCases(cases_per_site=0).figure() is None
