import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # CI machines are small and shared: two OpenMP threads fighting other processes ran many
    # times slower than one here (measured by the train and export tests' authors)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
