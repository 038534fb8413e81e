"""Tests for the network factory and the plain net spec."""

import json

import pytest
import segmentation_models_pytorch as smp
import torch

from iopfl_lightning.nets import UNet, available_nets, build_from_spec, build_net, net_spec


def _shapes(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_unet_by_name():
    net = build_net("unet", in_channels=1, num_classes=3, features=8)
    assert isinstance(net, UNet) and net.num_classes == 3 and net.features == 8


@pytest.mark.parametrize("name", ["smp.Unet", "smp.FPN", "smp.DeepLabV3Plus", "SMP.fpn"])
def test_smp_models_build_without_download(name, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(smp.encoders, "hf_hub_download", no_download)
    net = build_net(name, in_channels=3, num_classes=4).eval()
    assert isinstance(net, smp.base.SegmentationModel)
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64, 64)


def test_smp_extra_kwargs_are_forwarded():
    net = build_net("smp.Unet", num_classes=2, encoder_depth=3, decoder_channels=[32, 16, 8])
    assert net.segmentation_head[0].in_channels == 8


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="Unknown network 'vnet'.*unet.*smp.FPN"):
        build_net("vnet")
    with pytest.raises(ValueError, match="Unknown network"):
        net_spec("smp.NotAnArch")


def test_unet_rejects_extra_kwargs():
    with pytest.raises(ValueError, match="no extra arguments.*dropout"):
        build_net("unet", dropout=0.1)


def test_available_nets_canonical():
    names = available_nets()
    assert names[0] == "unet" and "smp.DeepLabV3Plus" in names and "smp.Segformer" in names


def test_unet_spec_round_trip():
    spec = net_spec("UNet", in_channels=1, num_classes=3, features=8)
    assert spec == {"name": "unet", "in_channels": 1, "num_classes": 3, "features": 8}
    original = build_net(**spec)
    assert _shapes(build_from_spec(json.loads(json.dumps(spec)))) == _shapes(original)


def test_smp_spec_round_trip_and_json_plain():
    spec = net_spec("smp.unet", num_classes=3, encoder_depth=3, decoder_channels=(32, 16, 8))
    assert spec["name"] == "smp.Unet" and spec["decoder_channels"] == [32, 16, 8]
    assert json.loads(json.dumps(spec)) == spec
    assert _shapes(build_from_spec(spec)) == _shapes(build_net(**spec))


def test_spec_survives_weights_only_torch_load(tmp_path):
    spec = net_spec("smp.FPN", num_classes=2, encoder_weights="imagenet")
    torch.save({"spec": spec}, tmp_path / "space.pt")
    loaded = torch.load(tmp_path / "space.pt", weights_only=True)["spec"]
    assert loaded == spec
    # Rebuilding for a later load_state_dict does not fetch pretrained weights.
    assert _shapes(build_from_spec(loaded)) == _shapes(build_net("smp.FPN", num_classes=2))


def test_spec_rejects_non_plain_values():
    with pytest.raises(ValueError, match="not plain"):
        net_spec("smp.Unet", aux_params={"classes": 2})


def test_build_from_spec_needs_name():
    with pytest.raises(ValueError, match="'name'"):
        build_from_spec({"in_channels": 3})
