import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # One intra-op thread: the tiny models gain nothing from more, and on a shared 2-core
    # machine OpenMP's busy-waiting made a 2-thread run ~8x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
