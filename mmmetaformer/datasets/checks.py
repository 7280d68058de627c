"""Fail early, with a helpful message, when a config's datasets are not on disk."""
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


def check_dataset(cfg):
    """Raise ``FileNotFoundError`` if a COCO, ADE20K or ImageNet/CustomDataset dataset of
    ``cfg``'s train/val/test dataloaders misses its annotation file or image folders."""
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
                continue
            expected = missing.setdefault((_LABELS[name], root or '.'), [])
            expected += [p for p in paths if p not in expected]
    if missing:
        raise FileNotFoundError('\n'.join(
            f"{label} not found at {root}: expected {_join(paths) if paths else 'a directory'} "
            "(see README, 'Prepare datasets')" for (label, root), paths in missing.items()))
