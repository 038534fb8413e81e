"""SegmentationModule(compile=True): same state dict keys and the same training results.

torch.compile is exercised with the ``eager`` backend here (real graph capture, no code
generation), so the test is fast on CPU and the numbers match the uncompiled run exactly.
"""

import functools

import pytest
import torch

from iopfl_lightning.federated import FederatedTrainer
from tests.helpers import tiny_datamodule, tiny_module, tiny_trainer


def _fit(tmp_path, **module_kwargs):
    module = tiny_module(**module_kwargs)
    trainer = tiny_trainer(2, [FederatedTrainer()], tmp_path, limit_val_batches=0)
    trainer.fit(module, datamodule=tiny_datamodule())
    return module


def test_compile_option_trains_through_torch_compile_with_identical_results(tmp_path, monkeypatch):
    calls = []
    real_compile = torch.compile

    def eager_compile(model, **kwargs):
        calls.append((model, kwargs))
        return real_compile(model, backend="eager")  # modes are for the inductor backend

    monkeypatch.setattr(torch, "compile", functools.partial(eager_compile))
    compiled = _fit(tmp_path / "c", compile=True, compile_mode="reduce-overhead")
    plain = _fit(tmp_path / "p")
    assert calls == [(compiled.net, {"mode": "reduce-overhead"})]
    assert list(compiled.state_dict()) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        tiny_module(compile=True, compile_mode="fast")
