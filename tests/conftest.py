"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the test nets are tiny, and on a busy 2-core machine OpenMP
    spin-waiting made training steps ~20x slower with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
