"""Export a MetaFormer backbone, classifier, segmentor or whole detector to ONNX.

    python tools/export_onnx.py CONFIG [CHECKPOINT] --out FILE.onnx [--shape H W] [--dynamic]
        [--opset 17] [--part PART] [--groupnorm layernorm|reducemean|instancenorm]
        [--no-fold] [--check [--images DIR]]

CONFIG is an mmpretrain, mmseg or mmdet config, or a backbone name (``caformer_s18``: the four
raw stage outputs; CHECKPOINT in any format the backbone reads). The graph's input ``input`` is
the preprocessed batch (N x 3 x H x W, normalised with the config's mean and std); the file's
metadata holds the preprocessing, as JSON. Parts: ``classifier`` (logits), ``segmentor``
(logits at the input size, whole-image inference), ``detector`` (the default for detectors:
mmdeploy's ``dets``, ``labels`` and ``masks``, standard ONNX ops only), ``dense_head``
(single-stage detectors: raw class and box maps), ``features`` (backbone + neck),
``backbone``. ``--check`` runs the file in onnxruntime against PyTorch and prints both CPU
latencies: for a detector, the detections of mmdet's ``predict()`` on the images of
``--images`` (default: the config's validation images) with a table per image; otherwise the
largest difference per output on a random input.
"""
import argparse
import glob
import os.path as osp
import statistics
import time

from common import add_debug_arg, run_tool  # first: it silences the stack's known warnings

from mmmetaformer.deploy import (DEFAULT_SHAPES, GROUPNORM_FORMS, MAX_SIDE, MIN_SIDE,
                                 Exportable, ExportError, build_exportable, check_onnx,
                                 export_onnx)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='config file, or a backbone name such as caformer_s18')
    parser.add_argument('checkpoint', nargs='?', help='checkpoint (default: random weights)')
    parser.add_argument('--out', required=True, help='output .onnx file')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input size to trace and check (default: 224x224 classifiers and '
                        'backbones, 512x512 segmentors, 800x1344 detectors)')
    parser.add_argument('--dynamic', action='store_true',
                        help='free batch size (detectors: 1), height and width')
    parser.add_argument('--opset', type=int, default=17,
                        help='ONNX opset (>= 14, detectors >= 16; 17+ keeps LayerNorm one op)')
    parser.add_argument('--part', choices=Exportable.PARTS,
                        help='what to export (default: the whole model)')
    parser.add_argument('--groupnorm', choices=GROUPNORM_FORMS, default='layernorm',
                        help='form of GroupNorm(1): an ONNX LayerNormalization over (C, H, W) '
                        '(default), ReduceMean arithmetic, or Reshape + InstanceNormalization')
    parser.add_argument('--no-fold', action='store_true',
                        help="keep StarReLU's scale and bias instead of folding them into the "
                        'next layer')
    parser.add_argument('--check', action='store_true',
                        help='compare with PyTorch in onnxruntime, print differences and latency')
    parser.add_argument('--images', help='detectors, --check: folder of images (default: the '
                        "config's validation images)")
    parser.add_argument('--runs', type=int, default=20, help='timed runs for --check')
    add_debug_arg(parser)
    return parser.parse_args(argv)


def check_shape(shape):
    """Refuse an input size the export cannot trace or would not fit in memory."""
    if not all(MIN_SIDE <= side <= MAX_SIDE for side in shape):
        raise ExportError(f'--shape {shape[0]} {shape[1]}: each side must be between '
                          f'{MIN_SIDE} and {MAX_SIDE} pixels')


def validation_images(cfg, folder=None):
    """The image files of ``folder``, or of the config's validation set."""
    if folder is None:
        dataset = cfg.val_dataloader.dataset
        folder = osp.join(dataset.get('data_root', ''), dataset.get('data_prefix', {})
                          .get('img', ''))
    images = sorted(p for p in glob.glob(osp.join(folder, '*'))
                    if p.lower().endswith(IMAGE_EXTENSIONS))
    if not images:
        raise ExportError(f'no images in {folder} to check with (pass --images DIR; the demo '
                          'data: python tools/demo.py)')
    return images


def median_ms(run, runs: int) -> float:
    """Median wall time of ``runs`` calls of ``run`` after one warm-up call."""
    run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def check_detector(path, exportable, cfg, images, shape=None, runs: int = 0):
    """Run ``path`` in onnxruntime and mmdet's ``predict()`` on each image of ``images``,
    preprocessed as the config tests (padded to ``shape`` for a fixed-size export):
    ``(rows, latencies)``, one :func:`~mmmetaformer.deploy.detector.compare_detections` row per
    image and, with ``runs``, the median milliseconds of both on the first image."""
    import onnxruntime as ort
    import torch
    from mmmetaformer.deploy.detector import (compare_detections, mmdet_predict,
                                              onnx_detections, preprocess_images)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    detector = exportable.model.detector
    mask_thr = cfg.model.test_cfg.get('rcnn', {}).get('mask_thr_binary', 0.5)
    rows, latencies = [], {}
    for image, x, _ in preprocess_images(detector, cfg, images, shape):
        got = onnx_detections(session.run(None, {'input': x.numpy()}), mask_thr)
        rows.append(dict(image=osp.basename(image),
                         **compare_detections(mmdet_predict(detector, x), got)))
        if runs and not latencies:
            latencies = dict(onnxruntime=median_ms(
                lambda: session.run(None, {'input': x.numpy()}), runs),
                pytorch=median_ms(lambda: mmdet_predict(detector, x), runs))
    return rows, latencies


def print_detector_check(rows, latencies, shape_text, runs):
    print(f'{"image":<24} {"torch>=.3":>9} {"matched":>7} {"box IoU":>7} {"d score":>7} '
          f'{"mask IoU":>8} {"extra":>5}')
    for row in rows:
        print(f'{row["image"]:<24} {row["reference"]:>9} {row["matched"]:>7} '
              f'{row["box_iou"]:>7.3f} {row["score_diff"]:>7.4f} {row["mask_iou"]:>8.3f} '
              f'{row["extra"]:>5}' + ('' if row['ok'] else '  MISMATCH'))
    failed = sum(not row['ok'] for row in rows)
    print(f'{len(rows) - failed}/{len(rows)} images with the same detections (PyTorch >= 0.3 '
          'matched: same label, box IoU >= 0.9, score within 0.05, mask IoU >= 0.85; no extra '
          'ONNX >= 0.5)')
    if latencies:
        print(f'latency at {shape_text}, CPU, median of {runs}: onnxruntime '
              f'{latencies["onnxruntime"]:.1f} ms, PyTorch predict() '
              f'{latencies["pytorch"]:.1f} ms')
    return failed


def main(argv=None):
    args = parse_args(argv)
    if args.shape:
        check_shape(args.shape)
    exportable, info = build_exportable(args.config, args.checkpoint, args.part)
    shape = tuple(args.shape or DEFAULT_SHAPES[info['scope']])
    names = export_onnx(exportable, args.out, shape, args.dynamic, args.opset,
                        args.groupnorm, not args.no_fold,
                        metadata=dict(config=args.config, **info['metadata']))
    for note in info['notes']:
        print(f'note: {note}')
    batch = '1' if info['part'] == 'detector' else 'N'
    print(f'{info["part"]} of {args.config} -> {args.out} (opset {args.opset}, input '
          f'{f"{batch} x 3 x H x W" if args.dynamic else f"1 x 3 x {shape[0]} x {shape[1]}"}'
          f'; outputs {", ".join(names)})')
    if not args.check:
        return
    if info['part'] == 'detector':
        rows, latencies = check_detector(
            args.out, exportable, info['cfg'], validation_images(info['cfg'], args.images),
            None if args.dynamic else shape, args.runs)
        shape_text = 'the first image' if args.dynamic else f'{shape[0]}x{shape[1]}'
        if print_detector_check(rows, latencies, shape_text, args.runs):
            raise SystemExit('error: the ONNX detections differ from PyTorch (table above)')
        return
    result = check_onnx(args.out, exportable, shape, runs=args.runs)
    for name, (diff, scale) in result['outputs'].items():
        print(f'  {name}: max abs diff {diff:.3g} (max abs value {scale:.3g})')
    print(f'latency at {shape[0]}x{shape[1]}, CPU, median of {args.runs}: onnxruntime '
          f'{result["onnxruntime_ms"]:.1f} ms, PyTorch {result["pytorch_ms"]:.1f} ms')


if __name__ == '__main__':
    run_tool(main)
