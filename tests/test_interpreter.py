"""tests/interpreter.py runs ``python ARGS`` as a new interpreter would: with the same
``sys.path`` (not the test process's, to which pytest adds the folder above the repository
root: it has an ``__init__.py``, and ``import mmmetaformer`` would find a clone named
mmmetaformer instead of the package), output and exit status; a timeout kills it."""
import json
import os
import signal
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


@pytest.mark.slow  # a child interpreter
@pytest.mark.parametrize('code', [
    'print("out"); import sys; print("err", file=sys.stderr)',
    'import sys; sys.exit("error: bye")',
    'import sys; sys.exit(3)',
    'raise ValueError("bad")',
    'import os, signal; os.kill(os.getpid(), signal.SIGKILL)'],
    ids=['output', 'exit-message', 'exit-status', 'exception', 'killed'])
def test_child_ends_as_a_new_interpreter(code):
    child = interpreter.run(['-c', code], timeout=300)
    new = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=300)
    assert (child.returncode, child.stdout) == (new.returncode, new.stdout)
    assert child.stderr.splitlines()[-1:] == new.stderr.splitlines()[-1:]


@pytest.mark.slow  # a child interpreter
def test_timeout_kills_the_child():
    child = interpreter.start(['-c', 'import time; time.sleep(600)'])
    assert child.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=1)
    assert child.returncode == -signal.SIGKILL and child.poll() == -signal.SIGKILL


@pytest.mark.slow  # child interpreters
def test_a_child_that_cannot_start_fails_alone(tmp_path):
    """A working directory that does not exist: that child exits 1 and names the error; the
    server and the children it runs go on."""
    running = interpreter.start(['-c', 'import time; time.sleep(3); print("done")'])
    failed = interpreter.run(['-c', 'pass'], cwd=tmp_path / 'missing', timeout=300)
    assert failed.returncode == 1 and 'FileNotFoundError' in failed.stderr, failed.stderr
    assert running.wait(timeout=300) == 0 and running.stdout == 'done\n'
    assert interpreter.run(['-c', 'print(1)'], timeout=300).stdout == '1\n'
