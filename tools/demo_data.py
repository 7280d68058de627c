"""Deterministic writers of tiny synthetic datasets in the COCO, ADE20K and ImageNet layouts.

Images show filled shapes in class colours on textured backgrounds. All randomness
comes from seeded ``numpy.random.default_rng`` generators, so a given call always
writes the same files.
"""
import json
import os
import os.path as osp
import shutil
import tempfile

import cv2
import numpy as np

COCO_CLASSES = ('circle', 'square', 'triangle')
# ADE20K label ids (1-based, as stored in the PNGs; 0 = ignored "other") of the
# classes painted in the demo label maps, with their ADE20K names.
ADE20K_LABELS = {1: 'wall', 2: 'building', 3: 'sky', 4: 'floor'}
ADE20K_BACKGROUND = 1  # 'wall'; shapes use 2 (square), 3 (circle), 4 (triangle)
IMAGENET_CLASSES = ('circle', 'square', 'triangle', 'cross')
IMAGENET_WNIDS = ('n00000001', 'n00000002', 'n00000003', 'n00000004')
COMPLETE_MARKER = '.complete'  # holds DATA_VERSION
DATA_VERSION = '5'  # bumped when the writers change: older demo datasets are rewritten

_BGR = {'circle': (40, 40, 220), 'square': (40, 190, 40),
        'triangle': (210, 90, 30), 'cross': (30, 200, 230)}
_ADE20K_SHAPE_LABELS = {'square': 2, 'circle': 3, 'triangle': 4}


def _area(pts):
    """Area of a simple polygon (shoelace formula)."""
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def _polygon(kind, radius, angle):
    """Vertices (N, 2) of a shape centred at the origin, with the area of a circle of
    ``radius`` (so that every class comes in the same range of sizes), turned by ``angle`` from
    upright (square: sides level; triangle: apex up)."""
    if kind == 'circle':
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return radius * np.stack([np.cos(t), np.sin(t)], 1)
    if kind == 'cross':
        a, w = 1, 0.35
        pts = np.array([(w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a),
                        (-w, -a), (-w, -w), (-a, -w), (-a, w), (-w, w), (-w, a)])
    else:
        n, first = {'square': (4, np.pi / 4), 'triangle': (3, -np.pi / 2)}[kind]
        t = first + np.arange(n) * 2 * np.pi / n
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    pts = pts * radius * np.sqrt(np.pi / _area(pts))
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _background(rng, w, h):
    """A muted grey image with random stripes and pixel noise (uint8 BGR)."""
    base = rng.uniform(70, 190) + rng.uniform(-15, 15, 3)
    yy, xx = np.mgrid[:h, :w]
    theta, period = rng.uniform(0, np.pi), rng.uniform(8, 40)
    stripes = 25 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    img = base + stripes[..., None] + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _fill(img, poly, value):
    """Rasterise ``poly`` (COCO pixel-corner coordinates) into ``img`` in place."""
    pts = np.round((poly - 0.5) * 16).astype(np.int32)
    cv2.fillPoly(img, [pts], value, lineType=cv2.LINE_8, shift=4)


def _scene(rng, kinds, image_size, max_objects, scale=(0.15, 0.4), tilt=None):
    """Image with 1..max_objects non-overlapping shapes, turned by up to ``tilt`` radians
    either way (``None``: any angle); returns (img, [(kind, poly)])."""
    w, h = image_size
    img, objects, boxes = _background(rng, w, h), [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        kind = kinds[int(rng.integers(len(kinds)))]  # drawn once: large shapes are not skipped
        for _attempt in range(20):
            angle = rng.uniform(0, 2 * np.pi) if tilt is None else rng.uniform(-tilt, tilt)
            poly = _polygon(kind, rng.uniform(*scale) * min(w, h) / 2, angle)
            lo, hi = poly.min(0), poly.max(0)
            centre = rng.uniform(-lo + 1, np.array([w, h]) - hi - 1)
            box = np.concatenate([lo + centre - 3, hi + centre + 3])
            if all(box[0] > b[2] or box[2] < b[0] or box[1] > b[3] or box[3] < b[1] for b in boxes):
                break
        else:
            continue
        poly = np.round(poly + centre, 2)
        colour = np.clip(np.array(_BGR[kind]) + rng.integers(-25, 26, 3), 0, 255)
        _fill(img, poly, tuple(int(c) for c in colour))
        objects.append((kind, poly))
        boxes.append(box)
    return img, objects


def _split_rngs(seed, n):
    """One independent generator per split, derived from ``seed``."""
    return [np.random.default_rng([seed, i]) for i in range(n)]


def _imwrite(path, img):
    os.makedirs(osp.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, img):
        raise OSError(f'could not write {path}')


def write_coco_demo(root, num_train=128, num_val=32, image_size=(256, 192), max_objects=4,
                    tilt=0.0, seed=0):
    """Write a COCO instance dataset (``annotations/instances_{train,val}2017.json``,
    ``{train,val}2017/*.png``) of ``COCO_CLASSES`` shapes with polygon masks, upright or
    turned by up to ``tilt`` radians (``None``: any angle). Upright shapes let the demo's
    from-scratch Mask R-CNN place every class's box in its short schedule."""
    categories = [dict(id=i + 1, name=n, supercategory='shape') for i, n in enumerate(COCO_CLASSES)]
    splits = (('train2017', num_train), ('val2017', num_val))
    for (split, num), rng in zip(splits, _split_rngs(seed, len(splits))):
        images, annotations = [], []
        for img_id in range(1, num + 1):
            img, objects = _scene(rng, COCO_CLASSES, image_size, max_objects, tilt=tilt)
            file_name = f'{img_id:012d}.png'  # lossless: JPEG would blur the colours of corners
            _imwrite(osp.join(root, split, file_name), img)
            images.append(dict(id=img_id, file_name=file_name, width=image_size[0], height=image_size[1]))
            for kind, poly in objects:
                x, y = poly[:, 0], poly[:, 1]
                area = _area(poly)
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=img_id, category_id=COCO_CLASSES.index(kind) + 1,
                    segmentation=[poly.ravel().tolist()], area=round(float(area), 2),
                    bbox=[round(float(v), 2) for v in (x.min(), y.min(), np.ptp(x), np.ptp(y))],
                    iscrowd=0))
        os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
        with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(dict(info=dict(description='mmmetaformer demo shapes'), images=images,
                           annotations=annotations, categories=categories), f)


def write_ade20k_demo(root, num_train=64, num_val=16, image_size=(320, 256), max_objects=4, seed=0):
    """Write an ADE20K-layout dataset (``images/{training,validation}/*.jpg``,
    ``annotations/{training,validation}/*.png``). Label maps hold ``ADE20K_LABELS`` ids:
    background 1, shapes 2-4, and a 4-pixel frame of 0 (ignored with reduce_zero_label)."""
    splits = (('training', 'train', num_train), ('validation', 'val', num_val))
    for (split, prefix, num), rng in zip(splits, _split_rngs(seed, len(splits))):
        for i in range(1, num + 1):
            img, objects = _scene(rng, tuple(_ADE20K_SHAPE_LABELS), image_size, max_objects)
            label = np.full(img.shape[:2], ADE20K_BACKGROUND, np.uint8)
            for kind, poly in objects:
                _fill(label, poly, _ADE20K_SHAPE_LABELS[kind])
            label[:4] = label[-4:] = label[:, :4] = label[:, -4:] = 0
            name = f'ADE_{prefix}_{i:08d}'
            _imwrite(osp.join(root, 'images', split, name + '.jpg'), img)
            _imwrite(osp.join(root, 'annotations', split, name + '.png'), label)


def write_imagenet_demo(root, num_train_per_class=16, num_val_per_class=4, image_size=(64, 64), seed=0):
    """Write an ImageNet-layout dataset: ``{train,val}/<wnid>/*.JPEG`` class folders,
    ``meta/{train,val}.txt`` (``<wnid>/<file> <label>``) and ``meta/classes.txt``,
    one ``IMAGENET_CLASSES`` shape per image."""
    splits = (('train', num_train_per_class), ('val', num_val_per_class))
    for (split, num), rng in zip(splits, _split_rngs(seed, len(splits))):
        lines = []
        for label, (wnid, kind) in enumerate(zip(IMAGENET_WNIDS, IMAGENET_CLASSES)):
            for i in range(1, num + 1):
                img, _ = _scene(rng, (kind,), image_size, 1, scale=(0.35, 0.6))
                file_name = f'{wnid}/{wnid}_{i:05d}.JPEG'
                _imwrite(osp.join(root, split, file_name), img)
                lines.append(f'{file_name} {label}\n')
        os.makedirs(osp.join(root, 'meta'), exist_ok=True)
        with open(osp.join(root, 'meta', f'{split}.txt'), 'w') as f:
            f.writelines(lines)
    with open(osp.join(root, 'meta', 'classes.txt'), 'w') as f:
        f.writelines(c + '\n' for c in IMAGENET_CLASSES)


def _write_once(path, writer):
    """Run ``writer(tmp_dir)`` and rename the result to ``path`` unless ``path`` is complete
    (an older version's dataset is replaced)."""
    marker = osp.join(path, COMPLETE_MARKER)
    if osp.exists(marker):
        with open(marker) as f:
            if f.read() == DATA_VERSION:
                return
        shutil.rmtree(path)
    if osp.exists(path):
        raise FileExistsError(f'{path} exists but is not a complete demo dataset '
                              f'(no {COMPLETE_MARKER}); remove it and run again')
    parent = osp.dirname(osp.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{osp.basename(path)}.tmp-', dir=parent)
    try:
        writer(tmp)
        with open(osp.join(tmp, COMPLETE_MARKER), 'w') as f:
            f.write(DATA_VERSION)
        os.rename(tmp, path)
    except OSError:
        if not osp.exists(osp.join(path, COMPLETE_MARKER)):  # not written concurrently
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_all(root):
    """Write ``root/coco``, ``root/ade20k`` and ``root/imagenet`` with default sizes,
    skipping datasets already complete; returns the dataset directories by name."""
    paths = {name: osp.join(root, name) for name in ('coco', 'ade20k', 'imagenet')}
    _write_once(paths['coco'], write_coco_demo)
    _write_once(paths['ade20k'], write_ade20k_demo)
    _write_once(paths['imagenet'], write_imagenet_demo)
    return paths
