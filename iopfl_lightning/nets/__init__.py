"""Pure-torch networks: the paper's UNet, an smp factory, and (later) routed layers."""

from iopfl_lightning.nets.factory import (
    NetSpec,
    available_nets,
    build_from_spec,
    build_net,
    net_spec,
)
from iopfl_lightning.nets.routed import (
    build_routed_net,
    mixture_weights,
    norm_affine_parameters,
    routed_layers,
    router_parameters,
    set_gate_override,
    set_mixture_recording,
)
from iopfl_lightning.nets.routed_layers import (
    RoutedConv2d,
    RoutedConvTranspose2d,
    RoutedLayer,
    RoutedLinear,
    RouterConfig,
)
from iopfl_lightning.nets.unet import UNet

__all__ = [
    "NetSpec",
    "RoutedConv2d",
    "RoutedConvTranspose2d",
    "RoutedLayer",
    "RoutedLinear",
    "RouterConfig",
    "UNet",
    "available_nets",
    "build_from_spec",
    "build_net",
    "build_routed_net",
    "mixture_weights",
    "net_spec",
    "norm_affine_parameters",
    "routed_layers",
    "router_parameters",
    "set_gate_override",
    "set_mixture_recording",
]
