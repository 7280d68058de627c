"""Train a detector (mmdet), segmentor (mmseg) or classifier (mmpretrain) from a config.

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--auto-scale-lr]
        [--resume [CHECKPOINT]] [--cfg-options KEY=VALUE ...] [--launcher pytorch|slurm|mpi]
"""
import argparse
import os.path as osp
import sys

from common import (add_common_args, build_runner, check_file, finish, load_config, run_tool,
                    speaks_for_the_run)

from mmmetaformer.fileio import intact_checkpoints

#: The dataloaders a training run reads (what SafeRunner.train() checks first).
DATALOADERS = ('train_dataloader', 'val_dataloader')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a model from an OpenMMLab config')
    parser.add_argument('config', help='config file')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision: fp16 with dynamic loss scaling on GPUs, bf16 '
                        'autocast of the backbone and neck on CPU')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by (GPUs x batch size) / auto_scale_lr.base_batch_size')
    parser.add_argument('--resume', nargs='?', const='auto', metavar='CHECKPOINT',
                        help='resume from CHECKPOINT, or without a value from the latest '
                        'checkpoint in the work directory')
    add_common_args(parser)
    return parser.parse_args(argv)


def configure(args):
    """The run's config from the command line; refuses what every process would refuse (the
    config, --auto-scale-lr without its base, a missing checkpoint to load)."""
    cfg = load_config(args)
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise SystemExit('error: --auto-scale-lr needs auto_scale_lr.base_batch_size '
                             'in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    if cfg.get('load_from'):  # before the ~500 lines of building output, not after them
        check_file(cfg.load_from, '--resume' if args.resume else 'load_from')
    return cfg


def interrupted(work_dir: str) -> str:
    """What to say of a stopped run: the newest complete checkpoint of ``work_dir``."""
    saved = intact_checkpoints(osp.abspath(work_dir), newest_only=True)
    return 'interrupted: ' + (f'the last complete checkpoint is {saved[0]}; continue with '
                              '--resume' if saved else 'no checkpoint was saved')


def main():
    args = parse_args()
    cfg = configure(args)
    if args.amp:
        from mmengine.device import get_device
        from mmengine.logging import print_log
        from mmmetaformer.engine import amp_optim_wrapper
        cfg.optim_wrapper, chosen = amp_optim_wrapper(cfg.optim_wrapper, get_device())
        print_log(chosen, logger='current')
    runner = build_runner(cfg)
    try:
        runner.train()
    except KeyboardInterrupt:
        if speaks_for_the_run():
            print(interrupted(runner.work_dir), file=sys.stderr, flush=True)
        raise
    del runner
    finish()


if __name__ == '__main__':
    run_tool(main)
