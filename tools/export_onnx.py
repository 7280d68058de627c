"""Export a MetaFormer backbone, classifier, segmentor or detector to ONNX.

    python tools/export_onnx.py CONFIG [CHECKPOINT] --out FILE.onnx [--shape H W] [--dynamic]
        [--opset 17] [--part PART] [--groupnorm layernorm|reducemean|instancenorm]
        [--no-fold] [--check]

CONFIG is an mmpretrain, mmseg or mmdet config, or a backbone name (``caformer_s18``: the four
raw stage outputs; CHECKPOINT in any format the backbone reads). The graph's input ``input`` is
the preprocessed batch (N x 3 x H x W, normalised with the config's mean and std, stored in
the file's metadata). Parts: ``classifier`` (logits), ``segmentor`` (logits at the input size,
whole-image inference), ``dense_head`` (single-stage detectors: raw class and box maps),
``features`` (backbone + neck; the default for two-stage detectors), ``backbone``.
``--check`` runs the file in onnxruntime against PyTorch on the same input and prints the
largest difference per output and both CPU latencies.
"""
import argparse

from common import add_debug_arg, run_tool  # first: it silences the stack's known warnings

from mmmetaformer.deploy import (DEFAULT_SHAPES, GROUPNORM_FORMS, Exportable,
                                 build_exportable, check_onnx, export_onnx)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='config file, or a backbone name such as caformer_s18')
    parser.add_argument('checkpoint', nargs='?', help='checkpoint (default: random weights)')
    parser.add_argument('--out', required=True, help='output .onnx file')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input size to trace and check (default: 224x224 classifiers and '
                        'backbones, 512x512 segmentors, 800x1344 detectors)')
    parser.add_argument('--dynamic', action='store_true',
                        help='free batch size, height and width')
    parser.add_argument('--opset', type=int, default=17,
                        help='ONNX opset (>= 14; 17+ keeps LayerNorm one op)')
    parser.add_argument('--part', choices=Exportable.PARTS,
                        help='what to export (default: the whole model where possible)')
    parser.add_argument('--groupnorm', choices=GROUPNORM_FORMS, default='layernorm',
                        help='form of GroupNorm(1): an ONNX LayerNormalization over (C, H, W) '
                        '(default), ReduceMean arithmetic, or Reshape + InstanceNormalization')
    parser.add_argument('--no-fold', action='store_true',
                        help="keep StarReLU's scale and bias instead of folding them into the "
                        'next layer')
    parser.add_argument('--check', action='store_true',
                        help='compare with PyTorch in onnxruntime, print differences and latency')
    parser.add_argument('--runs', type=int, default=20, help='timed runs for --check')
    add_debug_arg(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    exportable, info = build_exportable(args.config, args.checkpoint, args.part)
    shape = tuple(args.shape or DEFAULT_SHAPES[info['scope']])
    names = export_onnx(exportable, args.out, shape, args.dynamic, args.opset,
                        args.groupnorm, not args.no_fold,
                        metadata=dict(config=args.config, **info['normalization']))
    for note in info['notes']:
        print(f'note: {note}')
    print(f'{info["part"]} of {args.config} -> {args.out} (opset {args.opset}, input '
          f'{"N x 3 x H x W" if args.dynamic else f"1 x 3 x {shape[0]} x {shape[1]}"}; '
          f'outputs {", ".join(names)})')
    if args.check:
        result = check_onnx(args.out, exportable, shape, runs=args.runs)
        for name, (diff, scale) in result['outputs'].items():
            print(f'  {name}: max abs diff {diff:.3g} (max abs value {scale:.3g})')
        print(f'latency at {shape[0]}x{shape[1]}, CPU, median of {args.runs}: onnxruntime '
              f'{result["onnxruntime_ms"]:.1f} ms, PyTorch {result["pytorch_ms"]:.1f} ms')


if __name__ == '__main__':
    run_tool(main)
