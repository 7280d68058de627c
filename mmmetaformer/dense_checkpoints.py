"""Whole detector and segmentor checkpoints: the published PoolFormer dense-prediction files.

The official PoolFormer Mask R-CNN / RetinaNet files (sail-sg/poolformer ``detection/``,
mmdet 2.19), Semantic FPN files (``segmentation/``, mmseg 0.19) and mmseg 1.x's own PoolFormer
FPN files (backbone ``mmpretrain.PoolFormer``) hold the backbone in the PoolFormer v1 layout
(``backbone.patch_embed.*``, ``backbone.network.*``, output norms ``backbone.norm{0,2,4,6}``;
RetinaNet files have no ``norm0``) and the rest under ``neck.``, ``rpn_head.``, ``roi_head.``,
``bbox_head.`` or ``decode_head.``.

The backbone is converted by :func:`~mmmetaformer.checkpoints.convert_to_canonical`; every
other tensor is carried over under its own name: mmdet 2.19 -> 3.3 and mmseg 0.19 -> 1.2
renamed none of the parameters of the modules these models use (FPN, RPNHead ``rpn_conv`` /
``rpn_cls`` / ``rpn_reg``, Shared2FCBBoxHead, FCNMaskHead, RetinaHead, FPNHead with
``conv_seg``), which ``tests/test_dense_checkpoints.py`` checks by loading strictly into
mmdet 3 / mmseg 1 models. Optimizer state and EMA copies are dropped.

:func:`apply` makes mmengine's checkpoint loading (``load_from``, ``tools/test.py``,
``init_detector`` / ``init_model``) accept such a file directly, for a model whose backbone
is this project's: converted in memory, then loaded strictly, or a :class:`CheckpointError`
listing what does not fit.
"""
import functools
import re
from typing import Mapping, Optional, Tuple

import torch
from mmengine.logging import print_log

from .checkpoints import (CheckpointError, CheckpointInfo, arch_name, check_fit,
                          convert_to_canonical, load_checkpoint_file, validate_tensors)

#: top-level modules of a detector / segmentor besides its backbone
HEADS = ('neck.', 'rpn_head.', 'roi_head.', 'bbox_head.', 'decode_head.', 'auxiliary_head.')
_TOOLBOX_VERSIONS = ('mmdet_version', 'mmseg_version', 'mmengine_version')
_MARK = '_mmmetaformer_dense'


def is_whole_model(state: Mapping) -> bool:
    """Whether ``state`` is a detector's or segmentor's: a backbone plus a neck or heads."""
    return any(k.startswith('backbone.') for k in state) and \
        any(k.startswith(HEADS) for k in state)


def model_kind(state: Mapping) -> str:
    """What kind of model the keys of ``state`` belong to, e.g. ``'Mask R-CNN'``."""
    if any(k.startswith('roi_head.mask_head.') for k in state):
        return 'Mask R-CNN'
    if any(k.startswith('roi_head.') for k in state):
        return 'two-stage detector'
    if any(k.startswith('bbox_head.retina_') for k in state):
        return 'RetinaNet'
    if any(k.startswith('bbox_head.') for k in state):
        return 'one-stage detector'
    if any(k.startswith('decode_head.scale_heads.') for k in state):
        return 'Semantic FPN'
    return 'segmentor' if any(k.startswith('decode_head.') for k in state) else 'model'


def source_toolbox(meta: Mapping) -> str:
    """The toolbox version a checkpoint's ``meta`` names, e.g. ``'mmdet 2.19.0'``."""
    return ', '.join(f"{key.split('_')[0]} {meta[key]}" for key in _TOOLBOX_VERSIONS
                     if isinstance(meta.get(key), str))


def convert_whole_model(state: Mapping, info: CheckpointInfo) -> dict:
    """``state`` of a whole model with its backbone in the canonical layout, the neck and
    heads unchanged."""
    backbone, _ = convert_to_canonical(
        {k: v for k, v in state.items() if k.startswith('backbone.')}, info)
    foreign = [info.source_keys[k] for k in backbone if not k.startswith('backbone.')]
    if foreign:  # a classifier's final norm: a dense-prediction backbone has none
        raise CheckpointError(f'{info.source}: {", ".join(foreign)} of a classifier in a '
                              'detector or segmentor checkpoint')
    return {**backbone, **{k: v for k, v in state.items() if not k.startswith('backbone.')}}


def describe_source(state: Mapping, info: CheckpointInfo) -> str:
    """E.g. ``'x.pth (Mask R-CNN, mmdet 2.19.0)'``."""
    toolbox = source_toolbox(info.meta)
    return f"{info.source} ({model_kind(state)}{', ' + toolbox if toolbox else ''})"


def whole_model_meta(state: Mapping, info: CheckpointInfo, arch: Optional[str]) -> dict:
    """``meta`` of a converted file: the arch, the source and its classes."""
    meta = dict(arch=arch, model=model_kind(state), source=info.source,
                source_format=info.format, source_toolbox=source_toolbox(info.meta))
    classes = info.meta.get('CLASSES') or info.meta.get('dataset_meta', {}).get('classes')
    if classes:
        meta['dataset_meta'] = dict(classes=tuple(classes))
    return meta


def _show(keys, limit=5):
    more = f' and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def _modules(keys):
    return sorted({'.'.join(k.split('.')[:2 if k.startswith('roi_head.') else 1])
                   for k in keys})


def check_model_fit(state: Mapping, model, info: CheckpointInfo, what: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the tensors (names and
    shapes) of ``model``; the message names the model kinds and what differs."""
    expected = model.state_dict()
    backbone = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    settings = model.backbone.arch_settings
    check_fit(backbone, {k[len('backbone.'):]: v.shape for k, v in expected.items()
                         if k.startswith('backbone.')},
              info, arch_name(settings) or 'a custom arch', settings)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if not (missing or unexpected or wrong):
        return
    lines = [f'{what} does not fit the {model_kind(expected)} ({type(model).__name__}) of '
             f'the config, which has {len(expected)} tensors:']
    if missing:
        lines.append(f'  missing {len(missing)} tensors (in {", ".join(_modules(missing))}): '
                     + _show(missing))
    if unexpected:
        lines.append(f'  unexpected {len(unexpected)} tensors '
                     f'(in {", ".join(_modules(unexpected))}): ' + _show(unexpected))
    for k in wrong[:5]:
        lines.append(f'  wrong shape: {k}: checkpoint {tuple(state[k].shape)}, '
                     f'model {tuple(expected[k].shape)}')
    if len(wrong) > 5:
        lines.append(f'  and {len(wrong) - 5} more tensors of the wrong shape')
    if any(re.search(r'(fc_cls|conv_logits|retina_cls|conv_seg)\.weight$', k) for k in wrong):
        lines.append('  (the classifier shapes differ: the file was trained for another '
                     'number of classes)')
    lines.append('Nothing was loaded: use the config of the model the file was trained with, '
                 "or to start from its backbone alone, name the file in the config's "
                 "model.backbone.init_cfg=dict(type='Pretrained', checkpoint=...).")
    raise CheckpointError('\n'.join(lines))


def fit_checkpoint_to_model(model, checkpoint: Mapping,
                            source: str = '<checkpoint>') -> Optional[dict]:
    """``checkpoint`` made loadable into ``model``, or None when it is none of ours.

    Ours: a whole-model file whose backbone is in the PoolFormer v1 layout (converted
    here), or a file written by the whole-model conversion, for a detector or segmentor
    ``model`` whose ``backbone`` is a :class:`~mmmetaformer.models.MetaFormer`. The result
    holds exactly the model's tensors (else :class:`CheckpointError`) and the source's
    ``meta``.
    """
    from .models import MetaFormer
    if not (isinstance(getattr(model, 'backbone', None), MetaFormer)
            and any(hasattr(model, head.rstrip('.')) for head in HEADS)
            and isinstance(checkpoint, Mapping)):
        return None
    raw = checkpoint.get('state_dict', checkpoint)
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), Mapping) else {}
    if not (isinstance(raw, Mapping) and is_whole_model(raw)):
        return None
    convert = 'backbone.patch_embed.proj.weight' in raw  # the PoolFormer v1 layout
    if not (convert or str(meta.get('converted_by', '')).startswith('mmmetaformer')):
        return None
    state, info = load_checkpoint_file(checkpoint)
    info.source = source
    what = describe_source(state, info)
    if convert:
        state = convert_whole_model(state, info)
    check_model_fit(state, model, info, what)
    validate(state, what, model)
    if convert:
        norms = sorted({(src.split('.')[1], key.split('.')[1])
                        for key, src in info.source_keys.items()
                        if re.match(r'^backbone\.norm\d+\.', key)})
        backbone = sum(k.startswith('backbone.') for k in state)
        print_log(f'Converted {what} in memory for {type(model).__name__}: {backbone} '
                  'backbone tensors to the mmmetaformer layout (output norms '
                  + ', '.join(f'{a} -> {b}' for a, b in norms) + f'), {len(state) - backbone} '
                  'neck/head tensors as they are; optimizer state ignored', logger='current')
    return dict(meta=dict(meta), state_dict=state)


def validate(state: Mapping, what: str, model=None) -> None:
    """:func:`~mmmetaformer.checkpoints.validate_tensors` on a whole model's ``state``: dtype
    kinds as in ``model``, or without one, all float but BatchNorm's step counters."""
    like = model.state_dict() if model is not None else {
        k: torch.zeros((), dtype=torch.long) for k in state if k.endswith('.num_batches_tracked')}
    validate_tensors(state, what, like)


# --- mmengine hook ----------------------------------------------------------------------
# mmengine loads a model's checkpoint in two steps, ``_load_checkpoint(filename)`` then
# ``_load_checkpoint_to_model(model, checkpoint)`` (``Runner.load_checkpoint`` and
# ``load_checkpoint`` alike, both looking the functions up at call time); the first step
# remembers the file name for the messages of the second.
_last_read = (None, None)  # (id of the checkpoint object, its file name)


def _read_wrapper(read):

    def _load_checkpoint(filename, *args, **kwargs):
        global _last_read
        checkpoint = read(filename, *args, **kwargs)
        _last_read = (id(checkpoint), str(filename))
        return checkpoint

    return _load_checkpoint


def _load_to_model_wrapper(load):

    def _load_checkpoint_to_model(model, checkpoint, strict=False, logger=None,
                                  revise_keys=[(r'^module\.', '')]):  # noqa: B006 (mmengine's)
        global _last_read
        source = _last_read[1] if _last_read[0] == id(checkpoint) else '<checkpoint>'
        _last_read = (None, None)
        fitted = fit_checkpoint_to_model(model, checkpoint, source)
        if fitted is not None:
            checkpoint, strict = fitted, True
        return load(model, checkpoint, strict, logger, revise_keys)

    return _load_checkpoint_to_model


def apply() -> None:
    """Route mmengine's model loading (``Runner.load_checkpoint``, ``load_checkpoint``)
    through :func:`fit_checkpoint_to_model`; idempotent."""
    from mmengine.runner import checkpoint, runner
    for module in (checkpoint, runner):
        for name, wrapper in (('_load_checkpoint', _read_wrapper),
                              ('_load_checkpoint_to_model', _load_to_model_wrapper)):
            original = getattr(module, name)
            if not getattr(original, _MARK, False):
                new = functools.wraps(original)(wrapper(original))
                setattr(new, _MARK, True)
                setattr(module, name, new)
