"""The extra state of a routing checkpoint: round trips and the pass-end check."""

import torch

from iopfl_lightning.modules import routing_state as rs


def test_online_predictions_round_trip_through_plain_types(tmp_path):
    one, zero = torch.ones(2, 2, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8)
    online = {"routed": {(0, 1): one, (3, 0): zero}, "tent": {}}
    path = tmp_path / "state.pt"
    torch.save(rs.online_state(online), path)
    back = rs.load_online(torch.load(path, weights_only=True), torch.device("cpu"))
    assert back.keys() == online.keys() and back["routed"].keys() == online["routed"].keys()
    assert all(torch.equal(back["routed"][k], v) for k, v in online["routed"].items())


def test_pass_end_and_fingerprint(tmp_path):
    progress = {"loops": {"fit_loop": {"epoch_loop.batch_progress": {"is_last_batch": False}}}}
    assert not rs.ends_a_pass(progress) and rs.ends_a_pass({})
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 3_000_000)
    b.write_bytes(b"x" * 2_999_999 + b"y")
    assert rs.fingerprint(a) == rs.fingerprint(a) != rs.fingerprint(b)
