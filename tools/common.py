"""Config handling shared by tools/train.py and tools/test.py (mmdet, mmseg or mmpretrain)."""
import argparse
import gc
import os
import os.path as osp

import torch
from mmengine.config import Config, DictAction

import mmmetaformer  # noqa: F401  (registers the backbones, applies mmmetaformer.compat)
from mmmetaformer.datasets import check_dataset


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


def load_config(args, dataloaders=('train_dataloader', 'val_dataloader', 'test_dataloader')):
    """Read ``args.config``, apply ``--cfg-options``, ``--work-dir`` and ``--launcher``, and
    check that the datasets of ``dataloaders`` exist (one clear message, exit status 1, if
    not)."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    # work_dir priority: --work-dir > the config's work_dir > work_dirs/<config name>
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.launcher != 'none' and not torch.cuda.is_available():
        # The OpenMMLab configs ask for NCCL, which needs GPUs; gloo runs on CPUs.
        cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    try:
        check_dataset({key: cfg.get(key) for key in dataloaders})
    except FileNotFoundError as err:
        raise SystemExit(f'error: {err}') from None
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
