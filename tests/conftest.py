"""Fixtures shared by the test modules."""
import pytest
import torch

# The package under test, imported before pytest imports the repository root's __init__.py (the
# root is a test package to pytest): in a clone named mmmetaformer pytest imports that file as
# `mmmetaformer`, and finds this package already imported instead.
import mmmetaformer  # noqa: F401


@pytest.fixture(scope='module')
def one_thread():
    """Tiny inputs: one torch thread is as fast, and immune to oversubscribed CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
