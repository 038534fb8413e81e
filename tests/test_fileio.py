"""Atomic writes: results and checkpoints get an ordinary file's mode, not mkstemp's 0600."""

import os
import stat

from iopfl_lightning.fileio import atomic_torch_save, atomic_write_text


def test_atomic_files_get_the_mode_open_gives(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    expected = stat.S_IMODE(plain.stat().st_mode)  # 0o666 minus the umask
    written = [atomic_write_text(tmp_path / "results.csv", "a,b\n"),
               atomic_torch_save({"w": 1}, tmp_path / "routing_space.pt")]
    assert [stat.S_IMODE(os.stat(p).st_mode) for p in written] == [expected, expected]
