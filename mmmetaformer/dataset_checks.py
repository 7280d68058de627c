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


def check_coco_annotations(path):
    """Raise ``ValueError`` naming ``path`` if it is not a COCO annotation file: empty,
    truncated, malformed or without ``images``/``categories`` (parsed in full up to
    :data:`JSON_PARSE_LIMIT`, else only its two ends are checked)."""
    size = osp.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(64).lstrip()
        f.seek(max(size - 64, 0))
        tail = f.read().rstrip()
        if head[:1] == b'{' and tail[-1:] == b'}' and size <= JSON_PARSE_LIMIT:
            f.seek(0)
            try:
                keys = json.load(f).keys()
            except ValueError as err:
                raise ValueError(f'{path} is not valid JSON ({err}): download or export the '
                                 'annotation file again') from None
            missing = [k for k in ('images', 'categories') if k not in keys]
            if missing:
                raise ValueError(f"{path} is not a COCO annotation file: it has no {missing}")
    if head[:1] != b'{' or tail[-1:] != b'}':
        state = 'empty' if not size else 'not a JSON object (truncated?)'
        raise ValueError(f'{path} is {state}: download or export the annotation file again')


def check_dataset(cfg):
    """Raise ``FileNotFoundError`` if a COCO, ADE20K or ImageNet/CustomDataset dataset of
    ``cfg``'s train/val/test dataloaders misses its annotation file or image folders, and
    ``ValueError`` if a COCO annotation file is not a JSON object."""
    missing = {}  # (label, data_root) -> expected paths, in config order
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
                ann_file = dataset.get('ann_file') or ''
                if '://' not in root and name == 'CocoDataset' and ann_file.endswith('.json'):
                    check_coco_annotations(osp.join(root, ann_file))
                continue
            expected = missing.setdefault((_LABELS[name], root or '.'), [])
            expected += [p for p in paths if p not in expected]
    if missing:
        raise FileNotFoundError('\n'.join(
            f"{label} not found at {root}: expected {_join(paths) if paths else 'a directory'} "
            "(see README, 'Prepare datasets')" for (label, root), paths in missing.items()))
