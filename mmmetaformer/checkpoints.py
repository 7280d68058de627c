"""The one load path: read a checkpoint, validate its tensors, convert its layout, check the fit.

    read_checkpoint   a path, an http(s) URL, ``timm://<name>`` or an mmengine file-backend URI
                      -> the stored object, read by :mod:`mmmetaformer.trust` (safetensors by
                      safetensors): nothing in a file runs
    load_checkpoint_file  -> the flat state dict (containers, ``module.`` prefixes, EMA copies)
    convert_to_canonical  -> this project's layout (:data:`FORMATS`): ``backbone.<name>`` in
                      :class:`~mmmetaformer.models.MetaFormer` names, ``head.norm/fc.*``; a
                      detector's or segmentor's neck and heads keep their names
    check_fit         -> every tensor the model has, with its shape, before any value is read
    validate_tensors  -> dense float tensors without NaN/Inf, read in bounded memory

:func:`load_pretrained` (a backbone's ``init_cfg``) and :func:`fit_checkpoint_to_model`
(mmengine's ``load_from``, ``tools/test.py``, ``init_detector``) run these steps in this order;
nothing is copied into a model before all of them passed.
"""
import hashlib
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlparse

import torch
from mmengine.logging import print_log

from . import trust
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

_SCHEMES = ('http://', 'https://', 'timm://')
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


# --- reading -----------------------------------------------------------------------------

def read_checkpoint(source, map_location='cpu'):
    """The object stored at ``source`` (a path, an http(s) URL, ``timm://<hub name>`` or an
    mmengine file-backend URI), read without running any code from it."""
    source = str(source)
    if source.startswith('timm://'):
        return _read_file(_download_timm(source[len('timm://'):]), source, map_location)
    if source.startswith(('http://', 'https://')):
        return _read_file(_download_url(source), source, map_location)
    if '://' in source:
        from mmengine.fileio.backends import backends, prefix_to_backends
        scheme = source.split('://', 1)[0]
        if scheme not in prefix_to_backends:
            supported = [*_SCHEMES, *(f'{p}://' for p in prefix_to_backends if p)]
            raise CheckpointError(
                f'cannot read {source}: {scheme}:// is not a supported location; use a local '
                f"path or one of {', '.join(dict.fromkeys(supported))} (mmengine file "
                f"backends: {', '.join(backends)})")
        from mmengine.fileio import get_local_path
        with get_local_path(source) as path:
            return _read_file(path, source, map_location)
    if not os.path.isfile(source):
        raise CheckpointError(f'checkpoint file not found: {source}')
    return _read_file(source, source, map_location)


def _read_file(path: str, source: str, map_location):
    with open(path, 'rb') as f:
        head = f.read(9)
    if len(head) == 9 and head[8:] == b'{':  # safetensors: u64 header size, then JSON
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as err:
            raise CheckpointError(trust.unreadable(source, err)) from err
    return trust.load(path, source, map_location)


def url_cache_name(url: str) -> str:
    """The file name a download of ``url`` is cached under: made from the whole URL, so that
    two URLs ending in the same name do not share it."""
    return f'{hashlib.sha256(url.encode()).hexdigest()[:16]}-{os.path.basename(urlparse(url).path)}'


def _download_url(url: str) -> str:
    """Download ``url`` once into torch's hub cache, under a name made from the whole URL."""
    from torch.hub import download_url_to_file, get_dir
    path = os.path.join(get_dir(), 'checkpoints', url_cache_name(url))
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print_log(f'Downloading {url} to {path}', logger='current')
        try:
            download_url_to_file(url, path)
        except Exception as err:
            raise CheckpointError(
                f'cannot download {url} ({type(err).__name__}: {err}). If this machine is '
                f'offline, download it elsewhere, copy it to {path} or pass its local '
                'path instead.') from err
    return path


def _download_timm(name: str) -> str:
    """The local file of the timm hub weights ``name``, e.g. ``caformer_s18.sail_in1k``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from timm.models import get_pretrained_cfg
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None or not cfg.hf_hub_id:
        raise CheckpointError(
            f"timm://{name}: timm has no pretrained weights of that name; timm's MetaFormer "
            "weights are listed by timm.list_pretrained('*former*'), e.g. "
            'timm://caformer_s18.sail_in22k_ft_in1k')
    hub_id, error = cfg.hf_hub_id, None
    offline = not _hub_reachable()  # then only the local cache, at once (no 35 s of retries)
    for filename in ('model.safetensors', 'pytorch_model.bin'):
        try:
            return hf_hub_download(hub_id, filename, local_files_only=offline)
        except (LocalEntryNotFoundError, EntryNotFoundError) as err:  # not cached / no file
            error = err
        except Exception as err:
            error = err
            break
    from huggingface_hub import constants
    reason = f'{constants.ENDPOINT} is out of reach and it is not in the local cache' \
        if offline else f'{type(error).__name__}: {error}'
    raise CheckpointError(
        f'cannot fetch timm://{name} from the Hugging Face hub (repo {hub_id}): {reason}\n'
        f'If this machine is offline, download https://huggingface.co/{hub_id}/resolve/main/'
        'model.safetensors on a connected one and pass its local path instead (or copy its '
        'Hugging Face cache).')


def _hub_reachable(timeout: float = 3.) -> bool:
    """False in huggingface_hub's offline mode or when its endpoint takes no TCP connection
    within ``timeout`` seconds (name lookup included)."""
    from concurrent.futures import ThreadPoolExecutor
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    address = (url.hostname, url.port or (443 if url.scheme == 'https' else 80))
    pool = ThreadPoolExecutor(1)
    try:
        pool.submit(socket.create_connection, address, timeout).result(timeout).close()
        return True
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


def load_checkpoint_file(checkpoint, use_ema: bool = False, source: str = '<state dict>'
                         ) -> Tuple[dict, CheckpointInfo]:
    """The flat state dict of a checkpoint (a path/URL, or an object read from ``source``).

    Unwraps ``state_dict``/``model``/``module`` and ``module.`` prefixes and handles EMA
    copies: mmengine's EMAHook saves the EMA weights as ``state_dict`` (the raw ones, in
    ``ema_state_dict``, are ignored); a separate copy (timm ``state_dict_ema``, mmcv 1.x
    ``ema_*`` buffers) is ignored unless ``use_ema``.
    """
    if isinstance(checkpoint, Mapping):
        obj, info = checkpoint, CheckpointInfo(source)
    else:
        obj, info = read_checkpoint(checkpoint), CheckpointInfo(str(checkpoint))
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


def check_fit(state: Mapping, model, info: CheckpointInfo, what: Optional[str] = None) -> dict:
    """The tensors of ``state`` to load into ``model``, checked by name and shape only.

    ``model`` is a MetaFormer backbone (``state`` in its names; every tensor but the output
    norms must be there) or a detector / segmentor whose ``backbone`` is one (``state`` in
    whole-model names, exactly the model's tensors). Otherwise raises
    :class:`CheckpointError` saying what the checkpoint looks like and what does not fit.
    """
    whole = hasattr(model, 'backbone')
    backbone = model.backbone if whole else model
    expected = {k: v.shape for k, v in model.state_dict().items()}
    prefix = 'backbone.' if whole else ''
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    def name(k):  # with the checkpoint's own key where it differs
        src = info.source_keys.get('backbone.' + k, k)
        return k if src in (k, 'backbone.' + k) else f'{k} (checkpoint key {src!r})'

    lines, _ = _differences(weights, {k[len(prefix):]: v for k, v in expected.items()
                                      if k.startswith(prefix)},
                            'backbone', lambda k: _OUT_NORM.match(k), name)
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
    if not whole:
        info.ignore('output norms the backbone does not have',
                    [k for k in weights if k not in expected])
        return {k: v for k, v in weights.items() if k in expected}

    lines, wrong = _differences(state, expected, 'model', where=_modules)
    if lines:
        if any(re.search(r'(fc_cls|conv_logits|retina_cls|conv_seg)\.weight$', k) for k in wrong):
            lines.append('  (the classifier shapes differ: the file was trained for another '
                         'number of classes)')
        raise CheckpointError('\n'.join([
            f'{what} does not fit the {model_kind(expected)} ({type(model).__name__}) of the '
            f'config, which has {len(expected)} tensors:', *lines,
            'Nothing was loaded: use the config of the model the file was trained with, or to '
            "start from its backbone alone, name the file in the config's "
            "model.backbone.init_cfg=dict(type='Pretrained', checkpoint=...)."]))
    return dict(state)


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


# --- loading -----------------------------------------------------------------------------

def load_pretrained(backbone, checkpoint, prefix: Optional[str] = None,
                    use_ema: bool = False) -> CheckpointInfo:
    """Load any supported checkpoint (path, URL, ``timm://name`` or a loaded dict) into a
    :class:`~mmmetaformer.models.MetaFormer`; ``prefix`` keeps only the keys under it.

    Strict for the backbone (all tensors but the output norms, right shapes, nothing
    unknown); the classifier head and EMA copies are ignored and logged.
    """
    state, info = load_checkpoint_file(checkpoint, use_ema)
    if prefix:  # mmengine's convention: only the keys under it, stripped
        under = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not under:
            tops = sorted({k.split('.')[0] + '.' for k in state})
            raise CheckpointError(f'{info.source} has no keys under prefix {prefix!r} '
                                  f'(its top-level prefixes: {tops[:10]})')
        state = under
    state, info = convert_to_canonical(state, info)
    info.ignore('classifier head', [k for k in state if k.startswith('head.')])
    weights = check_fit({k[len('backbone.'):]: v for k, v in state.items()
                         if k.startswith('backbone.')}, backbone, info)
    validate_tensors(weights, f'checkpoint {info.describe()}')
    backbone.load_state_dict(weights, strict=False)
    new = sorted({k.split('.')[0] for k in backbone.state_dict() if k not in weights})
    target = arch_name(backbone.arch_settings) or f'a custom {type(backbone).__name__} arch'
    msg = (f'Loaded {len(weights)} tensors from {info.describe()} into '
           f'{type(backbone).__name__} ({target})')
    if new:
        msg += f"; output norms {', '.join(new)} are new layers, not in the checkpoint"
    extra = summarize(info)
    print_log(msg + (f'; {extra}' if extra else ''), logger='current')
    return info


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


def fit_checkpoint_to_model(model, checkpoint: Mapping, source: str, strict: bool
                            ) -> Tuple[Mapping, bool]:
    """``checkpoint`` (read from ``source``) as mmengine should load it into ``model``, a
    detector or segmentor whose backbone is this project's, and whether strictly.

    A whole-model file is found under ``state_dict``, ``model`` or ``module``, its keys with or
    without ``module.``. Ours (the published dense-prediction files, whose backbone is in the
    PoolFormer v1 layout: converted here, as mmdet 2.19 -> 3.3 and mmseg 0.19 -> 1.2 renamed
    none of their necks' and heads' parameters; or a file of the whole-model conversion) must
    hold exactly the model's tensors, validated, else :class:`CheckpointError`.
    """
    state, info = load_checkpoint_file(checkpoint, source=source)
    if not (is_whole_model(state) and any(hasattr(model, h.rstrip('.')) for h in HEADS)):
        return checkpoint, strict
    convert = 'backbone.patch_embed.proj.weight' in state  # the PoolFormer v1 layout
    if not (convert or str(info.meta.get('converted_by', '')).startswith('mmmetaformer')):
        wrapped = not isinstance(checkpoint.get('state_dict'), Mapping)
        return (dict(checkpoint, state_dict=state) if wrapped else checkpoint), strict
    what = describe_source(state, info)
    if convert:
        state, info = convert_to_canonical(state, info, whole_model=True)
    state = check_fit(state, model, info, what)
    validate_tensors(state, what, model.state_dict())
    if convert:
        norms = sorted({(src.split('.')[1], key.split('.')[1])
                        for key, src in info.source_keys.items()
                        if re.match(r'^backbone\.norm\d+\.', key)})
        backbone = sum(k.startswith('backbone.') for k in state)
        print_log(f'Converted {what} in memory for {type(model).__name__}: {backbone} '
                  'backbone tensors to the mmmetaformer layout (output norms '
                  + ', '.join(f'{a} -> {b}' for a, b in norms) + f'), {len(state) - backbone} '
                  'neck/head tensors as they are; optimizer state ignored', logger='current')
    return dict(meta=info.meta, state_dict=state), True
