"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture(scope='module')
def one_thread():
    """Tiny inputs: one torch thread is as fast, and immune to oversubscribed CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
