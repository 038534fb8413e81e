"""Per-round evaluation of the personalized copies: checked once per published set, then
evaluated without functional_call's per-call key check."""

import pytest
import torch

from tests.helpers import TINY_SITES, tiny_datamodule, tiny_module, tiny_trainer


def _validate(module, tmp_path):
    dm = tiny_datamodule()
    return tiny_trainer(1, [], tmp_path).validate(module, datamodule=dm, verbose=False)[0]


def test_personalized_state_is_evaluated_beside_the_global_model(tmp_path):
    module = tiny_module()
    module.setup("fit")
    same = _validate(module, tmp_path / "none")
    state = {k: v.clone() for k, v in module.net.state_dict().items()}
    module.personalized_states = {TINY_SITES[0]: state}
    with_copy = _validate(module, tmp_path / "copy")
    assert module._states_checked
    site = TINY_SITES[0]
    personal = [k for k in with_copy if "personalized" in k and site in k]
    assert personal, with_copy
    for key in personal:  # the same weights evaluate to the global model's scores
        assert with_copy[key] == pytest.approx(with_copy[key.replace("personalized", "global")])
    assert not any("personalized" in k for k in same)
    with torch.no_grad():  # other weights give other scores: the copy is really used
        for v in state.values():
            if v.is_floating_point():
                v.mul_(-1.0)
    module.personalized_states = {site: state}
    flipped = _validate(module, tmp_path / "flipped")
    assert any(flipped[k] != pytest.approx(with_copy[k]) for k in personal)


def test_personalized_state_with_wrong_keys_names_the_site(tmp_path):
    module = tiny_module()
    module.setup("fit")
    state = dict(list(module.net.state_dict().items())[1:])
    module.personalized_states = {TINY_SITES[1]: state}
    with pytest.raises(ValueError, match=f"personalized state of '{TINY_SITES[1]}'.*missing keys"):
        _validate(module, tmp_path)
