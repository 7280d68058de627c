"""Start a script of tools/ on several processes: torchrun in this process (dist_launch.sh), or
only the check before the start (slurm_launch.sh runs it before srun).

    python tools/launch.py [torchrun options] SCRIPT [SCRIPT arguments]
    python tools/launch.py --check-only SCRIPT [SCRIPT arguments]

First, in this one process, it refuses what every process of the run would refuse at once,
with the script's own functions: its arguments and config (``parse_args``, ``configure``), and
the datasets it reads (``DATALOADERS``) when its runner is mmmetaformer.SafeRunner, which
checks them at the start. Then a failure of the workers is one ``error:`` line: a user error
(the same on every process) once, an unexpected one with the rank of the first process it
ended; Ctrl-C stops the workers and, for a training run, names the checkpoint to resume from.
``--debug`` (or MMMETAFORMER_DEBUG=1) shows torchrun's own report instead.
"""
import importlib.util
import logging
import os
import os.path as osp
import signal
import sys

from common import LAUNCHER_ENV, debugging, run_tool

from mmengine.registry import RUNNERS
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from mmmetaformer.dataset_checks import check_dataset
from mmmetaformer.engine import SafeRunner


def check_before_start(script: str, argv):
    """Refuse what every process of ``script argv`` would refuse at once (one exception, as
    the script raises it); return the script's module and its config (None for a script
    without ``configure``)."""
    spec = importlib.util.spec_from_file_location(
        '_launched_' + osp.splitext(osp.basename(script))[0], script)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    if not hasattr(tool, 'configure'):
        return tool, None
    sys.argv = [script, *argv]  # as the workers see it (argparse's usage names the script)
    cfg = tool.configure(tool.parse_args(argv))
    runner = cfg.get('runner_type', 'Runner')
    runner = RUNNERS.get(runner) if isinstance(runner, str) else runner
    if isinstance(runner, type) and issubclass(runner, SafeRunner):
        check_dataset({name: cfg[name] for name in tool.DATALOADERS  # as SafeRunner reads them
                       if isinstance(cfg.get(name), dict)
                       and isinstance(cfg[name].get('dataset'), dict)})
    return tool, cfg


def quiet_torchrun():
    """torchrun's log records below ERROR (its OMP_NUM_THREADS notice, each worker it stops)
    are left out; its errors show, but for the first failed worker's, which
    :func:`first_failure` says."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith('torch.distributed') and isinstance(logger, logging.Logger):
            logger.setLevel(logging.ERROR)
    logging.getLogger('torch.distributed').setLevel(logging.ERROR)
    logging.getLogger('torch.distributed.elastic.multiprocessing.api').addFilter(
        lambda record: not str(record.msg).startswith('failed (exitcode'))


def first_failure(err: ChildFailedError) -> str:
    """The cause of the workers' failure in one line, from the error files
    :func:`common.fail` writes: the first user error, without a rank (it is the same on every
    process), else the first error, with its rank, else the first worker that ended without
    one (by a signal, e.g. SIGKILL when out of memory, before those the agent then stopped with
    SIGTERM)."""
    reports = []
    for rank, failure in err.failures.items():
        message = failure.error_file_data.get('message')
        if isinstance(message, dict):
            info = message.get('extraInfo', {})
            reports.append((not info.get('user_error'), float(info.get(
                'time', info.get('timestamp', 0))), rank, message.get('message', '')))
    if reports:
        unexpected, _, rank, message = min(reports)
        return f'[rank {rank}] {message}' if unexpected else message
    rank, failure = min(err.failures.items(), key=lambda item: (
        item[1].exitcode == -signal.SIGTERM, item[1].timestamp, item[0]))
    return f'[rank {rank}] ' + (f'ended by {failure.signal_name()}' if failure.exitcode < 0
                                else f'exited with status {failure.exitcode}')


def main():
    if sys.argv[1:2] == ['--check-only']:
        check_before_start(sys.argv[2], sys.argv[3:])
        return
    args = torchrun.parse_args(sys.argv[1:])
    tool, cfg = check_before_start(args.training_script, args.training_script_args)
    # what mmengine sets for every distributed run, without its warning in each process
    for threads in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
        os.environ.setdefault(threads, '1')
    os.environ[LAUNCHER_ENV] = '1'  # the workers leave their errors to this process
    if not debugging():
        quiet_torchrun()
    try:
        torchrun.run(args)
    except ChildFailedError as err:
        if debugging():
            raise
        raise SystemExit(f'error: {first_failure(err)}') from None
    except SignalException as stop:  # torchrun stopped the workers with the same signal
        if cfg is not None and hasattr(tool, 'interrupted') and args.node_rank == 0:
            print(tool.interrupted(cfg.work_dir), file=sys.stderr, flush=True)
        sys.exit(128 + stop.sigval)


if __name__ == '__main__':
    run_tool(main)
