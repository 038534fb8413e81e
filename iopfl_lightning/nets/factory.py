"""Build segmentation networks by name, and describe them with a plain, saveable spec.

Names:

- ``"unet"``: the paper's :class:`~iopfl_lightning.nets.unet.UNet`;
- ``"smp.<Arch>"``: any segmentation-models-pytorch architecture (``"smp.Unet"``,
  ``"smp.FPN"``, ``"smp.DeepLabV3Plus"``, ...; case-insensitive), built with
  ``smp.create_model``. ``encoder_weights`` defaults to ``None`` so nothing is downloaded
  unless asked for.

A *net spec* is a flat dict of the arguments that rebuild a network (``{"name": "unet",
"in_channels": 3, "num_classes": 2, "features": 32}``). It holds only JSON-friendly values
because it is stored next to weights (e.g. inside ``routing_space.pt``) and must load with
``torch.load(weights_only=True)`` and survive a ``json`` round trip.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import segmentation_models_pytorch as smp
from torch import nn

from iopfl_lightning.nets.unet import UNet

SpecScalar: TypeAlias = str | int | float | bool | None
#: A flat, JSON-serialisable description of a network (see :func:`net_spec`).
NetSpec: TypeAlias = dict[str, SpecScalar | list[SpecScalar]]

SMP_PREFIX = "smp."
_SMP_ARCHS: dict[str, type[nn.Module]] = dict(smp.MODEL_ARCHITECTURES_MAPPING)


def available_nets() -> list[str]:
    """Every name :func:`build_net` accepts, in canonical spelling."""
    return ["unet"] + [SMP_PREFIX + cls.__name__ for cls in _SMP_ARCHS.values()]


def canonical_name(name: str) -> str:
    """Return the canonical spelling of ``name`` or raise a ValueError listing valid names."""
    key = name.strip().lower()
    if key == "unet":
        return "unet"
    if key.startswith(SMP_PREFIX) and key[len(SMP_PREFIX):] in _SMP_ARCHS:
        return SMP_PREFIX + _SMP_ARCHS[key[len(SMP_PREFIX):]].__name__
    raise ValueError(f"Unknown network {name!r}; valid names: {', '.join(available_nets())}.")


def build_net(
    name: str = "unet",
    in_channels: int = 3,
    num_classes: int = 2,
    features: int = 32,
    encoder_name: str = "resnet18",
    encoder_weights: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a segmentation network that maps ``[B, in_channels, H, W]`` to ``[B, num_classes, H, W]``.

    ``features`` applies to ``"unet"`` only; ``encoder_name``, ``encoder_weights`` and extra
    ``kwargs`` (passed to ``smp.create_model``) apply to ``"smp.*"`` names only.
    """
    name = canonical_name(name)
    if name == "unet":
        if kwargs:
            raise ValueError(f"Network 'unet' takes no extra arguments, got {sorted(kwargs)}.")
        return UNet(in_channels=in_channels, num_classes=num_classes, features=features)
    arch = name[len(SMP_PREFIX):]
    return smp.create_model(
        arch,
        encoder_name=encoder_name,
        encoder_weights=encoder_weights,
        in_channels=in_channels,
        classes=num_classes,
        **kwargs,
    )


def _plain(key: str, value: Any) -> SpecScalar | list[SpecScalar]:
    """Return ``value`` as a JSON-friendly spec value (tuples become lists) or raise."""
    scalar = (str, int, float, bool, type(None))
    if isinstance(value, (list, tuple)) and all(isinstance(v, scalar) for v in value):
        return list(value)
    if isinstance(value, scalar):
        return value
    raise ValueError(
        f"Net spec value {key}={value!r} is not plain; use str, int, float, bool, None "
        "or a flat list of those."
    )


def net_spec(
    name: str = "unet",
    in_channels: int = 3,
    num_classes: int = 2,
    features: int = 32,
    encoder_name: str = "resnet18",
    encoder_weights: str | None = None,
    **kwargs: Any,
) -> NetSpec:
    """Describe the network ``build_net`` would build from the same arguments.

    Defaults are filled in and only the arguments that matter for ``name`` are kept, so two
    specs of the same architecture compare equal.
    """
    name = canonical_name(name)
    spec: dict[str, Any] = {"name": name, "in_channels": in_channels, "num_classes": num_classes}
    if name == "unet":
        if kwargs:
            raise ValueError(f"Network 'unet' takes no extra arguments, got {sorted(kwargs)}.")
        spec["features"] = features
    else:
        spec.update(encoder_name=encoder_name, encoder_weights=encoder_weights, **kwargs)
    return {key: _plain(key, value) for key, value in spec.items()}


def build_from_spec(spec: NetSpec, load_pretrained: bool = False) -> nn.Module:
    """Rebuild the network described by ``spec`` (from :func:`net_spec`).

    A spec is normally used to rebuild an architecture whose trained weights are loaded right
    after, so pretrained encoder weights are not fetched (``encoder_weights`` is treated as
    ``None``) unless ``load_pretrained`` is true.
    """
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"A net spec must be a dict with a 'name' key, got {spec!r}.")
    kwargs = dict(spec)
    if not load_pretrained and "encoder_weights" in kwargs:
        kwargs["encoder_weights"] = None
    return build_net(**kwargs)
