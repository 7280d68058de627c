"""What the tools share: quiet imports, one error style, and the config handling of mmdet's,
mmseg's and mmpretrain's tools/train.py and tools/test.py (what a run does beyond that comes from
the components its config names: mmmetaformer.SafeRunner, mmmetaformer.SafeCheckpointHook).

Import it before torch and the OpenMMLab packages: it silences their known warnings first.
"""
import argparse
import gc
import json
import os
import os.path as osp
import re
import sys
import time
import warnings

# Known, harmless warnings of the pinned third-party stack: (start of the message, category,
# the module it is attributed to). Only these are hidden; anything else still shows.
KNOWN_WARNINGS = (
    ('`torch.jit.interface` is deprecated', FutureWarning, 'torch.jit._script'),
    # mmengine's package_utils imports pkg_resources, then reloads it (importlib)
    ('pkg_resources is deprecated as an API', UserWarning, 'mmengine.utils.package_utils'),
    ('pkg_resources is deprecated as an API', UserWarning, 'importlib'),
    # drawing predictions: mmengine clips what crosses the image border, and says so per item
    ('Warning: The bbox is out of bounds', UserWarning, 'mmengine.visualization.visualizer'),
    ('Warning: The polygon is out of bounds', UserWarning, 'mmengine.visualization.visualizer'),
)


def silence_known_warnings():
    """Hide ``KNOWN_WARNINGS`` (and only those) for the rest of the process."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings('ignore', message=re.escape(message), category=category,
                                module=re.escape(module) + '$')


silence_known_warnings()

try:
    import torch  # noqa: E402
    from mmengine.config import Config, DictAction  # noqa: E402

    import mmmetaformer  # noqa: F401,E402  (registers the backbones and run components)
except KeyboardInterrupt:  # Ctrl-C while the stack loads (seconds): no traceback
    sys.exit(130)

DEBUG_ENV = 'MMMETAFORMER_DEBUG'
#: Set by tools/launch.py for its workers: it reports their errors itself, once.
LAUNCHER_ENV = 'MMMETAFORMER_LAUNCHER'


def add_debug_arg(parser: argparse.ArgumentParser):
    parser.add_argument('--debug', action='store_true',
                        help=f'show the traceback of an error (or set {DEBUG_ENV}=1)')


def run_tool(main):
    """Run a tool's ``main()``. An exception becomes one ``error: ...`` line on stderr and exit
    status 1 (:func:`fail`); with ``--debug`` on the command line or ``MMMETAFORMER_DEBUG=1`` it
    is raised with its traceback instead. Ctrl-C ends it with status 130."""
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)  # the tool said what was interrupted, or the shell shows ^C
    except SystemExit as stop:
        if not (isinstance(stop.code, str) and stop.code.startswith('error: ')):
            raise
        fail(stop.code[len('error: '):], user_error=True)
    except Exception as err:
        if debugging():
            raise
        fail(describe_error(err), user_error=is_user_error(err))


def debugging() -> bool:
    return '--debug' in sys.argv[1:] or os.getenv(DEBUG_ENV, '0') not in ('', '0')


def process_rank():
    """``(rank, number of processes)`` of this process in its run: torchrun's, srun's, or
    ``(0, 1)``."""
    for rank, size in (('RANK', 'WORLD_SIZE'), ('SLURM_PROCID', 'SLURM_NTASKS')):
        if os.getenv(size):
            return int(os.getenv(rank, '0')), int(os.environ[size])
    return 0, 1


def speaks_for_the_run() -> bool:
    """Whether this process prints what every process of the run would print alike: the only
    process, or rank 0 of several, but not a worker of tools/launch.py (which prints that)."""
    return process_rank()[0] == 0 and not _launched()


def _launched() -> bool:
    return bool(os.getenv(LAUNCHER_ENV) and os.getenv('TORCHELASTIC_ERROR_FILE'))


#: How long another process than rank 0 waits before it prints a user error itself.
PEER_ERROR_DELAY = 10


def fail(message: str, user_error: bool):
    """Exit with status 1 after ``error: message``. Under torchrun the message goes to the
    worker's error file (``TORCHELASTIC_ERROR_FILE``), of which tools/launch.py prints the
    cause once. Of several processes (srun, torchrun without tools/launch.py), a user error
    (the same on every process) is printed by rank 0; the others wait
    :data:`PEER_ERROR_DELAY` seconds first, in which srun (``--kill-on-bad-exit``) or torchrun
    ends them once rank 0 has failed: their line shows only when rank 0 did not fail, or was
    ended before it could say why. An unexpected error is printed by its process."""
    error_file, now = os.getenv('TORCHELASTIC_ERROR_FILE'), time.time()
    if error_file:
        with open(error_file, 'w') as f:  # torchelastic's layout, its timestamp in seconds
            json.dump({'message': {'message': message, 'extraInfo': {
                'timestamp': str(int(now)), 'time': now, 'user_error': user_error}}}, f)
    if _launched():
        sys.exit(1)
    rank, processes = process_rank()
    if user_error and rank != 0:
        time.sleep(PEER_ERROR_DELAY)
    sys.exit(f'error: [rank {rank}] {message}' if processes > 1 and (rank or not user_error)
             else f'error: {message}')


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is about the user's files or arguments, the same on every process: one
    of mmmetaformer's error classes (in its chain), a missing file or a denied permission."""
    return _package_error(err) is not None or isinstance(err, (FileNotFoundError,
                                                               PermissionError))


def _package_error(err: BaseException):
    while err is not None and not type(err).__module__.startswith('mmmetaformer.'):
        err = err.__cause__ or err.__context__
    return err


def describe_error(err: BaseException) -> str:
    """The message of ``err``, or of the error it was raised from that mmmetaformer raised
    about a file or an argument (its own error classes: CheckpointError, DatasetError,
    ExportError), which says what to do; other errors are named with their type and a pointer
    to ``--debug``."""
    cause = _package_error(err)
    if cause is not None:
        return str(cause)
    if isinstance(err, (FileNotFoundError, PermissionError)):
        return str(err)
    return f'{type(err).__name__}: {err} (rerun with --debug for the traceback)'


def check_file(path: str, what: str):
    """Exit with one line if ``path`` (not a URL) is not a file."""
    if '://' not in path and not osp.isfile(path):
        raise SystemExit(f'error: {what} file not found: {path}' + (
            '; pass the .pth a training run wrote, e.g. work_dirs/<config name>/epoch_12.pth'
            if what == 'checkpoint' else ''))


def add_common_args(parser: argparse.ArgumentParser):
    """The flags train.py and test.py share with mmdet's and mmseg's tools."""
    parser.add_argument('--work-dir', help='directory for logs and checkpoints '
                        '(default: work_dirs/<config name>)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value pairs, e.g. '
        'train_dataloader.batch_size=4 "model.backbone.arch=s36"')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    add_debug_arg(parser)


def load_config(args):
    """Read ``args.config`` and apply ``--cfg-options``, ``--work-dir`` and ``--launcher``, as
    mmdet's, mmseg's and mmpretrain's tools do."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    check_file(args.config, 'config')
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    # work_dir priority: --work-dir > the config's work_dir > work_dirs/<config name>
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def build_runner(cfg: Config):
    """``Runner.from_cfg``, or the registered runner the config names in ``runner_type``."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    return RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)


def finish():
    """Call after dropping the Runner: frees it, then tears down the process group (gloo worker
    threads still alive at interpreter exit can abort the process, seen with torch 2.14)."""
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
