"""SegmentationModule(compile=True): same state dict keys and the same training results.

torch.compile is exercised with the ``eager`` backend here (real graph capture, no code
generation), so the test is fast on CPU and the numbers match the uncompiled run exactly.
"""

import pytest
import torch

from iopfl_lightning.federated import FederatedTrainer
from tests.helpers import eager_compiles, tiny_datamodule, tiny_module, tiny_trainer


def _fit(tmp_path, **module_kwargs):
    module = tiny_module(**module_kwargs)
    trainer = tiny_trainer(2, [FederatedTrainer()], tmp_path, limit_val_batches=0)
    trainer.fit(module, datamodule=tiny_datamodule())
    return module


def test_compile_option_trains_through_torch_compile_with_identical_results(tmp_path, monkeypatch):
    calls = eager_compiles(monkeypatch)
    compiled = _fit(tmp_path / "c", compile=True, compile_mode="reduce-overhead")
    plain = _fit(tmp_path / "p")
    # the training forward in the chosen mode, evaluation in the default one
    assert calls == [(compiled.net, {"mode": "reduce-overhead"}),
                     (compiled._weights_forward, {})]
    assert list(compiled.state_dict()) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        tiny_module(compile=True, compile_mode="fast")


def _validated_fit(tmp_path, rounds: int, **module_kwargs):
    module = tiny_module(**module_kwargs)
    trainer = tiny_trainer(rounds, [FederatedTrainer()], tmp_path)
    trainer.fit(module, datamodule=tiny_datamodule())
    return module, {k: v.item() for k, v in trainer.callback_metrics.items()}


def test_compiled_evaluation_scores_like_eager_and_compiles_once_for_every_copy(
    tmp_path, monkeypatch
):
    """Evaluation through one compiled function of (weights, image): the global model and every
    site's personalized copy are its inputs, so graphs do not grow with sites or rounds."""
    graphs: dict[str, int] = {}
    real_compile = torch.compile

    def counting_compile(fn, **kwargs):
        name = getattr(fn, "__name__", type(fn).__name__)

        def backend(gm, example_inputs):  # runs the captured graph as it is: exact numbers
            graphs[name] = graphs.get(name, 0) + 1
            return gm.forward

        return real_compile(fn, backend=backend)

    monkeypatch.setattr(torch, "compile", counting_compile)
    counts = []
    for rounds in (1, 3):
        torch._dynamo.reset()
        graphs.clear()
        module, compiled = _validated_fit(tmp_path / f"c{rounds}", rounds, compile=True)
        counts.append(graphs["_weights_forward"])
    assert len(module.personalized_states) == 3
    # the global weights and the 3 copies share one graph, and one more for the short last
    # batch (then traced with a dynamic batch size); rounds add none
    assert counts == [2, 2]
    monkeypatch.setattr(torch, "compile", real_compile)
    _, plain = _validated_fit(tmp_path / "p", 3)
    assert compiled.keys() == plain.keys() and any("personalized" in k for k in compiled)
    for key, value in plain.items():
        assert compiled[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_compile_eval_false_keeps_evaluation_eager(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(fn) or fn)
    module = tiny_module(compile=True, compile_eval=False)
    assert calls == [module.net] and module.__dict__["_compiled_eval"] is None
