"""The multi-process launchers (tools/dist_*.sh through tools/launch.py, tools/slurm_*.sh) and
the tools' error reporting under them: what every process would refuse is refused once, before
any worker starts; a failure of the workers is one `error:` line; Ctrl-C names the checkpoint
to resume from. The worker-side rules and the launcher's summary are also checked in-process,
on failures read back by torch's own ProcessFailure."""
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

import common
import interpreter
import launch
from interpreter import free_port
from common import run_tool
from demo_data import write_coco_demo
from mmmetaformer.dataset_checks import DatasetError
from test_tools_e2e import DET, ENV, ROOT, _RunsCode, det_options

pytestmark = pytest.mark.slow  # not in `make test-quick`

ENV = dict(ENV, PYTHON=sys.executable, OMP_NUM_THREADS='1')
ERRORS = ('TORCHELASTIC_ERROR_FILE', 'RANK', 'WORLD_SIZE', 'SLURM_PROCID', 'SLURM_NTASKS',
          launch.LAUNCHER_ENV)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo_data')
    write_coco_demo(str(root / 'coco'), num_train=4, num_val=2)
    return root


def launcher(*args, env=None):
    """``bash <args>`` from the repository root: the CompletedProcess."""
    return subprocess.run(['bash', *args], cwd=ROOT, env=dict(ENV, PORT=free_port(), **env or {}),
                          capture_output=True, text=True, timeout=300)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith('error:')]


# --- end to end --------------------------------------------------------------------------------

@pytest.mark.e2e
def test_dist_train_refuses_a_missing_dataset_before_starting_workers(tmp_path):
    missing = tmp_path / 'no_coco'
    proc = launcher(
        'tools/dist_train.sh', DET, '2', '--work-dir', str(tmp_path / 'work'), '--cfg-options',
        *[f'{s}_dataloader.dataset.data_root={missing}/' for s in ('train', 'val')])
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and f'COCO not found at {missing}/' in lines[0], proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr
    # no worker started: no runner log, no per-process lines, no work directory
    assert proc.stderr.splitlines() == lines and 'mmengine' not in proc.stdout
    assert not (tmp_path / 'work').exists()


@pytest.mark.e2e
def test_slurm_train_checks_before_srun(data, tmp_path):
    """slurm_train.sh runs the check before srun (an `srun` on PATH that records its command
    line stands for slurm): a missing dataset never reaches srun; a good run reaches it with the
    documented task layout."""
    bin_dir, calls = tmp_path / 'bin', tmp_path / 'srun_calls'
    bin_dir.mkdir()
    (bin_dir / 'srun').write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {calls}\n')
    (bin_dir / 'srun').chmod(0o755)
    env = dict(PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', GPUS='4', GPUS_PER_NODE='2')
    missing = tmp_path / 'no_coco'
    proc = launcher('tools/slurm_train.sh', 'part', 'job', DET, str(tmp_path / 'work'),
                    '--cfg-options', f'train_dataloader.dataset.data_root={missing}/', env=env)
    assert proc.returncode == 1 and not calls.exists()
    assert error_lines(proc.stderr) == proc.stderr.splitlines()[:1], proc.stderr[-3000:]
    assert f'COCO not found at {missing}/' in proc.stderr and 'Traceback' not in proc.stderr

    proc = launcher('tools/slurm_train.sh', 'part', 'job', DET, str(tmp_path / 'work'),
                    '--cfg-options', *det_options(data), env=env)
    assert proc.returncode == 0 and proc.stderr == '', proc.stderr[-3000:]
    srun = calls.read_text().splitlines()
    assert srun[:10] == ['-p', 'part', '--job-name=job', '--gres=gpu:2', '--ntasks=4',
                         '--ntasks-per-node=2', '--cpus-per-task=5', '--kill-on-bad-exit=1',
                         sys.executable, '-u']
    assert srun[10] == str(ROOT / 'tools' / 'train.py') and srun[11:] == [
        DET, f'--work-dir={tmp_path / "work"}', '--launcher=slurm', '--cfg-options',
        *det_options(data)]


@pytest.mark.e2e
def test_dist_test_worker_failure_is_one_line(data, tmp_path):
    """A checkpoint that exists (the check before the start passes it) and that the workers
    refuse to unpickle: one line, no traceback."""
    marker, evil = tmp_path / 'pwned', tmp_path / 'evil.pth'
    torch.save(dict(state_dict={}, extra=_RunsCode(marker)), evil)
    proc = launcher('tools/dist_test.sh', DET, str(evil), '2', '--work-dir',
                    str(tmp_path / 'work'), '--cfg-options', *det_options(data))
    assert proc.returncode == 1 and not marker.exists()
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f'error: refused to load {evil}'), \
        proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr and 'ChildFailedError' not in proc.stderr


def _interrupt_after_checkpoint(command, work, saved):
    """Start ``command`` (``bash ARGS`` in its own process group, else ``python ARGS`` in a
    child interpreter) and send it SIGINT, as Ctrl-C in a terminal does to the process group,
    once ``work/saved`` is written; (returncode, stdout, stderr)."""
    env = dict(ENV, PORT=free_port())
    if command[0] == 'bash':
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        interrupt = partial(os.killpg, proc.pid, signal.SIGINT)
    else:
        proc = interpreter.start(command, cwd=ROOT, env=env)
        interrupt = partial(os.kill, proc.pid, signal.SIGINT)
    try:
        deadline = time.monotonic() + 300
        while not (work / saved).exists() and proc.poll() is None:
            assert time.monotonic() < deadline, f'no {saved} after 5 minutes'
            time.sleep(0.1)
        interrupt()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


@pytest.mark.e2e
def test_ctrl_c_names_the_checkpoint_to_resume_from(data, tmp_path):
    """Ctrl-C after a checkpoint of a training run, run directly, then resumed under
    dist_train.sh (SIGINT to the launcher, which forwards it to its worker): each time one line
    naming the newest complete checkpoint, no traceback, status 130; --resume continues from
    it."""
    work = tmp_path / 'work'
    options = ['--work-dir', str(work), '--cfg-options', *det_options(data, epochs=3)]
    runs = [(['tools/train.py', DET, *options], 'epoch_1.pth'),
            (['bash', 'tools/dist_train.sh', DET, '1', '--resume', *options], 'epoch_2.pth')]
    for command, saved in runs:
        code, out, err = _interrupt_after_checkpoint(command, work, saved)
        assert code == 130 and 'Traceback' not in err, err[-3000:]
        assert [line for line in err.splitlines() if line.startswith('interrupted:')] == [
            f'interrupted: the last complete checkpoint is {work / saved}; continue with '
            '--resume'], err[-3000:]
    assert 'Epoch(train) [2][1/2]' in out and 'Epoch(train) [1]' not in out  # resumed


# --- in-process: the worker's report and the launcher's summary --------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    for name in ERRORS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _exit_of(main):
    with pytest.raises(SystemExit) as stop:
        run_tool(main)
    return stop.value.code


def _fail(error):
    def main():
        raise error
    return main


def test_srun_ranks_report_user_errors_once(clean_env, capsys):
    """Under srun: rank 0 says a user error at once; another rank says it only after
    PEER_ERROR_DELAY (srun ends it in the meantime when rank 0 failed too), with its rank; an
    unexpected error is said at once, with the rank."""
    clean_env.setattr(common, 'PEER_ERROR_DELAY', 0.5)
    clean_env.setenv('SLURM_NTASKS', '4')
    clean_env.setenv('SLURM_PROCID', '0')
    assert _exit_of(_fail(DatasetError('data/x.json is empty'))) == 'error: data/x.json is empty'
    clean_env.setenv('SLURM_PROCID', '2')
    start = time.monotonic()
    assert _exit_of(lambda: sys.exit('error: config file not found: a.py')) == \
        'error: [rank 2] config file not found: a.py'
    assert time.monotonic() - start >= 0.5
    start = time.monotonic()
    assert _exit_of(_fail(MemoryError('out of memory'))).startswith(
        'error: [rank 2] MemoryError: out of memory')
    assert time.monotonic() - start < 0.5
    assert capsys.readouterr().err == ''


def _worker_failure(tmp_path, clean_env, rank, error):
    """The ProcessFailure torchrun's agent reads of a worker that ``run_tool`` ended."""
    error_file = tmp_path / f'error_{rank}.json'
    for name, value in (('TORCHELASTIC_ERROR_FILE', error_file), ('RANK', rank),
                        ('WORLD_SIZE', 4), (launch.LAUNCHER_ENV, 1)):
        clean_env.setenv(name, str(value))
    assert _exit_of(_fail(error)) == 1
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=1,
                          error_file=str(error_file))


def _stopped(rank, sig):
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=-sig, error_file='')


def test_launcher_summary_of_worker_failures(tmp_path, clean_env, capsys):
    user = _worker_failure(tmp_path, clean_env, 1, DatasetError('data/x.json is empty'))
    oom = _worker_failure(tmp_path, clean_env, 3, RuntimeError('out of memory'))
    closed = _worker_failure(tmp_path, clean_env, 0, RuntimeError('Connection closed by peer'))
    assert capsys.readouterr().err == ''  # the workers print nothing: the launcher says it
    assert json.loads(Path(oom.error_file).read_text())['message']['message'].startswith(
        'RuntimeError: out of memory')

    def summary(failures):
        return launch.first_failure(ChildFailedError('train.py', failures))

    # a user error once, without a rank; the ranks the agent stopped are not the cause
    assert summary({0: _stopped(0, signal.SIGTERM), 1: user, 3: oom}) == 'data/x.json is empty'
    assert summary({0: closed, 3: oom}).startswith('[rank 3] RuntimeError: out of memory')
    assert summary({0: _stopped(0, signal.SIGTERM), 2: _stopped(2, signal.SIGKILL)}) == \
        '[rank 2] ended by SIGKILL'
    # plain torchrun (not tools/launch.py): rank 0 prints the line itself
    clean_env.delenv(launch.LAUNCHER_ENV)
    clean_env.setenv('RANK', '0')
    assert _exit_of(_fail(DatasetError('data/x.json is empty'))) == 'error: data/x.json is empty'
