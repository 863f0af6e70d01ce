import pytest

pytest.importorskip("hypothesis")  # a test dependency (scripts/setup.sh installs it)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny inputs: threads only add start-up cost, and the machine is shared.
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
