"""Fixtures shared by the test modules."""
import pytest

import interpreter


def pytest_configure(config):
    """Import the package under test before pytest imports the repository root's __init__.py
    (the root is a test package to pytest): in a clone named mmmetaformer pytest imports that
    file as `mmmetaformer`, and finds this package already imported instead. pytest-xdist's
    controller collects and runs nothing: it skips the import (seconds before workers start).
    The main process makes the folder of the run's interpreter server, which its workers
    inherit (tests/interpreter.py)."""
    if not hasattr(config, 'workerinput'):
        interpreter.server_folder()
    if not (config.getoption('numprocesses', None) and not hasattr(config, 'workerinput')):
        import mmmetaformer  # noqa: F401

# The files that take longest, first (by their CPU time in a profile of the suite): `make test`
# hands whole files to its processes in collection order (pytest-xdist --dist loadfile
# --no-loadscope-reorder), so a long file collected last would run alone at the end.
LONGEST_FIRST = ['test_deploy_detector.py', 'test_mim.py', 'test_tools_e2e.py',
                 'test_launchers.py', 'test_fidelity.py', 'test_configs.py', 'test_benchmark.py',
                 'test_tools_cli.py', 'test_compile.py', 'test_readme_snippets.py',
                 'test_export_onnx.py', 'test_classification.py', 'test_checkpoints.py',
                 'test_dense_checkpoints.py', 'test_amp.py']


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope='module')
def one_thread():
    """Tiny inputs: one torch thread is as fast, and immune to oversubscribed CPUs."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
