"""Fail early, with a helpful message, when a config's datasets are not on disk, their
annotation files are damaged or their images empty; read an image's header before decoding it.

Imports nothing beyond the standard library at module level: tools/onnx_infer.py (numpy,
OpenCV and onnxruntime only) loads this file for :func:`check_image`."""
import json
import math
import os
import os.path as osp
import stat
import struct

_LABELS = {'CocoDataset': 'COCO', 'ADE20KDataset': 'ADE20K', 'ImageNet': 'ImageNet',
           'CustomDataset': 'CustomDataset'}
_DATALOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
PREPARE_DATASETS = 'docs/user_guides/train_test.md#prepare-datasets'
#: The extensions of the files mmcv and mmpretrain take for images.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')



class DatasetError(ValueError):
    """A dataset file that is damaged or cannot be read; the message names it."""


def _leaf_datasets(dataset):
    """Yield the dataset dicts inside wrappers (``dataset`` / ``datasets`` keys)."""
    if dataset.get('dataset') is not None:
        yield from _leaf_datasets(dataset['dataset'])
    elif dataset.get('datasets') is not None:
        for d in dataset['datasets']:
            yield from _leaf_datasets(d)
    else:
        yield dataset


def _type_name(dataset):
    t = dataset.get('type', '')
    return t.rsplit('.', 1)[-1] if isinstance(t, str) else getattr(t, '__name__', '')


def _expected_paths(name, dataset):
    """Paths (as written in the config, relative to ``data_root``) the dataset reads."""
    prefix = dataset.get('data_prefix') or ''
    if isinstance(prefix, dict):
        paths = [v for v in prefix.values() if v]
    else:
        paths = [prefix] if prefix else []
    if name == 'ImageNet' and not paths and dataset.get('split'):
        paths = [dataset['split'] + '/']
    ann_file = dataset.get('ann_file')
    return ([ann_file] if ann_file else []) + paths


def _join(items):
    return items[0] if len(items) == 1 else ', '.join(items[:-1]) + ' and ' + items[-1]


#: COCO annotation files up to this size are parsed in full, larger ones checked at both ends.
JSON_PARSE_LIMIT = 64 * 2**20


def check_coco_annotations(path, classes=None):
    """Raise ``ValueError`` naming ``path`` if it is not a COCO annotation file (empty,
    truncated, malformed, without ``images``/``categories``) or lacks one of ``classes`` in
    its category names (evaluation would fail with an IndexError); return a report per kind of
    annotation that silently changes training or evaluation (:data:`_BAD_ANNOTATIONS`): count
    and first examples. Files up to :data:`JSON_PARSE_LIMIT` are parsed in full, larger ones
    only checked at both ends."""
    coco = _read_coco(path)
    return [] if coco is None else _coco_reports(path, coco, classes)


def _read_coco(path):
    """The JSON object of ``path`` (None if larger than :data:`JSON_PARSE_LIMIT`), checked
    to hold lists of objects."""
    size = osp.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(64).lstrip()
        f.seek(max(size - 64, 0))
        tail = f.read().rstrip()
        if head[:1] != b'{' or tail[-1:] != b'}':
            state = 'empty' if not size else 'not a JSON object (truncated?)'
            raise DatasetError(f'{path} is {state}: download or export the annotation file again')
        if size > JSON_PARSE_LIMIT:
            return None
        f.seek(0)
        try:
            coco = json.load(f)
        except (ValueError, RecursionError) as err:
            problem = err if isinstance(err, ValueError) else 'nested too deeply'
            raise DatasetError(f'{path} is not valid JSON ({problem}): download or export the '
                             'annotation file again') from None
    missing = [k for k in ('images', 'categories') if k not in coco]
    if missing:
        raise DatasetError(f"{path} is not a COCO annotation file: it has no {missing}")
    for key in ('images', 'categories', 'annotations'):
        records = coco.setdefault(key, [])
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise DatasetError(f"{path} is not a COCO annotation file: '{key}' is not a list of "
                             'objects')
    return coco


def _coco_reports(path, coco, classes):
    """:func:`check_coco_annotations` of the object ``coco`` read from ``path``."""
    images, categories, annotations = coco['images'], coco['categories'], coco['annotations']
    names = [c.get('name') for c in categories]
    unknown = [c for c in classes or () if c not in names]
    if unknown:
        raise DatasetError(f"{path}: the config's classes {_examples(unknown)} are not category "
                         f"names of the file, which has {_examples(names, 8)}: set the "
                         "dataset's metainfo=dict(classes=...) to names of the file")
    image_ids, category_ids = ({_id(r.get('id')) for r in rs} for rs in (images, categories))
    bad = {what: [] for what in _BAD_ANNOTATIONS}
    for ann in annotations:
        box = ann.get('bbox')
        if not (isinstance(box, list) and len(box) == 4 and all(
                type(v) in (int, float) and math.isfinite(v) for v in box)
                and box[2] > 0 and box[3] > 0):
            bad['box'].append(f"id {ann.get('id')}: bbox {box}")
        if _id(ann.get('category_id')) not in category_ids:
            bad['category'].append(f"id {ann.get('id')}: category_id {ann.get('category_id')}")
        if _id(ann.get('image_id')) not in image_ids:
            bad['image'].append(f"id {ann.get('id')}: image_id {ann.get('image_id')}")
        polygons = ann.get('segmentation')
        if isinstance(polygons, list) and any(len(p) < 6 for p in polygons if isinstance(p, list)):
            bad['polygon'].append(f"id {ann.get('id')}: segmentation {polygons}")
    return [f'{path}: {_examples(items)} {_BAD_ANNOTATIONS[what]}'
            for what, items in bad.items() if items]


_BAD_ANNOTATIONS = {  # what they are, and what becomes of them
    'box': 'annotations without a finite box of positive width and height (mmdet trains '
           'without them, COCO evaluation counts them as missed)',
    'category': "annotations of category ids missing from 'categories' (left out of training "
                'and evaluation)',
    'image': "annotations of image ids missing from 'images' (left out of training and "
             'evaluation)',
    'polygon': 'annotations with a polygon of fewer than 3 points (mmdet trains without them, '
               "pycocotools' segm evaluation fails on them)",
}


def _id(value):
    """``value`` as a set member (JSON lists and objects as their ``repr``)."""
    return value if isinstance(value, (int, float, str, type(None))) else repr(value)


def _examples(items, limit=3, cut=100):
    """``'N (first, second, third, ...)'``, each cut at ``cut`` characters, control
    characters escaped."""
    shown = '; '.join(printable(str(item)[:cut]) for item in items[:limit])
    return f"{len(items)} ({shown}{'; ...' if len(items) > limit else ''})"


def printable(text: str) -> str:
    """``text`` with its control characters (which could move a terminal's cursor or forge a
    line of output) escaped."""
    return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _coco_classes(dataset):
    """The classes a COCO dataset of the config trains on: its ``metainfo``, else mmdet's."""
    classes = (dataset.get('metainfo') or {}).get('classes')
    if classes is None:
        from mmdet.datasets import CocoDataset
        classes = CocoDataset.METAINFO['classes']
    return classes


def check_dataset(cfg):
    """Raise ``FileNotFoundError`` if a COCO, ADE20K or ImageNet/CustomDataset dataset of
    ``cfg``'s train/val/test dataloaders misses its annotation file or image folders, and
    ``ValueError`` if a COCO annotation file is damaged or lacks the config's classes, or if
    image files are empty (0 bytes: the images a COCO annotation file lists, the files of the
    other datasets' image folders; found by their size alone); return the warnings of
    :func:`check_coco_annotations`."""
    missing = {}  # (label, data_root) -> expected paths, in config order
    reports, empty, checked = [], [], set()
    for key in _DATALOADERS:
        loader = cfg.get(key)
        if not loader or loader.get('dataset') is None:
            continue
        for dataset in _leaf_datasets(loader['dataset']):
            name = _type_name(dataset)
            if name not in _LABELS:
                continue
            root = dataset.get('data_root') or ''
            paths = _expected_paths(name, dataset)
            if '://' in root:
                continue
            if not all(osp.exists(osp.join(root, p)) for p in paths or ['']):
                expected = missing.setdefault((_LABELS[name], root or '.'), [])
                expected += [p for p in paths if p not in expected]
                continue
            if (name, root, tuple(paths)) in checked:  # also in another dataloader
                continue
            checked.add((name, root, tuple(paths)))
            ann_file, coco = osp.join(root, dataset.get('ann_file') or ''), None
            if name == 'CocoDataset' and ann_file.endswith('.json'):
                coco = _read_coco(ann_file)
                if coco is not None:
                    reports += _coco_reports(ann_file, coco, _coco_classes(dataset))
            empty += _empty_images(dataset, root, paths, coco)
    if missing:
        raise FileNotFoundError('\n'.join(
            f"{label} not found at {root}: expected {_join(paths) if paths else 'a directory'} "
            f'(see {PREPARE_DATASETS})' for (label, root), paths in missing.items()))
    if empty:
        raise DatasetError(f'empty (0-byte) image files: {_examples(sorted(set(empty)), cut=None)}'
                         '; mmcv cannot decode them: download or extract them again, or leave '
                         'them out of the dataset')
    return reports


def _empty_images(dataset, root, paths, coco):
    """The 0-byte images of ``dataset``: those its COCO annotation file lists, else the image
    files of its folders (``paths`` but its annotation file)."""
    if coco is not None:
        prefix = dataset.get('data_prefix') or {}
        folder = osp.join(root, prefix.get('img', '') if isinstance(prefix, dict) else prefix)
        files = dict.fromkeys(osp.join(folder, r['file_name']) for r in coco['images']
                              if isinstance(r.get('file_name'), str))
        return [path for path in files if _is_empty(path)]
    folders = [p for p in paths if p != dataset.get('ann_file')] or ['']
    return [path for folder in folders if osp.isdir(osp.join(root, folder))
            for path in _empty_files(osp.join(root, folder))]


def _is_empty(path) -> bool:
    try:
        info = os.stat(path)
    except OSError:  # missing: the dataset's loader names it
        return False
    return stat.S_ISREG(info.st_mode) and not info.st_size


def _empty_files(folder):
    """The 0-byte image files under ``folder``, by ``os.scandir`` (each folder once)."""
    info = os.stat(folder)
    empty, stack, seen = [], [folder], {(info.st_dev, info.st_ino)}
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                try:
                    if entry.is_dir():
                        info = entry.stat()
                        if (info.st_dev, info.st_ino) not in seen:
                            seen.add((info.st_dev, info.st_ino))
                            stack.append(entry.path)
                    elif (entry.name.lower().endswith(IMAGE_EXTENSIONS)
                          and not entry.stat().st_size):
                        empty.append(entry.path)
                except OSError:  # a broken link: the dataset's loader names it
                    continue
    return empty


# --- an image's header ------------------------------------------------------------------------

def _opencv_limit(name, default):
    """OpenCV's limit on decoded images (its environment variable, else its default)."""
    try:
        return int(os.environ.get(f'OPENCV_IO_MAX_IMAGE_{name}', default))
    except ValueError:
        return default


def check_image(path):
    """``(format, width, height)`` of the PNG, JPEG or BMP image ``path`` from its header alone;
    ``ValueError`` naming ``path`` if it is empty, its header is none of these or damaged, or
    it is larger than OpenCV decodes (``OPENCV_IO_MAX_IMAGE_PIXELS``, ``_WIDTH``,
    ``_HEIGHT``)."""
    with open(path, 'rb') as f:
        head = f.read(32)
        if not head:
            raise DatasetError(f'cannot read image {path}: the file is empty (0 bytes)')
        if head.startswith(b'\x89PNG\r\n\x1a\n'):  # the first chunk: IHDR, width, height
            fmt = 'PNG'
            size = struct.unpack('>II', head[16:24]) if head[12:16] == b'IHDR' else None
        elif head.startswith(b'BM') and len(head) >= 26:
            fmt, dib = 'BMP', struct.unpack('<I', head[14:18])[0]
            size = struct.unpack('<HH' if dib == 12 else '<ii', head[18:22 if dib == 12 else 26])
            size = size[0], abs(size[1])  # a negative height: rows top-down
        elif head.startswith(b'\xff\xd8'):
            fmt, size = 'JPEG', _jpeg_size(f)
        else:
            raise DatasetError(f'cannot read image {path}: it is not a PNG, JPEG or BMP image')
    if size is None or len(size) != 2 or min(size) <= 0:
        raise DatasetError(f'cannot read image {path}: its {fmt} header is damaged (truncated?)')
    width, height = size
    pixels, widths, heights = (_opencv_limit(name, default) for name, default in (
        ('PIXELS', 1 << 30), ('WIDTH', 1 << 20), ('HEIGHT', 1 << 20)))
    if width * height > pixels or width > widths or height > heights:
        raise DatasetError(
            f'cannot read image {path}: it is a {width}x{height} {fmt} image, larger than '
            f'OpenCV decodes ({pixels} pixels, {widths}x{heights} at most; the environment '
            'variables OPENCV_IO_MAX_IMAGE_PIXELS, _WIDTH and _HEIGHT set these limits)')
    return fmt, width, height


def _jpeg_size(f):
    """``(width, height)`` from a JPEG's frame header (its first SOFn segment), or None."""
    f.seek(2)
    while True:
        marker = f.read(2)
        while marker[:1] == b'\xff' and marker[1:] == b'\xff':  # fill bytes
            marker = marker[1:] + f.read(1)
        if len(marker) < 2 or marker[0] != 0xff or marker[1] in (0xd9, 0xda):
            return None  # the end, or the image data, before a frame header
        if 0xd0 <= marker[1] <= 0xd7 or marker[1] == 0x01:  # markers without a length
            continue
        length = f.read(2)
        if len(length) < 2 or struct.unpack('>H', length)[0] < 2:
            return None
        if marker[1] in (0xc0, 0xc1, 0xc2, 0xc3, 0xc5, 0xc6, 0xc7, 0xc9, 0xca, 0xcb, 0xcd,
                         0xce, 0xcf):
            frame = f.read(5)
            return struct.unpack('>HH', frame[1:])[::-1] if len(frame) == 5 else None
        f.seek(struct.unpack('>H', length)[0] - 2, os.SEEK_CUR)
