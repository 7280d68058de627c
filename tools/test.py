"""Evaluate a checkpoint of a detector, segmentor or classifier with its config's test metrics.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE_OR_DIR]
        [--show-dir DIR] [--tta] [--cfg-options KEY=VALUE ...] [--launcher pytorch|slurm|mpi]

Metrics come from the config's ``test_evaluator``: COCO bbox/segm mAP (mmdet), mIoU (mmseg),
top-1/top-5 accuracy (mmpretrain).
"""
import argparse
import os

from common import add_common_args, build_runner, check_file, finish, load_config, run_tool

#: The dataloader a test reads (what SafeRunner.test() checks first).
DATALOADERS = ('test_dataloader',)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test a checkpoint with an OpenMMLab config')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='save the predictions: a .pkl file for detection and '
                        'classification, a directory of label PNGs for segmentation')
    parser.add_argument('--show-dir', help='save every test image with its drawn predictions '
                        '(detection: WORK_DIR/<run>/SHOW_DIR; segmentation: '
                        'SHOW_DIR/vis_data/vis_image)')
    parser.add_argument('--tta', action='store_true', help="test-time augmentation with the "
                        "config's tta_model and tta_pipeline (mmseg's dataset configs define "
                        'them; a detector config can inherit e.g. '
                        'mmdet::retinanet/retinanet_tta.py)')
    add_common_args(parser)
    return parser.parse_args(argv)


def enable_tta(cfg):
    """Wrap the model in the config's ``tta_model`` and test with its ``tta_pipeline``, as
    mmdet's and mmseg's tools/test.py do."""
    if cfg.get('default_scope') == 'mmdet' and cfg.model.get('roi_head', {}).get('mask_head'):
        raise SystemExit("error: --tta: mmdet's DetTTAModel merges boxes only, and this "
                         'config predicts instance masks')
    missing = [key for key in ('tta_model', 'tta_pipeline') if key not in cfg]
    if missing:
        raise SystemExit(f'error: --tta needs {" and ".join(missing)} in the config (mmseg\'s '
                         'dataset configs define both; for a detector, add e.g. '
                         "'mmdet::retinanet/retinanet_tta.py' to _base_)")
    dataset = cfg.test_dataloader.dataset
    while 'dataset' in dataset:  # through dataset wrappers
        dataset = dataset.dataset
    dataset.pipeline = cfg.tta_pipeline
    cfg.model = dict(cfg.tta_model, module=cfg.model)


def enable_drawing(cfg, scope, show_dir):
    """Make the config's visualization hook draw every test image into ``show_dir``."""
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise SystemExit('error: --show-dir needs default_hooks.visualization in the config')
    if scope == 'mmdet':
        hook.update(draw=True, test_out_dir=show_dir)
    elif scope == 'mmseg':
        hook.update(draw=True, interval=1)  # mmseg's default draws every 50th image
        cfg.visualizer.save_dir = show_dir
    else:  # mmpretrain's VisualizationHook
        hook.update(enable=True, interval=1, out_dir=show_dir)


def configure(args):
    """The run's config from the command line; refuses what every process would refuse (a
    missing checkpoint, the config, options it does not support)."""
    check_file(args.checkpoint, 'checkpoint')
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    scope = cfg.get('default_scope')
    if args.show_dir:
        enable_drawing(cfg, scope, args.show_dir)
    if args.tta:
        enable_tta(cfg)
    if args.out and scope == 'mmseg':
        cfg.test_evaluator.update(output_dir=args.out, keep_results=True)
    elif args.out and not args.out.endswith(('.pkl', '.pickle')):
        raise SystemExit(f'error: --out must be a .pkl file for {scope} configs, got {args.out}')
    return cfg


def main():
    args = parse_args()
    cfg = configure(args)
    scope = cfg.get('default_scope')
    runner = build_runner(cfg)
    partial = None
    if args.out and scope != 'mmseg':  # written whole: to a temporary file renamed at the end
        if scope == 'mmdet':
            from mmdet.evaluation import DumpDetResults as Dump
        else:
            from mmengine.evaluator import DumpResults as Dump
        partial = f'{args.out}.{os.getpid()}.partial.pkl'
        runner.test_evaluator.metrics.append(Dump(out_file_path=partial))
    try:
        runner.test()
        if partial and os.path.exists(partial):
            os.replace(partial, args.out)
    finally:
        if partial and os.path.exists(partial):
            os.remove(partial)
    del runner
    finish()


if __name__ == '__main__':
    run_tool(main)
