"""The plotting API: overlays, per-site bar charts, routing heatmaps, atomic PNG saving."""

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from matplotlib.container import BarContainer

from iopfl_lightning.viz import (
    figure_png,
    overlay_grid,
    routing_heatmap,
    save_figure,
    site_bar_chart,
)
from iopfl_lightning.viz.overlays import MASK_COLOR, PRED_COLOR, slice_dice


def _square(n: int, lo: int, hi: int, size: int = 16) -> torch.Tensor:
    out = torch.zeros(n, size, size, dtype=torch.long)
    out[:, lo:hi, lo:hi] = 1
    return out


def _contour_colors(ax) -> list[tuple]:
    return [tuple(np.round(c.get_edgecolor()[0], 3)) for c in ax.collections]


def test_overlay_grid_draws_image_mask_and_prediction_contours_per_model():
    images = torch.rand(2, 3, 16, 16)
    masks, preds = _square(2, 4, 10), _square(2, 5, 12)
    fig = overlay_grid(images, masks, {"global": preds, "personalized": masks},
                       titles=["A case 0", "B case 1"])
    axes = [ax for ax in fig.axes if ax.axison]
    assert len(axes) == 4
    assert [ax.get_title() for ax in axes[:2]] == ["global", "personalized"]
    assert axes[0].get_ylabel() == "A case 0" and axes[2].get_ylabel() == "B case 1"
    want = {tuple(np.round(to_rgba(c), 3)) for c in (MASK_COLOR, PRED_COLOR)}
    assert set(_contour_colors(axes[0])) == want and len(axes[0].collections) == 2
    np.testing.assert_allclose(axes[0].images[0].get_array(), images[0, 1].numpy())
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["ground truth", "prediction"]
    assert [t.get_text() for t in axes[0].texts] == ["Dice 0.59"]  # 2 * 25 / (36 + 49)


def test_overlay_grid_wraps_slices_keeping_each_slice_models_together():
    masks = _square(4, 4, 10)
    fig = overlay_grid(torch.rand(4, 16, 16), masks, {"global": masks, "routed": masks},
                       titles=list("abcd"), ncols=2)
    grid = fig.axes[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols) == (2, 4)
    assert [ax.get_ylabel() for ax in fig.axes] == ["a", "", "b", "", "c", "", "d", ""]
    assert [ax.get_title() for ax in fig.axes[:4]] == ["global", "routed"] * 2


def test_overlay_grid_single_prediction_set_empty_masks_and_several_classes():
    masks = np.zeros((5, 16, 16), dtype=np.int64)  # empty: no contour, no error
    masks[1, 2:6, 2:6], masks[1, 3:5, 3:5] = 1, 2
    fig = overlay_grid(np.random.rand(5, 16, 16), masks, masks, class_names=["bg", "rim", "cup"],
                       ncols=3)
    shown = [ax for ax in fig.axes if ax.axison]
    assert len(shown) == 5 and len(fig.axes) == 6
    assert len(shown[0].collections) == 0 and len(shown[1].collections) == 4
    assert [t.get_text() for t in fig.legends[0].get_texts()][2:] == ["rim", "cup"]


def test_overlay_grid_refuses_mismatched_inputs():
    images, masks = torch.rand(2, 1, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"preds\['global'\] must be integer label maps"):
        overlay_grid(images, masks, {"global": torch.zeros(2, 8, 9)})
    with pytest.raises(ValueError, match="titles has 1 entries for 2 slices"):
        overlay_grid(images, masks, masks, titles=["a"])
    with pytest.raises(ValueError, match="must hold integer labels"):
        overlay_grid(images, masks, torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        overlay_grid(torch.rand(8, 8), masks, masks)


def test_slice_dice():
    mask, pred = np.zeros((4, 4), int), np.zeros((4, 4), int)
    assert slice_dice(mask, pred, [1]) == 1.0
    mask[:2], pred[:1] = 1, 1
    assert slice_dice(mask, pred, [1]) == pytest.approx(2 * 4 / 12)


def test_site_bar_chart_groups_models_per_site_with_a_mean():
    rows = [{"site": s, "model": m, "dice": str(d), "hd95": 2.0}
            for s, d0 in (("A", 0.5), ("B", 0.7)) for m, d in (("global", d0), ("pers", d0 + 0.2))]
    rows[-1]["dice"] = "nan"
    fig = site_bar_chart(rows, metric=("dice", "hd95"))
    dice_ax = fig.axes[0]
    heights = [p.get_height() for p in dice_ax.patches]
    assert heights[:3] == pytest.approx([0.5, 0.7, 0.6])  # global: A, B, mean
    assert heights[3] == pytest.approx(0.7) and np.isnan(heights[4]) and heights[5] == 0.7
    assert [t.get_text() for t in dice_ax.get_xticklabels()] == ["A", "B", "mean"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["global", "pers"]
    with pytest.raises(ValueError, match="has no 'hd95' column"):
        site_bar_chart([{"site": "A", "model": "g", "dice": 1.0}], metric="hd95")


def test_site_bar_chart_mean_is_over_the_sites_every_model_has():
    rows = [{"site": s, "model": m, "dice": 0.8, "hd95": 2.0} for s in ("A", "B")
            for m in ("global", "pers")] + [{"site": "OUT", "model": "global", "dice": 0.2,
                                              "hd95": 9.0}]
    heights = [p.get_height() for p in site_bar_chart(rows, metric="dice").axes[0].patches]
    assert heights[3] == pytest.approx(0.8)  # global's mean leaves out OUT, as the table's


def test_site_bar_chart_error_bars_and_other_groups():
    rows = [{"site": "mean", "method": m, "dice": 0.5, "dice_std": s}
            for m, s in (("fedavg", 0.1), ("iopfl", float("nan")))]
    fig = site_bar_chart(rows, group="method", error="{metric}_std")
    bars = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    assert [b.errorbar is not None for b in bars] == [True, False]  # NaN std: no error bar


def test_routing_heatmap_from_recorded_mixtures():
    weights = {"enc.0": torch.tensor([0.7, 0.2, 0.1]), "dec.0": torch.tensor([0.1, 0.1, 0.8])}
    fig = routing_heatmap(weights, expert_names=["A", "B", "global"])
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]],
                               rtol=1e-6)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["enc.0", "dec.0"]
    assert len(ax.texts) == 6
    with pytest.raises(ValueError, match="2 expert names for 3 experts"):
        routing_heatmap(np.ones((2, 3)) / 3, expert_names=["A", "B"])
    with pytest.raises(ValueError, match="set_mixture_recording"):
        routing_heatmap({})


def test_save_figure_writes_a_png_atomically(tmp_path):
    fig = site_bar_chart([{"site": "A", "model": "g", "dice": 0.5, "hd95": 1.0}])
    path = save_figure(fig, tmp_path / "sub" / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" == figure_png(fig)[:8]
    assert [p.name for p in path.parent.iterdir()] == ["chart.png"]  # no temporary left
    with pytest.raises(ValueError, match="use a .png name"):
        save_figure(fig, tmp_path / "chart.jpg")
