"""Run an exported .onnx (tools/export_onnx.py) on images with onnxruntime alone and save a
picture of its predictions per image: no PyTorch, mmcv or mmdet at run time.

    python tools/onnx_infer.py MODEL.onnx IMAGES... [--out-dir onnx_results] [--score-thr 0.3]
        [--opacity 0.5]

IMAGES are image files or folders (their .jpg/.jpeg/.png/.bmp files). The preprocessing (the
config's test resize, mean, std, channel order, padding) comes from the file's metadata.
Detectors: boxes, class names, scores and masks above ``--score-thr`` (tools/infer.py's
picture); segmentors: the label map blended over the image; classifiers: the top class and
its score written on the image. Needs numpy, opencv-python and onnxruntime.
"""
import argparse
import importlib.util
import json
import math
import os
import os.path as osp
import sys

import cv2
import numpy as np
import onnxruntime as ort


def _package_file(name):
    """The module mmmetaformer/<name>.py (standard library only), loaded as a file from where
    the package is installed: importing the package would import torch and the OpenMMLab
    packages."""
    spec = importlib.util.find_spec('mmmetaformer')  # locates the package, imports nothing
    folder = spec.submodule_search_locations[0] if spec else osp.join(
        osp.dirname(osp.dirname(osp.abspath(__file__))), 'mmmetaformer')  # beside tools/
    spec = importlib.util.spec_from_file_location(f'mmmetaformer_{name}',
                                                  osp.join(folder, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dataset_checks, fileio = _package_file('dataset_checks'), _package_file('fileio')
printable = dataset_checks.printable
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
MAX_SIDE = 16384  # of the model's input, and of each size the metadata gives
MAX_PIXELS = 1 << 25  # of the model's input (H x W): 400 MB as float32


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model', help='.onnx file written by tools/export_onnx.py')
    parser.add_argument('images', nargs='+', help='image files or folders')
    parser.add_argument('--out-dir', default='onnx_results',
                        help='folder for the pictures, <image name>.png each')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: draw boxes scoring at least this')
    parser.add_argument('--opacity', type=float, default=0.5,
                        help='segmentation: opacity of the label overlay')
    return parser.parse_args(argv)


def find_images(specs):
    images = []
    for spec in specs:
        if osp.isdir(spec):
            images += sorted(osp.join(spec, name) for name in os.listdir(spec)
                             if name.lower().endswith(IMAGE_EXTENSIONS))
        elif osp.isfile(spec):
            images.append(spec)
        else:
            raise SystemExit(f'error: no image file or folder at {spec}')
    if not images:
        raise SystemExit(f'error: no {"/".join(IMAGE_EXTENSIONS)} images in {" ".join(specs)}')
    return images


def output_paths(images, out_dir):
    """``out_dir/<image name>.png`` per image; images that would share one are refused."""
    outs = [osp.join(out_dir, osp.splitext(osp.basename(p))[0] + '.png') for p in images]
    twice = sorted({o for o in outs if outs.count(o) > 1})
    if twice:
        same = [p for p, o in zip(images, outs) if o == twice[0]]
        raise SystemExit(f'error: the images {" and ".join(same)} would both be drawn to '
                         f'{twice[0]}, the second over the first; pass one folder at a time')
    return outs


def _is_number(x) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def _is_size(x) -> bool:
    return type(x) is int and 0 < x <= MAX_SIDE


def _is_sizes(x) -> bool:
    """An int or a pair of ints, each a size."""
    return _is_size(x) or type(x) is list and len(x) == 2 and all(map(_is_size, x))


def _is_resize_step(step) -> bool:
    kind = step.get('type', '').split('.')[-1] if type(step) is dict and type(
        step.get('type')) is str else None
    if kind == 'Resize':
        return _is_sizes(step.get('scale')) and type(step.get('keep_ratio', False)) is bool
    if kind == 'ResizeEdge':
        return _is_size(step.get('scale')) and step.get('edge', 'short') in (
            'short', 'long', 'width', 'height')
    return kind == 'CenterCrop' and _is_sizes(step.get('crop_size'))


#: The metadata tools/export_onnx.py writes as JSON: what each must be, and a test of it.
METADATA = {
    'mean': ('1 or 3 finite numbers', lambda v: type(v) is list and len(v) in (1, 3)
             and all(map(_is_number, v))),
    'std': ('1 or 3 positive numbers', lambda v: type(v) is list and len(v) in (1, 3)
            and all(_is_number(x) and x > 0 for x in v)),
    'bgr_to_rgb': ('true or false', lambda v: type(v) is bool),
    'to_rgb': ('true or false', lambda v: type(v) is bool),
    'pad_size_divisor': (f'an int from 1 to {MAX_SIDE}', _is_size),
    'resize': (f'a list of Resize, ResizeEdge and CenterCrop steps of sizes up to {MAX_SIDE}',
               lambda v: type(v) is list and all(map(_is_resize_step, v))),
    'classes': ('a list of names', lambda v: type(v) is list and all(
        type(c) is str for c in v)),
    'palette': ('a list of RGB colours', lambda v: type(v) is list and all(
        type(c) is list and len(c) == 3 and all(type(x) is int and 0 <= x < 256 for x in c)
        for c in v)),
    'mask_thr_binary': ('a finite number', _is_number),
}


class OnnxModel:
    """An exported model, its metadata and its preprocessing."""

    def __init__(self, path):
        if not osp.isfile(path):
            raise SystemExit(f'error: model file not found: {path}')
        self.path = path
        options = ort.SessionOptions()
        options.log_severity_level = 4  # its messages would follow the one error line
        try:
            self.session = ort.InferenceSession(path, options,
                                                providers=['CPUExecutionProvider'])
        except Exception as err:  # onnxruntime's own errors (not a model, unknown ops)
            raise SystemExit(f'error: onnxruntime cannot load {path}: '
                             f'{printable(str(err))[:500]}') from None
        props = self.session.get_modelmeta().custom_metadata_map
        if props.get('producer') != 'mmmetaformer':
            raise SystemExit(f'error: {path} was not written by tools/export_onnx.py (no '
                             'preprocessing in its metadata)')
        self.part = props.get('part')
        if self.part not in ('detector', 'segmentor', 'classifier'):
            held = f'part {self.part[:40]!r}' if self.part else 'no part'  # repr: escaped
            raise SystemExit(f'error: {path} holds {held} in its metadata; onnx_infer.py runs '
                             'whole detectors, segmentors and classifiers')
        meta = {key: self._metadata(props, key) for key in METADATA if key in props}
        if 'mean' not in meta or 'std' not in meta:
            raise SystemExit(f'error: {path} has no mean and std in its metadata (export it '
                             'with tools/export_onnx.py from a config)')
        self.mean = np.array(meta['mean'], np.float32)
        self.std = np.array(meta['std'], np.float32)
        self.to_rgb = meta.get('bgr_to_rgb', meta.get('to_rgb', False))
        self.divisor = meta.get('pad_size_divisor', 1)
        self.resize = meta.get('resize', [])
        self.classes = meta.get('classes')
        self.palette = meta.get('palette')
        self.mask_thr = meta.get('mask_thr_binary', 0.5)
        self.fixed = self._input_size()

    def _metadata(self, props, key):
        what, test = METADATA[key]
        try:
            value = json.loads(props[key])
        except (ValueError, RecursionError):
            value = test = None
        if not (test and test(value)):
            raise SystemExit(f'error: {self.path} has a metadata {key} that is not {what} in '
                             'JSON (export it again with tools/export_onnx.py)')
        return value

    def _input_size(self):
        """``(H, W)`` of a fixed-size input, None for a dynamic one; an input other than
        tools/export_onnx.py's (one float N x 3 x H x W tensor named ``input``) is refused."""
        inputs = self.session.get_inputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        fixed = [d for d in shape[2:] if isinstance(d, int)]  # free sizes: names or None
        if not (len(inputs) == 1 and inputs[0].name == 'input' and len(shape) == 4
                and inputs[0].type == 'tensor(float)' and len(fixed) in (0, 2)
                and all(not isinstance(d, int) or d == size for d, size in zip(shape, (1, 3)))
                and all(map(_is_size, fixed))):
            raise SystemExit(f'error: {self.path} does not take what tools/export_onnx.py '
                             'gives a model: one float tensor named input, 1 x 3 x H x W with '
                             f'H and W free or fixed up to {MAX_SIDE}')
        if fixed and fixed[0] * fixed[1] > MAX_PIXELS:
            raise SystemExit(f'error: {self.path} takes {fixed[0]}x{fixed[1]} images, more '
                             f'than onnx_infer.py runs ({MAX_PIXELS} pixels)')
        return tuple(fixed) or None

    def preprocess(self, image, path):
        """``(1 x 3 x H x W input, (h, w) of the resized image in it, (x, y) scale)``."""
        h0, w0 = image.shape[:2]
        for step in self.resize:
            image = _resize_step(image, step, path)
        if self.fixed and (image.shape[0] > self.fixed[0] or image.shape[1] > self.fixed[1]):
            ratio = min(self.fixed[0] / image.shape[0], self.fixed[1] / image.shape[1])
            image = cv2.resize(image, (max(1, int(image.shape[1] * ratio + 0.5)),
                                       max(1, int(image.shape[0] * ratio + 0.5))))
        h, w = image.shape[:2]
        if self.to_rgb:
            image = image[..., ::-1]
        size = self.fixed or tuple(-(-side // self.divisor) * self.divisor for side in (h, w))
        _check_size(size, path, 'padded')
        x = (image.astype(np.float32) - self.mean) / self.std
        x = np.pad(x, ((0, size[0] - h), (0, size[1] - w), (0, 0)))
        return x.transpose(2, 0, 1)[None].copy(), (h, w), (w / w0, h / h0)

    def run(self, x, path):
        """The outputs of the model on ``x`` (from the image ``path``), checked to be what
        tools/export_onnx.py's graphs give for ``self.part``."""
        try:
            outputs = self.session.run(None, {'input': x})
        except Exception as err:  # onnxruntime's errors: an op failed, memory ran out
            raise SystemExit(f'error: onnxruntime cannot run {self.path} on {path}: '
                             f'{printable(str(err).strip())[:500]}') from None
        if self.part == 'detector':  # dets 1 x N x 5, labels 1 x N, masks 1 x N x H x W
            n = outputs[0].shape[1] if outputs[0].ndim == 3 else -1
            shapes = [(1, n, 5), (1, n), (1, n, None, None)][:max(2, len(outputs))]
        else:  # logits: 1 x C x H x W, or 1 x C
            shapes = [(1, None, None, None) if self.part == 'segmentor' else (1, None)]
        if not (len(outputs) == len(shapes) and all(
                o.dtype.kind in 'fiu' and o.ndim == len(s) and all(
                    d == e or e is None and d > 0 for d, e in zip(o.shape, s))
                for o, s in zip(outputs, shapes))
                and (self.part != 'detector' or np.isfinite(outputs[0]).all()
                     and (outputs[1] >= 0).all())
                and (self.part != 'segmentor' or outputs[0].shape[1] <= 512)):  # OpenCV's
            raise SystemExit(f'error: {self.path} does not give what tools/export_onnx.py '
                             f"gives a {self.part} (its outputs' shapes: "
                             f"{', '.join(str(o.shape) for o in outputs)})")
        return outputs

    def color(self, label):
        if self.palette and label < len(self.palette):
            return tuple(self.palette[label])
        rng = np.random.default_rng(label)  # a fixed colour per class without a palette
        return tuple(int(c) for c in rng.integers(0, 256, 3))

    def name(self, label):
        return self.classes[label] if self.classes and label < len(self.classes) else str(label)


def _check_size(size, path, what):
    """Refuse an ``(h, w)`` input of ``path`` beyond :data:`MAX_SIDE` / :data:`MAX_PIXELS`."""
    if min(size) < 1 or max(size) > MAX_SIDE or size[0] * size[1] > MAX_PIXELS:
        raise SystemExit(f'error: {path} would be {what} to {size[1]}x{size[0]} pixels, '
                         f'outside what onnx_infer.py runs (1 to {MAX_SIDE} a side, '
                         f'{MAX_PIXELS} in all)')


def _resize_step(image, step, path):
    """mmcv's Resize (``keep_ratio``: the largest size within ``scale``), mmpretrain's
    ResizeEdge and CenterCrop."""
    h, w = image.shape[:2]
    kind = step['type'].split('.')[-1]
    if kind == 'Resize':
        scale = step['scale']
        scale = (scale, scale) if isinstance(scale, int) else scale
        if step.get('keep_ratio'):
            ratio = min(max(scale) / max(h, w), min(scale) / min(h, w))
            size = (int(w * ratio + 0.5), int(h * ratio + 0.5))
        else:
            size = tuple(scale)
        _check_size(size[::-1], path, 'resized')
        return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    if kind == 'ResizeEdge':
        scale, edge = step['scale'], step.get('edge', 'short')
        if (edge == 'short' and w < h) or (edge == 'long' and w > h) or edge == 'width':
            size = (scale, int(scale * h / w))
        else:
            size = (int(scale * w / h), scale)
        _check_size(size[::-1], path, 'resized')
        return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
    crop = step['crop_size']
    cw, ch = (crop, crop) if isinstance(crop, int) else crop
    y, x = max(0, int(round((h - ch) / 2))), max(0, int(round((w - cw) / 2)))
    return image[y:y + ch, x:x + cw]


def draw_detections(model, image, outputs, resized, scale, score_thr):
    """Boxes, ``name: score`` labels and masks scoring at least ``score_thr``, in the original
    image's pixels; returns how many."""
    dets, labels = outputs[0][0], outputs[1][0]
    keep = dets[:, 4] >= score_thr
    h0, w0 = image.shape[:2]
    picture = image.copy()
    if len(outputs) > 2:
        for probs, label in zip(outputs[2][0][keep], labels[keep]):
            probs = cv2.resize(probs[:resized[0], :resized[1]], (w0, h0))
            mask = probs >= model.mask_thr
            color = np.array(model.color(int(label))[::-1], np.float32)  # palette is RGB
            picture[mask] = (0.2 * picture[mask] + 0.8 * color).astype(np.uint8)
    for (x1, y1, x2, y2, score), label in zip(dets[keep], labels[keep]):
        box = np.array([x1, y1, x2, y2]) / np.array(scale * 2)
        x1, y1, x2, y2 = np.clip(box, 0, [w0, h0, w0, h0]).round().astype(int)
        cv2.rectangle(picture, (x1, y1), (x2, y2), model.color(int(label))[::-1], 2)
        text = f'{model.name(int(label))}: {round(float(score) * 100, 1)}'
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        cv2.rectangle(picture, (x1, y1), (x1 + tw + 2, y1 + th + 4), (0, 0, 0), -1)
        cv2.putText(picture, text, (x1 + 1, y1 + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (200, 200, 200), 1, cv2.LINE_AA)
    return picture, int(keep.sum())


def draw_segmentation(model, image, logits, resized, opacity):
    """The label map (logits resized to the image, argmax) blended over the image."""
    h0, w0 = image.shape[:2]
    logits = logits[0][:, :resized[0], :resized[1]].transpose(1, 2, 0)
    labels = cv2.resize(logits, (w0, h0), interpolation=cv2.INTER_LINEAR)
    labels = labels.argmax(axis=2) if labels.ndim == 3 else (labels > 0).astype(int)
    colors = np.array([model.color(i)[::-1] for i in range(int(labels.max()) + 1)], np.float32)
    picture = image * (1 - opacity) + colors[labels] * opacity
    return picture.astype(np.uint8), labels


def draw_classification(model, image, logits):
    """The top class and its softmax score written on the image."""
    logits = logits[0] - logits[0].max()
    probs = np.exp(logits) / np.exp(logits).sum()
    label = int(probs.argmax())
    picture = image.copy()
    cv2.putText(picture, f'{model.name(label)}: {probs[label]:.2f}', (4, 16),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return picture, label, float(probs[label])


def read_image(path):
    """The BGR image ``path``; its header is checked first (empty, damaged, larger than
    OpenCV decodes: one line naming the file)."""
    try:
        dataset_checks.check_image(path)
    except (ValueError, OSError) as err:
        raise SystemExit(f'error: {err}') from None
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f'error: cannot read the image {path}')
    return image


def main(argv=None):
    args = parse_args(argv)
    model = OnnxModel(args.model)
    images = find_images(args.images)
    outs = output_paths(images, args.out_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    for path, out in zip(images, outs):
        image = read_image(path)
        x, resized, scale = model.preprocess(image, path)
        outputs = model.run(x, path)
        if model.part == 'detector':
            picture, count = draw_detections(model, image, outputs, resized, scale,
                                             args.score_thr)
            message = f'{count} detections scoring >= {args.score_thr}'
        elif model.part == 'segmentor':
            picture, _ = draw_segmentation(model, image, outputs[0], resized, args.opacity)
            message = 'segmentation'
        else:
            picture, label, score = draw_classification(model, image, outputs[0])
            message = f'{printable(model.name(label))} ({score:.2f})'
        ok, data = cv2.imencode(osp.splitext(out)[1], picture)
        if not ok:
            raise ValueError(f'cannot encode the picture for {out}')
        fileio.write_bytes(out, data.tobytes())
        print(f'{path}: {message} -> {out}')


if __name__ == '__main__':
    sys.exit(main())
