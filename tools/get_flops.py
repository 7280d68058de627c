"""Parameters and multiply-adds of full models (detector, segmentor or classifier) from configs.

    python tools/get_flops.py CONFIG [CONFIG ...] [--shape H W] [--cfg-options KEY=VALUE ...]

Counts one test-mode forward (``mode='tensor'``) of a randomly initialised model on one image
of ``--shape`` (default: 800x1280 for mmdet, 512x512 for mmseg, 224x224 for mmpretrain):
backbone, neck and heads; for two-stage detectors the box heads run on the RPN's proposals
(at most 1000) and the mask heads on the first 100 (as mmdet's Mask R-CNN forward does; for
Cascade Mask R-CNN, whose mmdet 3.x forward uses every proposal, too). Counted with
``torch.utils.flop_counter``: convolutions, linear layers, matmuls and attention
(``scaled_dot_product_attention``). Norms, activations, pooling, RoIAlign and NMS are not
counted. MACs are multiply-accumulates; FLOPs = 2 x MACs. (The "Flops" that OpenMMLab's own
get_flops tools print, and the papers' "MACs", are MACs; mmengine's counter, which those tools
call, finds the MACs of the same forward within 2%: it also counts norms and upsampling.)
"""
import argparse

from common import add_debug_arg, run_tool  # first: it silences the stack's known warnings

import torch
from mmengine.config import Config, DictAction
from mmengine.registry import DefaultScope, init_default_scope

import mmmetaformer  # noqa: F401  (registers the backbones)
from mmmetaformer.macs import count_macs

DEFAULT_SHAPES = {'mmdet': (800, 1280), 'mmseg': (512, 512), 'mmpretrain': (224, 224)}


def build_model(cfg: Config):
    """The config's model, randomly initialised (no pretrained download), in eval mode."""
    from mmengine.registry import MODELS
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    if cfg.get('custom_imports'):
        from mmengine.utils import import_modules_from_strings
        import_modules_from_strings(**cfg.custom_imports)
    return MODELS.build(cfg.model).eval()


def dummy_inputs(scope: str, shape):
    """A preprocessed batch of one image of ``shape`` and its data samples."""
    inputs = torch.rand(1, 3, *shape)
    meta = dict(img_shape=tuple(shape), ori_shape=tuple(shape), pad_shape=tuple(shape),
                batch_input_shape=tuple(shape), scale_factor=(1.0, 1.0))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        return inputs, [DetDataSample(metainfo=meta)]
    if scope == 'mmseg':
        from mmseg.structures import SegDataSample
        return inputs, [SegDataSample(metainfo=meta)]
    return inputs, None


def count_cascade_masks_on(model, num_rois=100):
    """mmdet 3.x's ``CascadeRoIHead.forward`` runs its mask heads on every proposal, while
    ``StandardRoIHead.forward`` (Mask R-CNN) and mmdet 2.x's counts use the first 100: make the
    cascade's mask heads compute on the first ``num_rois`` too (their cost is per RoI), returning
    zeros of the full shape for the rest, so both detectors are counted alike."""
    from mmdet.models.roi_heads import CascadeRoIHead
    head = getattr(model, 'roi_head', None)
    if not isinstance(head, CascadeRoIHead) or not head.with_mask:
        return
    mask_forward = head._mask_forward

    def first_rois_only(stage, x, rois):
        results = mask_forward(stage, x, rois[:num_rois])
        preds = results['mask_preds']
        results['mask_preds'] = preds.new_zeros((len(rois), *preds.shape[1:]))
        return results

    head._mask_forward = first_rois_only


def complexity(cfg: Config, shape=None) -> dict:
    """``params`` (all parameters), ``backbone_params``, ``macs`` and ``shape`` of the
    config's model."""
    scope = cfg.get('default_scope')
    shape = tuple(shape or DEFAULT_SHAPES.get(scope, (224, 224)))
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(scope):
        model = build_model(cfg)
        if scope == 'mmdet':
            count_cascade_masks_on(model)
        inputs, samples = dummy_inputs(scope, shape)
        macs = count_macs(model, inputs, samples, mode='tensor')
    backbone = getattr(model, 'backbone', model)
    return dict(shape=shape, macs=macs,
                params=sum(p.numel() for p in model.parameters()),
                backbone_params=sum(p.numel() for p in backbone.parameters()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('configs', nargs='+', help='config files')
    parser.add_argument('--shape', type=int, nargs='+', metavar='SIZE',
                        help='input height and width (one value: square)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value pairs')
    add_debug_arg(parser)
    args = parser.parse_args()
    if args.shape is not None and len(args.shape) > 2:
        parser.error('--shape takes one or two values: H [W]')
    shape = None if args.shape is None else (args.shape * 2)[:2]
    print('| config | input (HxW) | params (M) | backbone params (M) | GMACs | GFLOPs |')
    print('|---|---|---|---|---|---|')
    for path in args.configs:
        cfg = Config.fromfile(path)
        if args.cfg_options:
            cfg.merge_from_dict(args.cfg_options)
        r = complexity(cfg, shape)
        print(f'| {path} | {r["shape"][0]}x{r["shape"][1]} | {r["params"] / 1e6:.1f} | '
              f'{r["backbone_params"] / 1e6:.1f} | {r["macs"] / 1e9:.1f} | '
              f'{2 * r["macs"] / 1e9:.1f} |', flush=True)


if __name__ == '__main__':
    run_tool(main)
