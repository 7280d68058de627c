"""The one load path, after reading: every checkpoint goes through these functions.

    read              mmengine's ``CheckpointLoader``, whose schemes mmmetaformer registers
                      (:mod:`mmmetaformer.sources`): nothing in a file runs
    state_dict_of     -> the flat state dict (containers, ``module.`` prefixes, EMA copies)
    convert_to_canonical  -> this project's layout (:data:`FORMATS`): ``backbone.<name>`` in
                      :class:`~mmmetaformer.models.MetaFormer` names, ``head.norm/fc.*``; a
                      detector's or segmentor's neck and heads keep their names
    check_backbone_fit / check_model_fit  -> every tensor the model has, with its shape
    validate_tensors  -> dense float tensors without NaN/Inf, read in bounded memory

:func:`load_backbone_checkpoint` (a backbone's ``init_cfg``) and :func:`load_model_checkpoint`
(``load_from``, ``resume``, the tools) run these steps in this order, and so does the backbone's
load hook for state dicts that reach it otherwise (mmengine's ``load_checkpoint``, as in
``init_detector``): nothing is copied into a model before all of them passed.
"""
import logging
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from mmengine.logging import print_log

from .archs import ARCHS
from .trust import CheckpointError

#: Supported layouts: name -> (a key only that layout has, description).
FORMATS = {
    'official-metaformer': ('downsample_layers.0.conv.weight',
                            'official MetaFormer-baselines layout, sail-sg/metaformer'),
    'official-poolformer': ('patch_embed.proj.weight',
                            'official PoolFormer v1 layout, sail-sg/poolformer'),
    'mmpretrain-poolformer': ('backbone.patch_embed.proj.weight',
                              'mmpretrain PoolFormer layout, backbone./head. keys'),
    'mmmetaformer': ('backbone.stem.conv.weight', 'mmmetaformer layout, backbone./head. keys'),
    'timm': ('stem.conv.weight', 'timm layout, or a bare MetaFormer backbone state dict'),
}
#: Top-level modules of a detector / segmentor besides its backbone.
HEADS = ('neck.', 'rpn_head.', 'roi_head.', 'bbox_head.', 'decode_head.', 'auxiliary_head.')

_WEIGHTS_KEYS = ('state_dict', 'model', 'module')  # where trainers keep the weights
_EMA_KEYS = ('state_dict_ema', 'model_ema')  # separate EMA copies (timm / DeiT trainers)
_OUT_NORM = re.compile(r'^norm\d+\.')
_LINEAR = re.compile(r'\.(mlp\.fc[12]|token_mixer\.(pwconv[12]|qkv|proj))\.weight$')


@dataclass
class CheckpointInfo:
    """What was found in a checkpoint, for messages and ``meta``."""
    source: str
    format: str = ''
    arch_guesses: List[str] = field(default_factory=list)  # see guess_arch
    meta: dict = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    ignored: Dict[str, List[str]] = field(default_factory=dict)  # reason -> keys
    source_keys: Dict[str, str] = field(default_factory=dict)  # canonical -> original key

    def ignore(self, reason: str, keys):
        self.ignored.setdefault(reason, []).extend(keys)

    def describe(self) -> str:
        return f'{self.source} ({FORMATS[self.format][1]})' if self.format else self.source


def first(items, limit: int = 5, name=str) -> str:
    """``'a, b, c and 4 more'``: how every message lists keys."""
    more = f' and {len(items) - limit} more' if len(items) > limit else ''
    return ', '.join(name(k) for k in list(items)[:limit]) + more


def summarize(info: CheckpointInfo) -> str:
    """The notes and deliberately ignored keys, for the log."""
    return '; '.join([*info.notes, *(f'ignored {reason}: {first(keys, 3)}'
                                     for reason, keys in info.ignored.items() if keys)])


def read(source, map_location='cpu'):
    """The checkpoint at ``source`` (a path, URL, ``timm://`` name or mmengine URI), read by
    mmengine's ``CheckpointLoader`` through the schemes of :mod:`mmmetaformer.sources`."""
    from mmengine.runner import CheckpointLoader
    return CheckpointLoader.load_checkpoint(str(source), map_location, logger='current')


def state_dict_of(checkpoint: Mapping, source: str, use_ema: bool = False
                  ) -> Tuple[dict, CheckpointInfo]:
    """The flat state dict of ``checkpoint`` (read from ``source``) and what was found.

    Unwraps ``state_dict``/``model``/``module`` and ``module.`` prefixes and handles EMA
    copies: mmengine's EMAHook saves the EMA weights as ``state_dict`` (the raw ones, in
    ``ema_state_dict``, are ignored); a separate copy (timm ``state_dict_ema``, mmcv 1.x
    ``ema_*`` buffers) is ignored unless ``use_ema``.
    """
    obj, info = checkpoint, CheckpointInfo(source)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{info.source} holds a {type(obj).__name__}, not a state dict')
    if isinstance(obj.get('meta'), Mapping):
        info.meta = dict(obj['meta'])
    wrong = next((k for k in _WEIGHTS_KEYS if k in obj and not isinstance(obj[k], (
        Mapping, torch.Tensor))), None)
    if wrong:
        raise CheckpointError(f"{info.source}: its {wrong!r} is a {type(obj[wrong]).__name__}, "
                              'not tensors by name')
    state = next((obj[k] for k in _WEIGHTS_KEYS if isinstance(obj.get(k), Mapping)), obj)
    ema_key = next((k for k in _EMA_KEYS if isinstance(obj.get(k), Mapping)), None)
    if isinstance(obj.get('ema_state_dict'), Mapping):
        info.notes.append("its 'state_dict' holds the EMA weights (mmengine's EMAHook swaps "
                          "them in when saving); the raw weights in 'ema_state_dict' are ignored")
    elif ema_key and use_ema:
        state = obj[ema_key]
        info.notes.append(f"using the EMA weights in '{ema_key}'")
    elif ema_key:
        info.ignore('EMA copy', [f'{ema_key}.*'])

    state = dict(state)
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    ema = [k for k in state if k.startswith('ema_')]  # mmcv 1.x EMAHook buffers
    if ema and use_ema:
        plain = {'ema_' + k.replace('.', '_'): k for k in state if not k.startswith('ema_')}
        for k in ema:
            if k in plain:
                state[plain[k]] = state[k]
        info.notes.append("using the EMA weights in the 'ema_*' entries")
    elif ema:
        info.ignore('EMA copy', ema)
    for k in ema:
        del state[k]
    info.ignore('non-tensor entries', [k for k, v in state.items()
                                       if not isinstance(v, torch.Tensor)])
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    nested = [k for k, v in state.items() if v.is_nested]
    if nested:
        raise CheckpointError(f'{info.source}: {first(nested)} is a nested tensor; these models '
                              'load dense tensors')
    if not state:
        raise CheckpointError(f'{info.source} holds no tensors (top-level keys: {list(obj)[:8]})')
    return state, info


# --- converting ----------------------------------------------------------------------------

def is_whole_model(state: Mapping) -> bool:
    """Whether ``state`` is a detector's or segmentor's: a backbone plus a neck or heads."""
    return any(k.startswith('backbone.') for k in state) and \
        any(k.startswith(HEADS) for k in state)


def detect_format(state_dict: Mapping, source: str = '<state dict>') -> str:
    """The name of the layout of ``state_dict`` (read from ``source``) in :data:`FORMATS`."""
    for name, (signature, _) in FORMATS.items():
        if signature in state_dict:
            return name
    raise CheckpointError(
        f'{source}: unrecognised checkpoint layout (first keys: '
        f'{list(state_dict)[:6]}); supported: '
        + '; '.join(f'{desc} with {sig!r}' for sig, desc in FORMATS.values()))


def _poolformer_rules(src: str, dense: bool):
    """PoolFormer v1 names (official, or mmpretrain's under ``src='backbone.'``)."""
    def out_norm(m):
        return f'backbone.norm{int(m[1]) // 2}.' if dense else 'head.norm.'
    return [
        (rf'^{src}patch_embed\.proj\.', 'backbone.stem.conv.'),
        (rf'^{src}network\.(\d+)\.proj\.',
         lambda m: f'backbone.stages.{(int(m[1]) + 1) // 2}.downsample.conv.'),
        (rf'^{src}network\.(\d+)\.(\d+)\.layer_scale_(\d)$',
         lambda m: f'backbone.stages.{int(m[1]) // 2}.blocks.{m[2]}.layer_scale{m[3]}.scale'),
        (rf'^{src}network\.(\d+)\.(\d+)\.',
         lambda m: f'backbone.stages.{int(m[1]) // 2}.blocks.{m[2]}.'),
        (rf'^{src}norm(\d+)\.', out_norm),  # mmpretrain: norm6 = the final norm
    ]


def _rules(fmt: str, state_dict: Mapping):
    """(pattern, replacement) pairs, first match wins; a key matching none is ignored."""
    if fmt == 'official-metaformer':
        return [(r'^downsample_layers\.0\.conv\.', 'backbone.stem.conv.'),
                (r'^downsample_layers\.0\.post_norm\.', 'backbone.stem.norm.'),
                (r'^downsample_layers\.(\d+)\.pre_norm\.', r'backbone.stages.\1.downsample.norm.'),
                (r'^downsample_layers\.(\d+)\.conv\.', r'backbone.stages.\1.downsample.conv.'),
                (r'^stages\.(\d+)\.(\d+)\.', r'backbone.stages.\1.blocks.\2.'),
                (r'^norm\.', 'head.norm.'), (r'^head\.', 'head.fc.'), (r'^', 'backbone.')]
    # mmpretrain files for dense prediction have output norms norm0/2/4(/6); classifiers norm6
    dense = any(re.match(r'^(backbone\.)?norm[024]\.', k) for k in state_dict)
    if fmt == 'official-poolformer':
        return _poolformer_rules('', dense) + [
            (r'^norm\.', 'head.norm.'), (r'^head\.', 'head.fc.'), (r'^', 'backbone.')]
    if fmt == 'mmpretrain-poolformer':
        return _poolformer_rules(r'backbone\.', dense) + [
            (r'^backbone\.', 'backbone.'), (r'^head\.', 'head.')]
    if fmt == 'mmmetaformer':
        return [(r'^(backbone|head)\.', r'\1.')]
    return [(r'^head\.', 'head.'), (r'^', 'backbone.')]  # timm


def convert_to_canonical(state_dict: Mapping, info: Optional[CheckpointInfo] = None,
                         whole_model: bool = False) -> Tuple[dict, CheckpointInfo]:
    """``state_dict`` in the canonical ``backbone.*``/``head.*`` layout, and what was found.

    Keys outside the model (a detector's neck and heads, ...) are recorded in
    ``info.ignored``; unknown keys of the unprefixed layouts become ``backbone.*`` keys, so
    that loading reports them as unexpected. With ``whole_model`` (a detector or segmentor)
    only the ``backbone.*`` keys are converted, the others kept under their own names.
    """
    info = info or CheckpointInfo('<state dict>')
    heads = {k: v for k, v in state_dict.items()
             if whole_model and not k.startswith('backbone.')}
    state_dict = {k: v for k, v in state_dict.items() if k not in heads}
    info.format = detect_format(state_dict, info.source)
    rules = _rules(info.format, state_dict)
    canonical, other = {}, []
    for key, value in state_dict.items():
        for pattern, repl in rules:
            new, found = re.subn(pattern, repl, key, count=1)
            if found:
                break
        else:
            other.append(key)
            continue
        if new in canonical:
            raise CheckpointError(f'{info.source}: {info.source_keys[new]!r} and {key!r} are '
                                  f'both {new}; a checkpoint holds one layout')
        if _LINEAR.search(new) and value.dim() == 4 and value.shape[2:] == (1, 1):
            value = value.reshape(value.shape[:2])  # 1x1 conv weight -> Linear weight
        canonical[new] = value
        info.source_keys[new] = key
    info.ignore('other model parts', other)
    info.arch_guesses = guess_arch(
        {k[len('backbone.'):]: v for k, v in canonical.items() if k.startswith('backbone.')})
    if whole_model:
        foreign = [info.source_keys[k] for k in canonical if not k.startswith('backbone.')]
        if foreign:  # a classifier's final norm: a dense-prediction backbone has none
            raise CheckpointError(f'{info.source}: {first(foreign)} of a classifier in a '
                                  'detector or segmentor checkpoint')
        canonical.update(heads)
    return canonical, info


# --- architecture guess and fit check ------------------------------------------------------

def _mixer_kinds(mixers) -> List[str]:
    return ['pooling/identity' if m in ('pooling', 'identity') else m for m in mixers]


def describe_backbone(backbone_state: Mapping) -> dict:
    """Depths, dims, mixer kinds and norm kind read from backbone tensor names and shapes."""
    blocks = {}
    for key in backbone_state:
        m = re.match(r'^stages\.(\d+)\.blocks\.(\d+)\.', key)
        if m:
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    num_stages = max(blocks, default=-1) + 1
    depths = [max(blocks.get(i, {-1})) + 1 for i in range(num_stages)]
    dims, mixers = [], []
    for i in range(num_stages):
        norm = backbone_state.get(f'stages.{i}.blocks.0.norm1.weight')
        dims.append(norm.shape[0] if norm is not None else None)
        names = {k.split('token_mixer.')[1] for k in backbone_state
                 if k.startswith(f'stages.{i}.blocks.0.token_mixer.')}
        mixers.append('attention' if 'qkv.weight' in names else 'sepconv'
                      if 'pwconv1.weight' in names else 'random'
                      if 'random_matrix' in names else 'pooling/identity')
    v1 = 'stages.0.blocks.0.norm1.bias' in backbone_state
    return dict(depths=depths, dims=dims, mixers=mixers, v1=v1)


def guess_arch(backbone_state: Mapping) -> List[str]:
    """Names in :data:`ARCHS` whose tensor layout matches ``backbone_state``; PoolFormerV2 and
    IdentityFormer (parameter-free mixers, same norms) have the same layout, so both match."""
    d = describe_backbone(backbone_state)
    return [name for name, a in ARCHS.items()
            if list(a['depths']) == d['depths'] and list(a['dims']) == d['dims']
            and _mixer_kinds(a['mixers']) == d['mixers'] and a['norm_bias'] == d['v1']]


def arch_name(settings: Mapping) -> Optional[str]:
    """The :data:`ARCHS` name of a backbone's ``arch_settings``, or None for a custom arch."""
    def norm(s):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in s.items()}
    return next((name for name, a in ARCHS.items() if norm(a) == norm(settings)), None)


def _layout(d: Mapping) -> str:
    return f"stage depths {list(d['depths'])}, dims {list(d['dims'])}, mixers {d['mixers']}"


def _differences(state, expected, owner, optional=lambda key: False, name=str, where=None):
    """Message lines for what in ``state`` does not match ``expected`` (name -> shape)."""
    missing = [k for k in expected if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in expected and not optional(k)]
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k])]
    lines = [f'  {label} {len(keys)} tensors' + (f' (in {", ".join(where(keys))})' if where
                                                 else '') + f': {first(keys, name=name)}'
             for label, keys in (('missing', missing), ('unexpected', unexpected)) if keys]
    lines += [f'  wrong shape: {k}: checkpoint {tuple(state[k].shape)}, {owner} '
              f'{tuple(expected[k])}' for k in wrong[:5]]
    if len(wrong) > 5:
        lines.append(f'  and {len(wrong) - 5} more tensors of the wrong shape')
    return lines, wrong


def _modules(keys):
    return sorted({'.'.join(k.split('.')[:2 if k.startswith('roi_head.') else 1])
                   for k in keys})


def check_backbone_fit(weights: Mapping, backbone, info: CheckpointInfo) -> dict:
    """The tensors of ``weights`` (in the names of ``backbone``, a MetaFormer) to load: every
    tensor of the backbone but its output norms, with its shape, and nothing else. Otherwise
    raises :class:`CheckpointError` saying what the checkpoint looks like and what does not
    fit."""
    expected = {k: v.shape for k, v in backbone.state_dict().items()}

    def name(k):  # with the checkpoint's own key where it differs
        src = info.source_keys.get('backbone.' + k, k)
        return k if src in (k, 'backbone.' + k) else f'{k} (checkpoint key {src!r})'

    lines, _ = _differences(weights, expected, 'backbone', lambda k: _OUT_NORM.match(k), name)
    if lines:
        target = arch_name(backbone.arch_settings)
        guesses = info.arch_guesses
        looks = f"looks like {'/'.join(guesses)}" if guesses else 'matches no published arch'
        if target in guesses:
            head = (f"checkpoint {info.describe()} {looks}, the backbone's arch, but its "
                    'tensors do not fit:')
        else:
            want = dict(backbone.arch_settings,
                        mixers=_mixer_kinds(backbone.arch_settings['mixers']))
            head = (f'checkpoint {info.describe()} has {_layout(describe_backbone(weights))} '
                    f'({looks}) but the backbone is '
                    f'{target or f"a custom {type(backbone).__name__} arch"} ({_layout(want)}):')
        raise CheckpointError('\n'.join([head, *lines, 'Nothing was loaded.' if target in guesses
                                         else 'Nothing was loaded: use the backbone arch the '
                                         'checkpoint was trained with, or a checkpoint of this '
                                         'arch.']))
    info.ignore('output norms the backbone does not have',
                [k for k in weights if k not in expected])
    return {k: v for k, v in weights.items() if k in expected}


def model_differences(state: Mapping, model) -> Tuple[List[str], List[str], List[str]]:
    """The keys of ``model``'s tensors missing from ``state``, the keys of ``state`` the model
    does not have, and the keys whose shapes differ."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    return missing, unexpected, wrong


def check_model_fit(state: Mapping, model, what: str, purpose: str = 'load') -> List[str]:
    """Raise :class:`CheckpointError` unless ``state`` (whole-model names, read from ``what``)
    holds exactly the tensors of ``model``, each with its shape. ``purpose``: ``'load'``,
    ``'resume'`` (a one-line error naming the first difference) or ``'fine-tune'`` (tensors of
    another shape are allowed, as from a file trained for another number of classes: their keys
    are returned, to be left at their initialisation)."""
    missing, unexpected, wrong = model_differences(state, model)
    if not (missing or unexpected or wrong) or (
            purpose == 'fine-tune' and not (missing or unexpected)):
        return wrong
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if purpose == 'resume':
        first_difference = (
            f'{wrong[0]} is {tuple(state[wrong[0]].shape)} in the file and '
            f'{tuple(expected[wrong[0]])} in the model' if wrong else
            f'the model has no {unexpected[0]}' if unexpected else f'the file has no {missing[0]}')
        raise CheckpointError(
            f'cannot resume from {what}: it was saved by a run of another model or config '
            f'({first_difference}); to start from its weights instead, set load_from to it and '
            'resume=False (tensors of another shape then keep their initialisation)')
    lines, _ = _differences(state, expected, 'model', where=_modules)
    if any(re.search(r'(fc_cls|conv_logits|retina_cls|conv_seg|fc)\.weight$', k) for k in wrong):
        lines.append('  (the classifier shapes differ: the file was trained for another number '
                     'of classes; to fine-tune from it, name it in load_from of a training run)')
    raise CheckpointError('\n'.join([
        f'{what} does not fit the {model_kind(expected)} ({type(model).__name__}) of the '
        f'config, which has {len(expected)} tensors:', *lines,
        'Nothing was loaded: use the config of the model the file was trained with, or to start '
        "from its backbone alone, name the file in the config's "
        "model.backbone.init_cfg=dict(type='Pretrained', checkpoint=...)."]))


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _kind(dtype: torch.dtype) -> str:
    """'float', 'integer' or the dtype's name (bool, complex, float8, quantized, ...)."""
    return 'float' if dtype in _FLOATS else 'integer' if dtype in _INTS else \
        str(dtype).replace('torch.', '')


def validate_tensors(state: Mapping[str, torch.Tensor], source: str,
                     like: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Refuse, before anything is copied, tensors that cannot be loaded as they are: not dense
    (sparse, meta, ...), of another kind of dtype than ``like[key]`` (where ``like`` has no such
    key: float, but integer for BatchNorm's ``num_batches_tracked``), or float tensors holding
    NaN or Inf. Raises :class:`CheckpointError` naming ``source`` and the tensors."""
    lines, nonfinite = [], {}
    for key, t in state.items():
        want = _kind(like[key].dtype) if like is not None and key in like else \
            'integer' if key.endswith('.num_batches_tracked') else 'float'
        if t.layout != torch.strided or t.device.type == 'meta':
            lines.append(f'  {key}: a {t.layout} tensor on {t.device.type}, not a dense one')
        elif t.numel() > t.untyped_storage().nbytes() // t.element_size():
            lines.append(f'  {key}: {t.numel()} values declared over '
                         f'{t.untyped_storage().nbytes() // t.element_size()} stored')
        elif _kind(t.dtype) != want:
            lines.append(f'  {key}: {_kind(t.dtype)} values ({t.dtype}) where {want} values '
                         'belong')
        elif t.dtype in _FLOATS:  # in chunks: a copy at most of what the file stored
            bad = sum(int(c.numel() - torch.isfinite(c).sum())
                      for c in t.reshape(-1).split(1 << 22))
            if bad:
                nonfinite[key] = bad
    if nonfinite:
        shown = first([f'{k} ({n} of {state[k].numel()})' for k, n in nonfinite.items()])
        lines.append(f'  {sum(nonfinite.values())} NaN/Inf values in {len(nonfinite)} '
                     f'tensors: {shown}')
    if lines:
        raise CheckpointError('\n'.join([f'{source} holds tensors that cannot be loaded:',
                                         *lines[:8], 'Nothing was loaded.']))


_KINDS = (('roi_head.mask_head.', 'Mask R-CNN'), ('roi_head.', 'two-stage detector'),
          ('bbox_head.retina_', 'RetinaNet'), ('bbox_head.', 'one-stage detector'),
          ('decode_head.scale_heads.', 'Semantic FPN'), ('decode_head.', 'segmentor'))


def model_kind(state: Mapping) -> str:
    """What kind of model the keys of ``state`` belong to, e.g. ``'Mask R-CNN'``."""
    return next((kind for prefix, kind in _KINDS if any(k.startswith(prefix) for k in state)),
                'model')


def source_toolbox(meta: Mapping) -> str:
    """The toolbox version a checkpoint's ``meta`` names, e.g. ``'mmdet 2.19.0'``."""
    return ', '.join(f"{key.split('_')[0]} {meta[key]}" for key in
                     ('mmdet_version', 'mmseg_version', 'mmengine_version')
                     if isinstance(meta.get(key), str))


def describe_source(state: Mapping, info: CheckpointInfo) -> str:
    """E.g. ``'x.pth (Mask R-CNN, mmdet 2.19.0)'``."""
    toolbox = source_toolbox(info.meta)
    return f"{info.source} ({model_kind(state)}{', ' + toolbox if toolbox else ''})"




# --- loading ------------------------------------------------------------------------------
_thread = threading.local()  # .read: (source, tensor id -> weakref); .checked: bool


def remember_source(checkpoint, source: str) -> None:
    """Note that the tensors of ``checkpoint`` were read from ``source``: the last read of this
    thread, which :func:`source_of` recognises by the tensors themselves (weakly held)."""
    tensors = {}
    for mapping in (checkpoint, *(checkpoint.get(k) for k in _WEIGHTS_KEYS)) \
            if isinstance(checkpoint, Mapping) else ():
        if isinstance(mapping, Mapping):
            tensors.update((id(v), weakref.ref(v)) for v in mapping.values()
                           if isinstance(v, torch.Tensor))
    _thread.read = (source, tensors)


def source_of(tensors) -> Optional[str]:
    """The source :func:`remember_source` noted for any of ``tensors``, else None."""
    source, refs = getattr(_thread, 'read', (None, {}))
    for tensor in tensors:
        ref = refs.get(id(tensor))
        if ref is not None and ref() is tensor:
            return source
    return None


def checked_load() -> bool:
    """Whether this thread is loading a state dict the functions below have checked."""
    return getattr(_thread, 'checked', False)


def backbone_weights(local: Mapping, info: CheckpointInfo) -> dict:
    """``local`` (a state dict in the keys under a backbone, in any :data:`FORMATS` layout) in
    the backbone's own names; a classifier head is ignored."""
    if not local:
        return {}
    canonical, info = convert_to_canonical(local, info)
    info.ignore('classifier head', [k for k in canonical if k.startswith('head.')])
    weights = {k[len('backbone.'):]: v for k, v in canonical.items() if k.startswith('backbone.')}
    if info.format not in ('timm', 'mmmetaformer'):  # renamed: say how
        norms = sorted({(re.search(r'(norm\d+)\.', info.source_keys['backbone.' + k])[1],
                         k.split('.')[0]) for k in weights if _OUT_NORM.match(k)})
        info.notes.append(f'converted {len(weights)} backbone tensors from the '
                          f'{FORMATS[info.format][1]}' + (' (output norms ' + ', '.join(
                              f'{a} -> {b}' for a, b in norms) + ')' if norms else ''))
    return weights


def check_backbone_state(backbone, local: dict) -> Tuple[dict, Optional[str]]:
    """The tensors a MetaFormer's load hook copies in for ``local`` (a state dict under the
    backbone's prefix), converted, checked and validated, and the file they were read from
    (None for a state dict from elsewhere)."""
    source = source_of(local.values())
    info = CheckpointInfo(source or 'the state dict')
    weights = check_backbone_fit(backbone_weights(local, info), backbone, info)
    validate_tensors(weights, f'checkpoint {info.describe()}', backbone.state_dict())
    if info.notes:
        print_log(f'{info.source}: ' + '; '.join(info.notes), logger='current')
    return weights, source


def load_backbone_checkpoint(backbone, checkpoint, prefix: Optional[str] = None,
                             use_ema: bool = False) -> CheckpointInfo:
    """Load any supported checkpoint (a path, URL or ``timm://name``, or what was read from one)
    into a MetaFormer backbone: ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix=None,
    use_ema=False)``; ``prefix`` keeps only the keys under it.

    Strict for the backbone (all tensors but the output norms, right shapes, nothing
    unknown); the classifier head and EMA copies are ignored and logged.
    """
    state, info = state_dict_of(*((checkpoint, '<state dict>') if isinstance(
        checkpoint, Mapping) else (read(checkpoint), str(checkpoint))), use_ema)
    if prefix:  # mmengine's convention: only the keys under it, stripped
        under = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not under:
            tops = sorted({k.split('.')[0] + '.' for k in state})
            raise CheckpointError(f'{info.source} has no keys under prefix {prefix!r} '
                                  f'(its top-level prefixes: {tops[:10]})')
        state = under
    weights = check_backbone_fit(backbone_weights(state, info), backbone, info)
    validate_tensors(weights, f'checkpoint {info.describe()}', backbone.state_dict())
    load_state(backbone, weights)
    new = sorted({k.split('.')[0] for k in backbone.state_dict() if k not in weights})
    target = arch_name(backbone.arch_settings) or f'a custom {type(backbone).__name__} arch'
    msg = (f'Loaded {len(weights)} tensors from {info.describe()} into '
           f'{type(backbone).__name__} ({target})')
    if new:
        msg += f"; output norms {', '.join(new)} are new layers, not in the checkpoint"
    extra = summarize(info)
    print_log(msg + (f'; {extra}' if extra else ''), logger='current')
    return info


def prepare_model_state(model, checkpoint: Mapping, source, purpose: str = 'load') -> dict:
    """The state dict of the whole-model ``checkpoint`` (read from ``source``) to load into
    ``model``, a detector, segmentor or classifier with MetaFormer backbones (a backbone alone:
    :func:`load_backbone_checkpoint`): every tensor of the model, each with its shape (see
    :func:`check_model_fit` for ``purpose``), the backbones' tensors in any supported layout,
    validated."""
    from .models.metaformer import MetaFormer
    state, info = state_dict_of(checkpoint, str(source))
    what = str(source) if purpose == 'resume' else describe_source(state, info)
    if isinstance(getattr(model, 'backbone', None), MetaFormer) and not any(
            k.startswith('backbone.') for k in state):  # a classifier's or a backbone's file
        state, info = convert_to_canonical(state, info)
    for name in [name for name, m in model.named_modules() if isinstance(m, MetaFormer)]:
        local = {k[len(name) + 1:]: state.pop(k) for k in list(state)
                 if k.startswith(name + '.')}
        state.update((f'{name}.{k}', v) for k, v in backbone_weights(local, info).items())
    kept = check_model_fit(state, model, what, purpose)
    for key in kept:
        del state[key]
    validate_tensors(state, what, model.state_dict())
    extra = summarize(info)
    print_log(f'Loading {len(state)} tensors of {what} into {type(model).__name__}'
              + (f'; {extra}' if extra else ''), logger='current')
    if kept:
        print_log(f'{len(kept)} tensors of {what} have other shapes than the model\'s and keep '
                  f'their initialisation (fine-tuning): {first(kept)}', logger='current',
                  level=logging.WARNING)
    return state


def load_state(model, state: Mapping) -> None:
    """Copy ``state``, made by :func:`prepare_model_state`, into ``model``."""
    _thread.checked = True
    try:
        model.load_state_dict(state, strict=False)
    finally:
        _thread.checked = False


def load_model_checkpoint(model, source, map_location='cpu', purpose: str = 'load') -> Mapping:
    """Read the checkpoint at ``source``, check it fits ``model`` whole
    (:func:`prepare_model_state`) and load it; returns the checkpoint."""
    checkpoint = read(source, map_location)
    load_state(model, prepare_model_state(model, checkpoint, source, purpose))
    return checkpoint
