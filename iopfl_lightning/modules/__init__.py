"""LightningModules: wiring around the pure-torch nets."""

from iopfl_lightning.modules.routing import RoutingModule
from iopfl_lightning.modules.segmentation import SegmentationModule

__all__ = ["RoutingModule", "SegmentationModule"]
