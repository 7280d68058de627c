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
import json
import os
import os.path as osp
import sys

import cv2
import numpy as np
import onnxruntime as ort

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


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


class OnnxModel:
    """An exported model, its metadata and its preprocessing."""

    def __init__(self, path):
        if not osp.isfile(path):
            raise SystemExit(f'error: model file not found: {path}')
        try:
            self.session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
        except Exception as err:  # onnxruntime's own errors (not a model, unknown ops)
            raise SystemExit(f'error: onnxruntime cannot load {path}: {err}') from None
        props = self.session.get_modelmeta().custom_metadata_map
        if props.get('producer') != 'mmmetaformer':
            raise SystemExit(f'error: {path} was not written by tools/export_onnx.py (no '
                             'preprocessing in its metadata)')
        self.part = props['part']
        if self.part not in ('detector', 'segmentor', 'classifier'):
            raise SystemExit(f'error: {path} holds part {self.part!r}; onnx_infer.py runs '
                             'whole detectors, segmentors and classifiers')
        meta = {k: json.loads(v) for k, v in props.items()
                if k in ('mean', 'std', 'bgr_to_rgb', 'to_rgb', 'pad_size_divisor', 'resize',
                         'classes', 'palette', 'mask_thr_binary')}
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
        height, width = self.session.get_inputs()[0].shape[2:]
        self.fixed = (height, width) if isinstance(height, int) else None

    def preprocess(self, image):
        """``(1 x 3 x H x W input, (h, w) of the resized image in it, (x, y) scale)``."""
        h0, w0 = image.shape[:2]
        for step in self.resize:
            image = _resize_step(image, step)
        if self.fixed and (image.shape[0] > self.fixed[0] or image.shape[1] > self.fixed[1]):
            ratio = min(self.fixed[0] / image.shape[0], self.fixed[1] / image.shape[1])
            image = cv2.resize(image, (int(image.shape[1] * ratio + 0.5),
                                       int(image.shape[0] * ratio + 0.5)))
        h, w = image.shape[:2]
        if self.to_rgb:
            image = image[..., ::-1]
        x = (image.astype(np.float32) - self.mean) / self.std
        size = self.fixed or tuple(-(-side // self.divisor) * self.divisor for side in (h, w))
        x = np.pad(x, ((0, size[0] - h), (0, size[1] - w), (0, 0)))
        return x.transpose(2, 0, 1)[None].copy(), (h, w), (w / w0, h / h0)

    def color(self, label):
        if self.palette and label < len(self.palette):
            return tuple(self.palette[label])
        rng = np.random.default_rng(label)  # a fixed colour per class without a palette
        return tuple(int(c) for c in rng.integers(0, 256, 3))

    def name(self, label):
        return self.classes[label] if self.classes and label < len(self.classes) else str(label)


def _resize_step(image, step):
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
        return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    if kind == 'ResizeEdge':
        scale, edge = step['scale'], step.get('edge', 'short')
        if (edge == 'short' and w < h) or (edge == 'long' and w > h) or edge == 'width':
            size = (scale, int(scale * h / w))
        else:
            size = (int(scale * w / h), scale)
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


def main(argv=None):
    args = parse_args(argv)
    model = OnnxModel(args.model)
    images = find_images(args.images)
    os.makedirs(args.out_dir, exist_ok=True)
    for path in images:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f'error: cannot read the image {path}')
        x, resized, scale = model.preprocess(image)
        outputs = model.session.run(None, {'input': x})
        out = osp.join(args.out_dir, osp.splitext(osp.basename(path))[0] + '.png')
        if model.part == 'detector':
            picture, count = draw_detections(model, image, outputs, resized, scale,
                                             args.score_thr)
            message = f'{count} detections scoring >= {args.score_thr}'
        elif model.part == 'segmentor':
            picture, _ = draw_segmentation(model, image, outputs[0], resized, args.opacity)
            message = 'segmentation'
        else:
            picture, label, score = draw_classification(model, image, outputs[0])
            message = f'{model.name(label)} ({score:.2f})'
        cv2.imwrite(out, picture)
        print(f'{path}: {message} -> {out}')


if __name__ == '__main__':
    sys.exit(main())
