"""Convert a MetaFormer checkpoint of any supported layout into this project's format.

    python tools/convert_checkpoint.py SRC DST [--arch NAME] [--use-ema]

SRC is a path, an http(s) URL or ``timm://<hub name>`` holding an official release
(MetaFormer baselines or PoolFormer v1), a timm file, an mmpretrain PoolFormer checkpoint or
one of this project's. DST is an mmengine checkpoint: ``state_dict`` with the ``backbone.*``
tensors and, where SRC has one, the classifier ``head.*``, and ``meta`` with the arch and the
source format. Name it in ``load_from`` (mmdet, mmseg, mmpretrain) or in a backbone's
``init_cfg=dict(type='Pretrained', checkpoint=DST, prefix='backbone.')``.

A whole detector or segmentor (the official PoolFormer Mask R-CNN / RetinaNet / Semantic FPN
files, mmseg 1.x's PoolFormer FPN files; detected by their ``neck.`` / ``*_head.`` tensors)
converts to the whole model: the backbone renamed, every neck and head tensor kept, the
optimizer state dropped. Give DST to ``tools/test.py CONFIG DST`` or ``load_from`` with the
matching config (see the README's model zoo); both also take SRC itself.
"""
import argparse
import os

from common import add_debug_arg, run_tool  # first: it silences the stack's known warnings

from mmmetaformer import __version__
from mmmetaformer.checkpoints import (CheckpointError, check_backbone_fit, convert_to_canonical,
                                      describe_source, is_whole_model, model_kind, read,
                                      source_toolbox, state_dict_of, summarize, validate_tensors)
from mmmetaformer.fileio import save
from mmmetaformer.models import ARCHS, MetaFormer


def convert(src: str, dst: str, arch: str = None, use_ema: bool = False) -> dict:
    """Write the converted checkpoint to ``dst`` and return its ``meta``."""
    state, info = state_dict_of(read(src), src, use_ema)
    whole = is_whole_model(state)
    what = describe_source(state, info) if whole else None
    state = convert_to_canonical(state, info, whole_model=whole)[0]
    backbone = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    if arch is None:
        known = info.meta.get('arch')
        guesses = [known] if known in ARCHS else info.arch_guesses
        named = [g for g in guesses if g in os.path.basename(str(src))]
        if len(named) == 1:  # identical layouts (PoolFormerV2/IdentityFormer): the file name
            guesses = named
        if len(guesses) != 1:
            found = f"could be any of {', '.join(guesses)} (identical tensor layouts)" \
                if guesses else 'matches no published arch'
            raise CheckpointError(f'{info.describe()} {found}; pass --arch NAME '
                                  f'(one of {", ".join(ARCHS)})')
        arch = guesses[0]
    elif arch not in ARCHS:
        raise CheckpointError(f'unknown --arch {arch!r}; choose one of {", ".join(ARCHS)}')
    check_backbone_fit(backbone, MetaFormer(arch=arch, out_norm=None), info)
    if whole:
        return _write_whole_model(state, info, what, arch, dst)

    out = {k: v for k, v in state.items() if k.startswith(('backbone.', 'head.'))}
    validate_tensors(out, f'checkpoint {info.describe()}')
    meta = dict(arch=arch, source=str(src), source_format=info.format,
                converted_by=f'mmmetaformer {__version__} tools/convert_checkpoint.py')
    classifier = out.get('head.fc.fc2.weight', out.get('head.fc.weight'))
    if classifier is not None:
        meta['num_classes'] = classifier.shape[0]
        meta['head'] = 'mlp' if 'head.fc.fc2.weight' in out else 'linear'
    save(dict(meta=meta, state_dict=out), dst)
    extra = summarize(info)
    print(f'wrote {dst}: {arch}, {len(backbone)} backbone tensors, '
          + (f"{meta['head']} head with {meta['num_classes']} classes"
             if classifier is not None else 'no classifier head')
          + f', from {info.describe()}' + (f'; {extra}' if extra else ''))
    return meta


def _write_whole_model(state, info, what, arch, dst) -> dict:
    validate_tensors(state, what)
    meta = dict(arch=arch, model=model_kind(state), source=info.source,
                source_format=info.format, source_toolbox=source_toolbox(info.meta),
                converted_by=f'mmmetaformer {__version__} tools/convert_checkpoint.py')
    classes = class_names(info)
    if classes:
        meta['dataset_meta'] = dict(classes=classes)
    save(dict(meta=meta, state_dict=state), dst)
    backbone = sum(k.startswith('backbone.') for k in state)
    extra = summarize(info)
    print(f'wrote {dst}: {arch}, {backbone} backbone and {len(state) - backbone} neck/head '
          f'tensors, from {what}' + (f'; {extra}' if extra else ''))
    return meta


def class_names(info):
    """The class names a checkpoint's ``meta`` lists (mmdet 2.x ``CLASSES`` or 3.x
    ``dataset_meta['classes']``), or None; anything else is an error naming the file."""
    dataset_meta = info.meta.get('dataset_meta', {})
    if not isinstance(dataset_meta, dict):
        raise CheckpointError(f"{info.source}: its meta['dataset_meta'] is a "
                              f'{type(dataset_meta).__name__}, not a dict')
    classes = info.meta.get('CLASSES') or dataset_meta.get('classes')
    if classes is None:
        return None
    if not (isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f"{info.source}: its meta's class names are a "
                              f'{type(classes).__name__}, not a list of names')
    return tuple(classes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='checkpoint path, http(s) URL or timm://<hub name>')
    parser.add_argument('dst', help='output mmengine checkpoint (.pth)')
    parser.add_argument('--arch', help='e.g. caformer_s18; needed only for PoolFormerV2 / '
                        'IdentityFormer files (one tensor layout) whose name does not say which')
    parser.add_argument('--use-ema', action='store_true',
                        help='take the EMA copy where SRC keeps one besides its weights')
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    convert(args.src, args.dst, args.arch, args.use_ema)


if __name__ == '__main__':
    run_tool(main)
