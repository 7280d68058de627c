"""Read every published MetaFormer checkpoint layout safely, convert it and load it.

The layout of a file is detected from its keys (see :data:`FORMATS`) and converted in memory
to the *canonical* layout of this project's models:

- ``backbone.<name>``: :class:`~mmmetaformer.models.MetaFormer` names (timm's names, with
  Linear weights as 2-D tensors), output norms ``backbone.norm{i}`` only in files that were
  trained for dense prediction;
- ``head.norm.*`` (the official final ``norm``) and ``head.fc.*`` (the official ``head``;
  ``head.fc.fc1/norm/fc2`` for the MLP head): timm's names, used by the project's classifier.

Nothing in a file is ever run: safetensors files are read with safetensors, everything else
with ``torch.load(weights_only=True)`` allowing only the inert data types that an mmengine
``Runner`` checkpoint holds (see :mod:`mmmetaformer.trust`); tensors are validated before any
is copied (:func:`validate_tensors`).
"""
import glob
import hashlib
import os
import re
import shlex
import socket
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlparse

import torch
from mmengine.logging import print_log

from . import trust
from .archs import ARCHS

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

_WEIGHTS_KEYS = ('state_dict', 'model', 'module')  # where trainers keep the weights
_EMA_KEYS = ('state_dict_ema', 'model_ema')  # separate EMA copies (timm / DeiT trainers)
_OUT_NORM = re.compile(r'^norm\d+\.')
_LINEAR = re.compile(r'\.(mlp\.fc[12]|token_mixer\.(pwconv[12]|qkv|proj))\.weight$')


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the model."""


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


# --- reading -----------------------------------------------------------------------------

_SCHEMES = ('http://', 'https://', 'timm://')


def read_checkpoint(source: str):
    """The object stored at ``source`` (a path, an http(s) URL, ``timm://<hub name>`` or an
    mmengine file-backend URI), read without running any code from it."""
    source = str(source)
    if source.startswith('timm://'):
        return _read_file(_download_timm(source[len('timm://'):]), source)
    if source.startswith(('http://', 'https://')):
        return _read_file(_download_url(source), source)
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
            return _read_file(path, source)
    if not os.path.isfile(source):
        raise CheckpointError(f'checkpoint file not found: {source}')
    return _read_file(source, source)


def _read_file(path: str, source: str):
    with open(path, 'rb') as f:
        head = f.read(9)
    if len(head) == 9 and head[8:] == b'{':  # safetensors: u64 header size, then JSON
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as err:
            raise CheckpointError(_unreadable(source, err)) from err
    if not head.startswith((b'PK\x03\x04', b'\x80')):  # torch: a zip file or a pickle
        raise CheckpointError(
            f'cannot read {source}: it is not a checkpoint (neither a PyTorch file nor '
            f'safetensors; it starts with {head[:8]!r})' if head else
            f'cannot read {source}: the file is empty')
    try:
        return trust.load(path)
    except trust.RefusedCheckpoint as err:
        code = (f"import torch; ck = torch.load({path!r}, map_location='cpu', "
                "weights_only=False); torch.save(ck.get('state_dict', ck.get('model', ck)), "
                "'converted.pth')")
        raise CheckpointError(
            f'refused to load {source}: it is a pickle that needs more than tensors and plain '
            f'data ({err.reason}), and unpickling it could run arbitrary Python code or crash. '
            'A checkpoint only needs tensors, so nothing from it was built or executed. If you '
            'trust the file and where it came from, re-save just its tensors once and use the '
            'result instead:\n'
            f'  python -c {shlex.quote(code)}\n'
            '(or write them with safetensors.torch.save_file).') from None
    except Exception as err:
        raise CheckpointError(_unreadable(source, err)) from err


def _unreadable(source, err) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ''
    return (f'cannot read {source}: it is not a complete PyTorch or safetensors checkpoint '
            f'({type(err).__name__}: {first}). The file may be truncated (an interrupted '
            'download?): download it again.')


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


def atomic_save(obj, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder, renamed when
    complete: a reader, or a run killed meanwhile, sees the old file or the whole new one."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    os.makedirs(folder or '.', exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(folder or '.'), f'.{glob.escape(name)}.*.tmp')):
        os.remove(stale)  # left by a save that was killed
    tmp = os.path.join(folder, f'.{name}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'xb') as f:  # never through a file or link already there
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def damage(path: str) -> Optional[str]:
    """What is wrong with the checkpoint file ``path`` ('does not exist', 'is empty', ...), or
    None: a PyTorch zip file whose members all pass their CRC check (or a legacy pickle)."""
    if not os.path.isfile(path):
        return 'does not exist'
    with open(path, 'rb') as f:
        head = f.read(4)
    if not head:
        return 'is empty'
    if not head.startswith((b'PK\x03\x04', b'\x80')):
        return f'is not a checkpoint (it starts with {head!r})'
    if head.startswith(b'\x80'):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f'is incomplete or damaged (an interrupted save?): {err}'
    return f'is damaged (CRC error in {bad})' if bad else None


def intact_checkpoints(folder: str, newest_only: bool = False) -> List[str]:
    """The ``*.pth`` files in ``folder`` without :func:`damage`, newest first."""
    files = sorted(glob.glob(os.path.join(glob.escape(folder), '*.pth')), key=os.path.getmtime,
                   reverse=True)
    intact = []
    for path in files:
        if damage(path) is None:
            intact.append(path)
            if newest_only:
                break
    return intact


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


def load_checkpoint_file(checkpoint, use_ema: bool = False) -> Tuple[dict, CheckpointInfo]:
    """The flat state dict of a checkpoint (a path/URL or an already loaded object).

    Unwraps ``state_dict``/``model``/``module`` and ``module.`` prefixes and handles EMA
    copies: mmengine's EMAHook saves the EMA weights as ``state_dict`` (the raw ones, in
    ``ema_state_dict``, are ignored); a separate copy (timm ``state_dict_ema``, mmcv 1.x
    ``ema_*`` buffers) is ignored unless ``use_ema``.
    """
    if isinstance(checkpoint, Mapping):
        obj, info = checkpoint, CheckpointInfo('<state dict>')
    else:
        obj, info = read_checkpoint(checkpoint), CheckpointInfo(str(checkpoint))
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{info.source} holds a {type(obj).__name__}, not a state dict')
    if isinstance(obj.get('meta'), Mapping):
        info.meta = dict(obj['meta'])
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
    other = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    info.ignore('non-tensor entries', other)
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f'{info.source} holds no tensors (top-level keys: {list(obj)[:8]})')
    return state, info


# --- converting ----------------------------------------------------------------------------

def detect_format(state_dict: Mapping) -> str:
    """The name of the layout of ``state_dict`` in :data:`FORMATS`."""
    for name, (signature, _) in FORMATS.items():
        if signature in state_dict:
            return name
    raise CheckpointError(
        'unrecognised checkpoint layout (first keys: '
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


def convert_to_canonical(state_dict: Mapping, info: Optional[CheckpointInfo] = None
                         ) -> Tuple[dict, CheckpointInfo]:
    """``state_dict`` in the canonical ``backbone.*``/``head.*`` layout, and what was found.

    Keys outside the model (a detector's neck and heads, ...) are recorded in
    ``info.ignored``; unknown keys of the unprefixed layouts become ``backbone.*`` keys, so
    that loading reports them as unexpected.
    """
    info = info or CheckpointInfo('<state dict>')
    info.format = detect_format(state_dict)
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
        if _LINEAR.search(new) and value.dim() == 4 and value.shape[2:] == (1, 1):
            value = value.reshape(value.shape[:2])  # 1x1 conv weight -> Linear weight
        canonical[new] = value
        info.source_keys[new] = key
    info.ignore('other model parts', other)
    info.arch_guesses = guess_arch(
        {k[len('backbone.'):]: v for k, v in canonical.items() if k.startswith('backbone.')})
    return canonical, info


def read_canonical(checkpoint, prefix: Optional[str] = None, use_ema: bool = False
                   ) -> Tuple[dict, CheckpointInfo]:
    """Read ``checkpoint`` (path, URL, ``timm://name`` or a loaded dict) and convert it;
    ``prefix`` (mmengine's convention) first keeps only the keys under it, stripped."""
    state, info = load_checkpoint_file(checkpoint, use_ema)
    if prefix:
        under = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not under:
            tops = sorted({k.split('.')[0] + '.' for k in state})
            raise CheckpointError(f'{info.source} has no keys under prefix {prefix!r} '
                                  f'(its top-level prefixes: {tops[:10]})')
        state = under
    return convert_to_canonical(state, info)


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


def check_fit(backbone_state: Mapping, expected: Mapping[str, torch.Size], info: CheckpointInfo,
              target: str, target_settings: Mapping) -> dict:
    """The tensors of ``backbone_state`` to load into a backbone whose tensors are
    ``expected``; every backbone tensor but the output norms must be present with its shape.

    Otherwise raises :class:`CheckpointError` saying what the checkpoint looks like
    (``info.arch_guesses``) and which tensors do not fit.
    """
    missing = [k for k in expected if k not in backbone_state and not _OUT_NORM.match(k)]
    unexpected = [k for k in backbone_state if k not in expected and not _OUT_NORM.match(k)]
    wrong = [k for k in backbone_state
             if k in expected and tuple(backbone_state[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        ignored = [k for k in backbone_state if k not in expected]
        info.ignore('output norms the backbone does not have', ignored)
        fitting = {k: v for k, v in backbone_state.items() if k in expected}
        validate_tensors(fitting, f'checkpoint {info.describe()}')
        return fitting

    found = describe_backbone(backbone_state)
    guesses = info.arch_guesses
    looks = f"looks like {'/'.join(guesses)}" if guesses else 'matches no published arch'
    want = dict(target_settings, mixers=_mixer_kinds(target_settings['mixers']))
    same_arch = target in guesses
    if same_arch:
        lines = [f"checkpoint {info.describe()} {looks}, the backbone's arch, but its tensors "
                 'do not fit:']
    else:
        lines = [f'checkpoint {info.describe()} has {_layout(found)} ({looks}) but the '
                 f'backbone is {target} ({_layout(want)}):']

    def show(keys):
        def name(k):  # with the checkpoint's own key where it differs
            src = info.source_keys.get('backbone.' + k, k)
            return k if src in (k, 'backbone.' + k) else f'{k} (checkpoint key {src!r})'
        more = f' and {len(keys) - 5} more' if len(keys) > 5 else ''
        return ', '.join(map(name, keys[:5])) + more

    if missing:
        lines.append(f'  missing {len(missing)} tensors: {show(missing)}')
    if unexpected:
        lines.append(f'  unexpected {len(unexpected)} tensors: {show(unexpected)}')
    for k in wrong[:5]:
        lines.append(f'  wrong shape: {k}: checkpoint {tuple(backbone_state[k].shape)}, '
                     f'backbone {tuple(expected[k])}')
    if len(wrong) > 5:
        lines.append(f'  and {len(wrong) - 5} more tensors of the wrong shape')
    lines.append('Nothing was loaded.' if same_arch else 'Nothing was loaded: use the backbone '
                 'arch the checkpoint was trained with, or a checkpoint of this arch.')
    raise CheckpointError('\n'.join(lines))


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _kind(dtype: torch.dtype) -> str:
    """'float', 'integer' or the dtype's name (bool, complex, float8, quantized, ...)."""
    return 'float' if dtype in _FLOATS else 'integer' if dtype in _INTS else \
        str(dtype).replace('torch.', '')


def validate_tensors(state: Mapping[str, torch.Tensor], source: str,
                     like: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Refuse, before anything is copied, tensors that cannot be loaded as they are: not dense
    (sparse, meta, ...), of another kind of dtype than ``like[key]`` (float16/bfloat16/float32/
    float64 where ``like`` has no such key: every MetaFormer tensor is a float one), or float
    tensors holding NaN or Inf. Raises :class:`CheckpointError` naming ``source`` and the
    tensors."""
    lines = []
    for key, t in state.items():
        want = _kind(like[key].dtype) if like is not None and key in like else 'float'
        if t.layout != torch.strided or t.device.type == 'meta':
            lines.append(f'  {key}: a {t.layout} tensor on {t.device.type}, not a dense one')
        elif _kind(t.dtype) != want:
            lines.append(f'  {key}: {_kind(t.dtype)} values ({t.dtype}) where {want} values '
                         'belong')
    nonfinite = {key: t.numel() - int(torch.isfinite(t).sum()) for key, t in state.items()
                 if t.layout == torch.strided and t.device.type != 'meta' and t.dtype in _FLOATS
                 and not torch.isfinite(t).all()}
    if nonfinite:
        shown = ', '.join(f'{k} ({n} of {state[k].numel()})' for k, n in
                          list(nonfinite.items())[:5])
        more = f' and {len(nonfinite) - 5} more tensors' if len(nonfinite) > 5 else ''
        lines.append(f'  {sum(nonfinite.values())} NaN/Inf values in {len(nonfinite)} '
                     f'tensors: {shown}{more}')
    if lines:
        raise CheckpointError('\n'.join([f'{source} holds tensors that cannot be loaded:',
                                         *lines[:8], 'Nothing was loaded.']))


def summarize(info: CheckpointInfo) -> str:
    """The notes and deliberately ignored keys, for the log."""
    parts = list(info.notes)
    for reason, keys in info.ignored.items():
        if keys:
            more = f', ... ({len(keys)} in all)' if len(keys) > 3 else ''
            parts.append(f"ignored {reason}: {', '.join(keys[:3])}{more}")
    return '; '.join(parts)


def load_pretrained(backbone, checkpoint, prefix: Optional[str] = None,
                    use_ema: bool = False) -> CheckpointInfo:
    """Load any supported checkpoint into a :class:`~mmmetaformer.models.MetaFormer`.

    Strict for the backbone (all tensors but the output norms, right shapes, nothing
    unknown); the classifier head and EMA copies are ignored and logged.
    """
    state, info = read_canonical(checkpoint, prefix, use_ema)
    weights = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    info.ignore('classifier head', [k for k in state if k.startswith('head.')])
    name = arch_name(backbone.arch_settings)
    target = name or f'a custom {type(backbone).__name__} arch'
    expected = {k: v.shape for k, v in backbone.state_dict().items()}
    weights = check_fit(weights, expected, info, target, backbone.arch_settings)
    backbone.load_state_dict(weights, strict=False)
    new = sorted({k.split('.')[0] for k in expected if k not in weights})
    msg = (f'Loaded {len(weights)} tensors from {info.describe()} into '
           f'{type(backbone).__name__} ({target})')
    if new:
        msg += f"; output norms {', '.join(new)} are new layers, not in the checkpoint"
    extra = summarize(info)
    print_log(msg + (f'; {extra}' if extra else ''), logger='current')
    return info
