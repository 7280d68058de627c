"""Run a detector or segmentor on one image and save a picture of its predictions.

    python tools/infer.py IMAGE CONFIG CHECKPOINT [--out result.png] [--device cpu]
        [--score-thr 0.3] [--opacity 0.5]

Detection: boxes, class names, scores and instance masks above ``--score-thr``.
Segmentation: the predicted label map blended over the image.
"""
import argparse

import mmcv
import torch
from mmengine.config import Config

import mmmetaformer  # noqa: F401  (registers the backbones, applies mmmetaformer.compat)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('image', help='image file')
    parser.add_argument('config', help='config file (mmdet or mmseg)')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', default='result.png', help='output picture')
    parser.add_argument('--device', default='cuda:0' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: draw boxes scoring at least this')
    parser.add_argument('--opacity', type=float, default=0.5,
                        help='segmentation: opacity of the label overlay')
    return parser.parse_args(argv)


def draw_detections(image, config, checkpoint, out, device, score_thr):
    """Predict with mmdet and draw boxes, labels and masks into ``out``; returns the
    predicted instances."""
    from mmdet.apis import inference_detector, init_detector
    from mmdet.registry import VISUALIZERS
    model = init_detector(config, checkpoint, device=device)
    result = inference_detector(model, image)
    visualizer = VISUALIZERS.build(dict(model.cfg.visualizer, name='infer', vis_backends=None))
    visualizer.dataset_meta = model.dataset_meta
    visualizer.add_datasample('result', mmcv.imread(image, channel_order='rgb'), result,
                              draw_gt=False, pred_score_thr=score_thr, out_file=out)
    return result.pred_instances


def draw_segmentation(image, config, checkpoint, out, device, opacity):
    """Predict with mmseg and blend the label map over the image into ``out``; returns the
    predicted label map."""
    from mmseg.apis import inference_model, init_model, show_result_pyplot
    model = init_model(config, checkpoint, device=device)
    result = inference_model(model, image)
    show_result_pyplot(model, image, result, opacity=opacity, show=False, out_file=out)
    return result.pred_sem_seg


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    scope = cfg.get('default_scope')
    if scope == 'mmdet':
        pred = draw_detections(args.image, cfg, args.checkpoint, args.out, args.device,
                               args.score_thr)
        print(f'{(pred.scores >= args.score_thr).sum()} detections scoring >= '
              f'{args.score_thr}; picture saved to {args.out}')
    elif scope == 'mmseg':
        draw_segmentation(args.image, cfg, args.checkpoint, args.out, args.device, args.opacity)
        print(f'segmentation saved to {args.out}')
    else:
        raise SystemExit(f'error: infer.py takes mmdet or mmseg configs, got default_scope '
                         f'{scope!r} in {args.config}')


if __name__ == '__main__':
    main()
