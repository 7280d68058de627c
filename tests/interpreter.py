"""``python ARGS`` for the tests, without paying for the stack's imports each time.

A fresh interpreter spends about 16 s of a 2-core CPU importing torch, timm, mmdet, mmseg and
mmpretrain before a tool's first line runs. Here each run is a child forked from one server per
test run that imported them once (started by the first process that needs it and shared by
pytest-xdist's workers; it ends with pytest's main process): the child takes the given working
directory, environment, ``sys.argv`` and ``sys.path`` of ``python ARGS``, runs the script (or
``-c`` code) as ``__main__`` and exits with its status. What a run cannot share stays a real
interpreter in its test: import-time behaviour (test_plugin, test_requirements), the shell
launchers and torchrun, mim, and tools run without torch (test_onnx_infer).

    python tests/interpreter.py FOLDER    the server of FOLDER (see :func:`server_folder`)
"""
import atexit
import fcntl
import functools
import importlib
import json
import os
import resource
import runpy
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# the stack, not the package: each run imports mmmetaformer (and registers) as a fresh one does
PRELOAD = ['torch', 'timm', 'mmengine.runner', 'mmcv.transforms', 'mmdet.apis', 'mmseg.apis',
           'mmpretrain.models']
#: The folder of the test run's server (its socket, pid, log), inherited by pytest's workers.
FOLDER_ENV = 'MMMETAFORMER_TEST_INTERPRETERS'


def server_folder() -> Path:
    """The folder of this test run's server. The first process that asks makes it (pytest's
    main process asks before it starts its workers, which inherit it) and, when it exits, stops
    the server and removes the folder."""
    if FOLDER_ENV not in os.environ:
        folder = tempfile.mkdtemp(prefix='interpreters-')
        Path(folder, 'owner').write_text(str(os.getpid()))
        os.environ[FOLDER_ENV] = folder
        atexit.register(_stop_server, Path(folder))
    return Path(os.environ[FOLDER_ENV])


def _stop_server(folder: Path):
    try:
        os.kill(int((folder / 'pid').read_text()), signal.SIGTERM)
    except (FileNotFoundError, ProcessLookupError):
        pass
    shutil.rmtree(folder, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _server_address() -> str:
    """The server's socket, starting the server if no process has."""
    folder = server_folder()
    with open(folder / 'lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / 'pid').exists():
            with open(folder / 'server.log', 'w') as log:
                server = subprocess.Popen([sys.executable, __file__, str(folder)],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            (folder / 'pid').write_text(str(server.pid))
    return str(folder / 'socket')


def _connect() -> socket.socket:
    """A connection to the server, once it has imported the stack and listens."""
    folder, deadline = server_folder(), time.monotonic() + 600
    while True:
        conn = socket.socket(socket.AF_UNIX)
        try:
            conn.connect(_server_address())
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            pid = int((folder / 'pid').read_text())
            if not _alive(pid) or time.monotonic() > deadline:
                raise RuntimeError('the interpreter server did not start: '
                                   + (folder / 'server.log').read_text()[-3000:]) from None
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _exit_status(code) -> int:
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)  # what the interpreter does with SystemExit('message')
    return 1


@functools.lru_cache(maxsize=None)
def _site_path() -> list:
    """``sys.path`` of a new interpreter past its first entry, without PYTHONPATH: the server
    is started from pytest's, which holds the folder above a repository root that has an
    ``__init__.py``, where ``import mmmetaformer`` would find the clone, not the package."""
    code = 'import json, sys; print(json.dumps(sys.path[1:]))'
    return json.loads(subprocess.run([sys.executable, '-E', '-c', code], capture_output=True,
                                     text=True, check=True).stdout)


def _run(args, cwd, env, rlimits, site_path, stdout, stderr):
    """The child: ``python ARGS`` in this preloaded interpreter. It never returns to the
    server's loop: an error in setting it up (a missing working directory) ends it alone."""
    status = 0
    try:
        for name, limits in rlimits.items():
            resource.setrlimit(getattr(resource, name), limits)
        for fd, path in ((1, stdout), (2, stderr)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        paths = [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]
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


def serve(folder: Path):
    """Import the stack, then for each connection: read a request (:func:`_run`'s arguments
    as JSON, up to the end the client writes), fork a child that runs it, send its pid, and
    its exit status (as Popen's ``returncode``) when it ends. Ends with the process that made
    ``folder``, or on SIGTERM, killing its children."""
    # Ctrl-C raises KeyboardInterrupt in the children, as in an interpreter started from a
    # terminal, also where the test run was started in the background (SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name in PRELOAD:
        importlib.import_module(name)
    owner = int((folder / 'owner').read_text())
    children = {}  # pid: the connection that asked for it
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(folder / 'socket'))
    listener.listen(64)
    events = selectors.DefaultSelector()
    events.register(listener, selectors.EVENT_READ)
    events.register(wake_r, selectors.EVENT_READ)
    try:
        while _alive(owner):
            for key, _ in events.select(timeout=1):
                if key.fileobj is wake_r:
                    os.read(wake_r, 4096)
                    continue
                conn = listener.accept()[0]
                request = json.loads(b''.join(iter(functools.partial(conn.recv, 1 << 16), b'')))
                pid = os.fork()
                if pid == 0:
                    events.close()
                    for open_socket in (listener, conn, *children.values()):
                        open_socket.close()
                    signal.set_wakeup_fd(-1)
                    for signum in (signal.SIGCHLD, signal.SIGTERM):
                        signal.signal(signum, signal.SIG_DFL)
                    os.close(wake_r)
                    os.close(wake_w)
                    _run(**request)
                children[pid] = conn
                _send(conn, pid)
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if not pid:  # the others still run
                    break
                conn = children.pop(pid)
                _send(conn, os.waitstatus_to_exitcode(status))
                conn.close()
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)


def _send(conn, number: int):
    try:
        conn.sendall(f'{number}\n'.encode())
    except OSError:  # the test process that asked has ended
        pass


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
        self.stdout = self.stderr = self.returncode = None
        self._conn = _connect()
        request = dict(args=list(args), cwd=str(cwd), env=dict(env), rlimits=dict(rlimits),
                       site_path=_site_path(), stdout=str(self._out), stderr=str(self._err))
        self._conn.sendall(json.dumps(request).encode())
        self._conn.shutdown(socket.SHUT_WR)  # the request's end
        self.pid = self._read_line(None)

    def _read_line(self, timeout):
        """The server's next line as an int, or None if none came within ``timeout`` s."""
        if not select.select([self._conn], [], [], timeout)[0]:
            return None
        line = b''
        while not line.endswith(b'\n'):
            byte = self._conn.recv(1)
            if not byte:
                raise RuntimeError('the interpreter server ended')
            line += byte
        return int(line)

    def poll(self):
        if self.returncode is None:
            self._finish(self._read_line(0))
        return self.returncode

    def kill(self):
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:  # ended, its status not read yet
                pass

    def wait(self, timeout=None):
        if self.returncode is not None:
            return self.returncode
        status = self._read_line(timeout)
        if status is None:
            self.kill()
            self._finish(self._read_line(None))
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._finish(status)

    def communicate(self, timeout=None):
        self.wait(timeout)
        return self.stdout, self.stderr

    def _finish(self, status):
        if status is not None and self.returncode is None:
            self.returncode = status
            self.stdout, self.stderr = self._out.read_text(), self._err.read_text()
            self._files.cleanup()
            self._conn.close()
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


if __name__ == '__main__':
    serve(Path(sys.argv[1]))
