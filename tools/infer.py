"""Run a detector or segmentor on images and save a picture of its predictions per image,
with the argument names of mmdet's demo/image_demo.py.

    python tools/infer.py INPUTS CONFIG --weights CHECKPOINT [--out-dir outputs]
        [--device cpu] [--pred-score-thr 0.3] [--opacity 0.5]

INPUTS is an image file, a folder (its .jpg/.jpeg/.png/.bmp files) or a quoted glob pattern
(``'data/*.jpg'``); the picture of each image is ``OUT_DIR/vis/<image file name>``, as mmdet's
``DetInferencer`` names it. Detection: boxes, class names, scores and instance masks scoring at
least ``--pred-score-thr``. Segmentation: the predicted label map blended over the image.
"""
import argparse
import glob
import os
import os.path as osp

from common import add_debug_arg, check_file, run_tool

from mmmetaformer.checkpoints import load_model_checkpoint
from mmmetaformer.dataset_checks import check_image
from mmmetaformer.fileio import write_bytes
from mmmetaformer.trust import CheckpointError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('inputs', help='image file, folder or quoted glob pattern')
    parser.add_argument('model', help='config file (mmdet or mmseg)')
    parser.add_argument('--weights', required=True, help='checkpoint file')
    parser.add_argument('--out-dir', default='outputs',
                        help='the pictures go to OUT_DIR/vis/ (default: %(default)s)')
    parser.add_argument('--device', help='default: cuda:0 if available, else cpu')
    parser.add_argument('--pred-score-thr', type=float, default=0.3,
                        help='detection: draw boxes scoring at least this (default: %(default)s)')
    parser.add_argument('--opacity', type=float, default=0.5,
                        help='segmentation: opacity of the label overlay')
    add_debug_arg(parser)
    return parser.parse_args(argv)


def find_images(spec):
    """The image files ``spec`` names: a file, a folder's images, or a glob's matches."""
    if osp.isfile(spec):
        return [spec]
    paths = glob.glob(osp.join(spec, '*')) if osp.isdir(spec) else glob.glob(spec)
    images = sorted(p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS) and osp.isfile(p))
    if not images:
        what = 'folder' if osp.isdir(spec) else 'file or pattern'
        raise SystemExit(f'error: no images found at {spec} ({what}); pass an image file, a '
                         f'folder of {"/".join(IMAGE_EXTENSIONS)} files or a quoted glob')
    return images


def output_paths(images, out_dir):
    """``out_dir/vis/<image file name>`` per image; two images of one name are refused."""
    names = [osp.basename(p) for p in images]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SystemExit(f'error: several input images are named {", ".join(twice)}: their '
                         'pictures would overwrite each other; pass one folder at a time')
    return [osp.join(out_dir, 'vis', name) for name in names]


def init_predictor(cfg, checkpoint, device):
    """The mmdet detector or mmseg segmentor of ``cfg`` (a Config or its file) with
    ``checkpoint`` loaded whole (:func:`~mmmetaformer.checkpoints.load_model_checkpoint`), its
    classes (and palette) from the checkpoint's ``dataset_meta``, else from the config's test
    dataset."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    if isinstance(cfg, str):
        cfg = Config.fromfile(cfg)
    init_default_scope(cfg.get('default_scope'))
    model = MODELS.build(cfg.model)
    meta = load_model_checkpoint(model, checkpoint).get('meta', {})
    dataset_meta = meta.get('dataset_meta') if isinstance(meta, dict) else None
    if dataset_meta is None:
        dataset_meta = cfg.test_dataloader.dataset.get('metainfo')
    classes = dataset_meta.get('classes') if isinstance(dataset_meta, dict) else None
    if not (isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f"{checkpoint}: its meta['dataset_meta'] holds no list of class "
                              'names, nor does the test dataset of the config (metainfo)')
    model.cfg = cfg  # as init_detector / init_model set it
    model.dataset_meta = {k.lower(): v for k, v in dataset_meta.items()}
    return model.to(device).eval()


def draw_detections(model, image, out, score_thr):
    """Predict with mmdet and draw boxes, labels and masks into ``out``; returns the
    predicted instances."""
    import mmcv
    from mmdet.apis import inference_detector
    result = inference_detector(model, image)
    visualizer = _visualizer(model)
    visualizer.add_datasample('result', mmcv.imread(image, channel_order='rgb'), result,
                              draw_gt=False, pred_score_thr=score_thr)
    _write_picture(visualizer.get_image(), out)
    return result.pred_instances


def _write_picture(rgb, out):
    import cv2
    ok, data = cv2.imencode(os.path.splitext(out)[1] or '.png', rgb[..., ::-1])
    if not ok:
        raise ValueError(f'cannot encode the picture for {out}')
    write_bytes(out, data.tobytes())


def _visualizer(model):
    """One mmdet visualizer per process (mmengine keeps instances by name)."""
    from mmdet.registry import VISUALIZERS
    from mmdet.visualization import DetLocalVisualizer
    if DetLocalVisualizer.check_instance_created('infer'):
        visualizer = DetLocalVisualizer.get_instance('infer')
    else:
        visualizer = VISUALIZERS.build(dict(model.cfg.visualizer, name='infer',
                                            vis_backends=None))
    visualizer.dataset_meta = model.dataset_meta
    return visualizer


def draw_segmentation(model, image, out, opacity):
    """Predict with mmseg and blend the label map over the image into ``out``; returns the
    predicted label map."""
    from mmseg.apis import inference_model, show_result_pyplot
    result = inference_model(model, image)
    _write_picture(show_result_pyplot(model, image, result, opacity=opacity, show=False), out)
    return result.pred_sem_seg


def main(argv=None):
    args = parse_args(argv)
    check_file(args.model, 'config')
    check_file(args.weights, 'checkpoint')
    images = find_images(args.inputs)
    outs = output_paths(images, args.out_dir)

    import torch
    from mmengine.config import Config
    cfg = Config.fromfile(args.model)
    scope = cfg.get('default_scope')
    if scope not in ('mmdet', 'mmseg'):
        raise SystemExit(f'error: infer.py takes mmdet or mmseg configs, got default_scope '
                         f'{scope!r} in {args.model}')
    device = args.device or ('cuda:0' if torch.cuda.is_available() else 'cpu')
    model = init_predictor(cfg, args.weights, device)
    for image, out in zip(images, outs):
        check_image(image)
        if scope == 'mmdet':
            pred = draw_detections(model, image, out, args.pred_score_thr)
            print(f'{image}: {int((pred.scores >= args.pred_score_thr).sum())} detections '
                  f'scoring >= {args.pred_score_thr} -> {out}')
        else:
            draw_segmentation(model, image, out, args.opacity)
            print(f'{image}: segmentation -> {out}')


if __name__ == '__main__':
    run_tool(main)
