"""Fail early, with a helpful message, when a config's datasets are not on disk or their
annotation files are damaged."""
import json
import os.path as osp

_LABELS = {'CocoDataset': 'COCO', 'ADE20KDataset': 'ADE20K', 'ImageNet': 'ImageNet',
           'CustomDataset': 'CustomDataset'}
_DATALOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


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
    size = osp.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(64).lstrip()
        f.seek(max(size - 64, 0))
        tail = f.read().rstrip()
        if head[:1] != b'{' or tail[-1:] != b'}':
            state = 'empty' if not size else 'not a JSON object (truncated?)'
            raise ValueError(f'{path} is {state}: download or export the annotation file again')
        if size > JSON_PARSE_LIMIT:
            return []
        f.seek(0)
        try:
            coco = json.load(f)
        except ValueError as err:
            raise ValueError(f'{path} is not valid JSON ({err}): download or export the '
                             'annotation file again') from None
    missing = [k for k in ('images', 'categories') if k not in coco]
    if missing:
        raise ValueError(f"{path} is not a COCO annotation file: it has no {missing}")
    images, categories, annotations = (_records(path, coco, key) for key in
                                       ('images', 'categories', 'annotations'))
    names = [c.get('name') for c in categories]
    unknown = [c for c in classes or () if c not in names]
    if unknown:
        raise ValueError(f"{path}: the config's classes {_examples(unknown)} are not category "
                         f"names of the file, which has {_examples(names, 8)}: set the "
                         "dataset's metainfo=dict(classes=...) to names of the file")
    image_ids, category_ids = ({_id(r.get('id')) for r in rs} for rs in (images, categories))
    bad = {what: [] for what in _BAD_ANNOTATIONS}
    for ann in annotations:
        box = ann.get('bbox')
        if not (isinstance(box, list) and len(box) == 4 and all(
                isinstance(v, (int, float)) for v in box) and box[2] > 0 and box[3] > 0):
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
    'box': 'annotations without a box of positive width and height (mmdet trains without them, '
           'COCO evaluation counts them as missed)',
    'category': "annotations of category ids missing from 'categories' (left out of training "
                'and evaluation)',
    'image': "annotations of image ids missing from 'images' (left out of training and "
             'evaluation)',
    'polygon': 'annotations with a polygon of fewer than 3 points (mmdet trains without them, '
               "pycocotools' segm evaluation fails on them)",
}


def _records(path, coco, key):
    """``coco[key]`` (absent: empty), checked to be a list of objects."""
    records = coco.get(key, [])
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path} is not a COCO annotation file: '{key}' is not a list of "
                         'objects')
    return records


def _id(value):
    """``value`` as a set member (JSON lists and objects as their ``repr``)."""
    return value if isinstance(value, (int, float, str, type(None))) else repr(value)


def _examples(items, limit=3):
    """``'N (first, second, third, ...)'``."""
    shown = '; '.join(str(item)[:100] for item in items[:limit])
    return f"{len(items)} ({shown}{'; ...' if len(items) > limit else ''})"


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
    ``ValueError`` if a COCO annotation file is damaged or lacks the config's classes; return
    the warnings of :func:`check_coco_annotations`."""
    missing = {}  # (label, data_root) -> expected paths, in config order
    reports, checked = [], set()
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
            if '://' in root or all(osp.exists(osp.join(root, p)) for p in paths or ['']):
                path = osp.join(root, dataset.get('ann_file') or '')
                if '://' not in root and name == 'CocoDataset' and path.endswith('.json') \
                        and path not in checked:
                    checked.add(path)
                    reports += check_coco_annotations(path, _coco_classes(dataset))
                continue
            expected = missing.setdefault((_LABELS[name], root or '.'), [])
            expected += [p for p in paths if p not in expected]
    if missing:
        raise FileNotFoundError('\n'.join(
            f"{label} not found at {root}: expected {_join(paths) if paths else 'a directory'} "
            "(see README, 'Prepare datasets')" for (label, root), paths in missing.items()))
    return reports
