"""``python ARGS`` for the tests, without paying for the stack's imports each time.

A fresh interpreter spends about 14 s of a 2-core CPU importing torch, timm, mmdet, mmseg and
mmpretrain before a tool's first line runs. Here each run is a child forked from a
multiprocessing forkserver that imported them once: the child takes the given working
directory, environment, ``sys.argv`` and ``sys.path`` of ``python ARGS``, runs the script (or
``-c`` code) as ``__main__`` and exits with its status. What a run cannot share stays a real
interpreter in its test: import-time behaviour (test_plugin, test_requirements), the shell
launchers and torchrun, mim, and tools run without torch (test_onnx_infer).
"""
import atexit
import functools
import json
import multiprocessing
import os
import resource
import runpy
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# the stack, not the package: each run imports mmmetaformer (and registers) as a fresh one does
PRELOAD = ['torch', 'timm', 'mmengine.runner', 'mmcv.transforms', 'mmdet.apis', 'mmseg.apis',
           'mmpretrain.models']
_CONTEXT = multiprocessing.get_context('forkserver')
_CONTEXT.set_forkserver_preload(PRELOAD)


def _exit_status(code) -> int:
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)  # what the interpreter does with SystemExit('message')
    return 1


@functools.lru_cache(maxsize=None)
def _site_path() -> list:
    """``sys.path`` of a new interpreter past its first entry, without PYTHONPATH: the forkserver
    inherits pytest's, which holds the folder above a repository root that has an
    ``__init__.py``, where ``import mmmetaformer`` would find the clone, not the package."""
    code = 'import json, sys; print(json.dumps(sys.path[1:]))'
    return json.loads(subprocess.run([sys.executable, '-E', '-c', code], capture_output=True,
                                     text=True, check=True).stdout)


def _run(args, cwd, env, rlimits, site_path, stdout, stderr):
    """The child: ``python ARGS`` in this preloaded interpreter."""
    for name, limits in rlimits.items():
        resource.setrlimit(getattr(resource, name), limits)
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
    multiprocessing.set_start_method(None, force=True)  # unset, as in a fresh interpreter
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    paths = [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]
    status = 0
    try:
        if args[0] == '-c':
            sys.argv = ['-c', *args[2:]]
            sys.path[:] = ['', *paths, *site_path]
            exec(compile(args[1], '<string>', 'exec'), {'__name__': '__main__'})
        else:
            sys.argv = list(args)
            sys.path[:] = [os.path.dirname(os.path.abspath(args[0])), *paths, *site_path]
            runpy.run_path(args[0], run_name='__main__')
    except SystemExit as exit_:
        status = _exit_status(exit_.code)
    except BaseException:  # noqa: B036 (the interpreter reports any exception and exits 1)
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class Started:
    """A running ``python ARGS``: ``pid``, ``poll()``, ``kill()``, ``wait()``,
    ``communicate()`` and ``returncode`` like Popen's; ``stdout`` / ``stderr`` (text) once it
    has ended."""

    def __init__(self, args, cwd, env, rlimits):
        self._files = tempfile.TemporaryDirectory(prefix='interpreter-')
        self._out, self._err = (Path(self._files.name) / name for name in ('out', 'err'))
        self._out.touch()
        self._err.touch()
        self.args = [sys.executable, *args]
        self._process = _CONTEXT.Process(
            target=_run, args=(list(args), str(cwd), dict(env), dict(rlimits), _site_path(),
                               str(self._out), str(self._err)))
        self._process.start()
        self.pid = self._process.pid
        self.stdout = self.stderr = self.returncode = None

    def poll(self):
        return None if self._process.is_alive() else self._finish()

    def kill(self):
        self._process.kill()

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self._process.is_alive():
            self.kill()
            self._process.join()
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._finish()

    def communicate(self, timeout=None):
        self.wait(timeout)
        return self.stdout, self.stderr

    def _finish(self):
        self._process.join()
        if self.stdout is None:
            self.stdout, self.stderr = self._out.read_text(), self._err.read_text()
            self._files.cleanup()
            self.returncode = self._process.exitcode
        return self.returncode


def start(args, cwd='.', env=None, rlimits=()) -> Started:
    """Start ``python ARGS`` in ``cwd`` with ``env`` (default: this process's environment) and
    the resource limits ``{'RLIMIT_...': (soft, hard)}``."""
    return Started(args, cwd, os.environ if env is None else env, dict(rlimits))


def run(args, cwd='.', env=None, timeout=None, rlimits=()) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *args], capture_output=True, text=True, ...)``."""
    started = start(args, cwd, env, rlimits)
    returncode = started.wait(timeout)
    return subprocess.CompletedProcess(started.args, returncode, started.stdout, started.stderr)


def free_port() -> str:
    """A free local TCP port, for the rendezvous of a multi-process run."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])
