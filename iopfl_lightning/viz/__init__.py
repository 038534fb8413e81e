"""Pictures of runs: segmentation overlays, per-site bar charts, routing heatmaps.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (rendered with
Agg; displays inline in Jupyter); ``save_figure`` writes one as a PNG atomically.
"""

from iopfl_lightning.viz.charts import site_bar_chart
from iopfl_lightning.viz.figures import figure_png, save_figure
from iopfl_lightning.viz.overlays import overlay_grid
from iopfl_lightning.viz.routing import routing_heatmap

__all__ = ["figure_png", "overlay_grid", "routing_heatmap", "save_figure", "site_bar_chart"]
