"""Pure-torch networks: the paper's UNet, an smp factory, and (later) routed layers."""

from iopfl_lightning.nets.factory import (
    NetSpec,
    available_nets,
    build_from_spec,
    build_net,
    net_spec,
)
from iopfl_lightning.nets.unet import UNet

__all__ = ["NetSpec", "UNet", "available_nets", "build_from_spec", "build_net", "net_spec"]
