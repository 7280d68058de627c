"""tests/interpreter.py runs ``python ARGS`` as a new interpreter would, with the same
``sys.path``: not the test process's, to which pytest adds the folder above the repository
root (it has an ``__init__.py``), where ``import mmmetaformer`` finds a clone named
mmmetaformer instead of the package."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import interpreter

ROOT = Path(__file__).resolve().parents[1]
PATH = 'import json, sys; print(json.dumps(sys.path))'


@pytest.mark.slow  # a child interpreter
@pytest.mark.parametrize('script', [False, True], ids=['-c', 'script'])
def test_child_has_the_path_of_a_new_interpreter(script, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(tmp_path / 'extra'))
    args = ['-c', PATH]
    if script:
        (tmp_path / 'path.py').write_text(PATH)
        args = [str(tmp_path / 'path.py')]
    child = interpreter.run(args, cwd=ROOT, env=env, timeout=300)
    new = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert child.returncode == new.returncode == 0, child.stderr + new.stderr
    assert json.loads(child.stdout) == json.loads(new.stdout)
