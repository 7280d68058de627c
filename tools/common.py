"""What the tools share: quiet imports, one error style, and the config handling of mmdet's,
mmseg's and mmpretrain's tools/train.py and tools/test.py (what a run does beyond that comes from
the components its config names: mmmetaformer.SafeRunner, mmmetaformer.SafeCheckpointHook).

Import it before torch and the OpenMMLab packages: it silences their known warnings first.
"""
import argparse
import gc
import os
import os.path as osp
import re
import sys
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

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402

import mmmetaformer  # noqa: F401,E402  (registers the backbones and run components)

DEBUG_ENV = 'MMMETAFORMER_DEBUG'


def add_debug_arg(parser: argparse.ArgumentParser):
    parser.add_argument('--debug', action='store_true',
                        help=f'show the traceback of an error (or set {DEBUG_ENV}=1)')


def run_tool(main):
    """Run a tool's ``main()``. An exception becomes one ``error: ...`` line on stderr and exit
    status 1; with ``--debug`` on the command line or ``MMMETAFORMER_DEBUG=1`` it is raised with
    its traceback instead. Ctrl-C ends it with status 130."""
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)  # the tool said what was interrupted, or the shell shows ^C
    except Exception as err:
        if '--debug' in sys.argv[1:] or os.getenv(DEBUG_ENV, '0') not in ('', '0'):
            raise
        sys.exit(f'error: {describe_error(err)}')


def describe_error(err: BaseException) -> str:
    """The message of ``err``, or of the error it was raised from that mmmetaformer raised
    about a file or an argument (its own error classes: CheckpointError, DatasetError,
    ExportError), which says what to do; other errors are named with their type and a pointer
    to ``--debug``."""
    cause = err
    while cause is not None and not type(cause).__module__.startswith('mmmetaformer.'):
        cause = cause.__cause__ or cause.__context__
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
