"""Train a detector (mmdet), segmentor (mmseg) or classifier (mmpretrain) from a config.

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--auto-scale-lr]
        [--resume [CHECKPOINT]] [--cfg-options KEY=VALUE ...] [--launcher pytorch|slurm|mpi]
"""
import argparse
import copy
import os
import sys

from common import add_common_args, build_runner, check_file, finish, load_config, run_tool

import torch
from mmmetaformer.checkpoints import first


def parse_args():
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
    return parser.parse_args()


def params_without_gradient(model_cfg, scope):
    """Names of the trainable parameters of ``model_cfg``'s backbone (a MetaFormer) and neck
    that no input of the heads depends on (e.g. a backbone output norm whose level the neck
    skips with ``start_level``, or that no mmseg head names in ``in_index``). Found by one
    backward pass of a small zero batch, in eval mode, through ``extract_feat`` and each head's
    input selection (mmseg ``_transform_inputs``, mmpretrain ``pre_logits``)."""
    from mmengine.registry import MODELS, DefaultScope
    from mmmetaformer.models import MetaFormer
    with DefaultScope.overwrite_default_scope(scope):  # a copy: mmseg's segmentors edit it
        model = MODELS.build(copy.deepcopy(model_cfg)).eval()
    if not isinstance(getattr(model, 'backbone', None), MetaFormer):
        return []
    heads = []
    for name in ('decode_head', 'auxiliary_head', 'head'):
        head = getattr(model, name, None)
        heads += list(head) if isinstance(head, torch.nn.ModuleList) else [head] if head else []
    feats = model.extract_feat(torch.zeros(1, 3, 128, 128))
    used = [head._transform_inputs(feats) if hasattr(head, '_transform_inputs')
            else head.pre_logits(feats) for head in heads
            if hasattr(head, '_transform_inputs') or hasattr(head, 'pre_logits')] or feats
    sum(t.sum() for t in _tensors(used)).backward()
    return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None
            and name.startswith(('backbone.', 'neck.'))]


def _tensors(outputs):
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for item in outputs for t in _tensors(item)]


def let_ddp_skip_unused(cfg):
    """DDP (``find_unused_parameters=False``) stops at the first step when a parameter gets no
    gradient; find such parameters before the runner starts and let DDP look for them, with
    one warning that names the tidier fix."""
    wrapper = cfg.get('model_wrapper_cfg') or cfg
    if wrapper.get('find_unused_parameters'):
        return
    unused = params_without_gradient(cfg.model, cfg.get('default_scope'))
    if not unused:
        return
    wrapper['find_unused_parameters'] = True
    if os.environ.get('RANK', '0') == '0':
        print(f'warning: {first(unused, 4)} never get a gradient (the neck or heads skip those '
              'backbone outputs): DDP runs with find_unused_parameters=True; to drop them instead, '
              "leave those stages out of the backbone's out_indices and their widths out of "
              "the neck's in_channels (mmdet FPN: start_level=0), or of the heads' in_index",
              file=sys.stderr, flush=True)


def main():
    args = parse_args()
    cfg = load_config(args)
    if args.amp:
        from mmengine.device import get_device
        from mmengine.logging import print_log
        from mmmetaformer.engine import amp_optim_wrapper
        cfg.optim_wrapper, chosen = amp_optim_wrapper(cfg.optim_wrapper, get_device())
        print_log(chosen, logger='current')
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
    if cfg.launcher != 'none':
        let_ddp_skip_unused(cfg)
    runner = build_runner(cfg)
    runner.train()
    del runner
    finish()


if __name__ == '__main__':
    run_tool(main)
