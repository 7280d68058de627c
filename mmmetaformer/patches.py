"""Every change ``import mmmetaformer`` makes to mmengine, mmcv and mmpretrain, in one list.

Pinned: mmengine 0.10.7, mmcv 2.1.0, mmdet 3.3.0, mmseg 1.2.2, mmpretrain 1.2.0 on torch 2.14,
numpy 2.x, Python 3.11. Each entry of :data:`PATCHES` names what it replaces, why, and a probe
(the failing behaviour, or the last affected version) that decides whether it is applied.
``MMMETAFORMER_DISABLE_PATCHES=all`` or a comma-separated list of names turns them off
(docs/safety.md). :func:`apply` runs the rest, idempotently; ``import mmmetaformer`` calls it.
"""
import contextlib
import contextvars
import functools
import glob
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import re
import types
import zipfile
from typing import Callable, List, NamedTuple, Optional

import numpy as np
import torch

from . import trust
from .checkpoints import CheckpointError, fit_checkpoint_to_model, read_checkpoint

_MARK = '_mmmetaformer_patch'


def _patch(owner, name, wrapper):
    """Replace ``owner.name`` with ``wrapper(original)``, once per process; a classmethod or
    staticmethod stays one."""
    original = inspect.getattr_static(owner, name)
    descriptor = type(original) if isinstance(original, (classmethod, staticmethod)) else None
    original = original.__func__ if descriptor else original
    if getattr(original, _MARK, False):
        return
    new = functools.wraps(original)(wrapper(original))
    setattr(new, _MARK, True)
    setattr(owner, name, descriptor(new) if descriptor else new)


def _calls(func_path: str, text: str) -> bool:
    """Whether the source of ``module:attr.attr`` contains ``text``; True when it cannot be read
    (then the fix stays on). Used where the failing behaviour needs a GPU-less process group or a
    whole Runner to show."""
    import inspect
    module, _, attrs = func_path.partition(':')
    try:
        obj = importlib.import_module(module)
        for attr in attrs.split('.'):
            obj = getattr(obj, attr)
        return text in inspect.getsource(obj)
    except (ImportError, AttributeError, OSError, TypeError):
        return True


def _empty_image_unnamed() -> bool:
    """Whether mmcv's ``LoadImageFromFile`` fails on a 0-byte image without naming it."""
    import tempfile
    from mmcv.transforms import LoadImageFromFile
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'empty.png')
        open(path, 'wb').close()
        try:
            LoadImageFromFile()(dict(img_path=path))
        except Exception as err:
            return path not in str(err)
    return False


# --- safe-load: mmengine reads checkpoints by the trust rule --------------------------------
# mmengine <= 0.10.7 does not pass ``weights_only``: under torch >= 2.6 (``weights_only=True``
# by default) its own Runner checkpoints fail to load (the message hub pickles numpy data), and
# its http(s)://, torchvision:// and open-mmlab:// loader, ``torch.hub.load_state_dict_from_url``
# (``weights_only=False``; legacy zip files extracted into the cache), could run code or plant
# files. Local files and URLs go through :func:`~mmmetaformer.checkpoints.read_checkpoint`,
# other schemes through mmengine under the trust rule.

def _safe_loader_wrapper(load):

    def load_checkpoint(cls, filename, map_location=None, logger='current'):
        if '://' not in str(filename) or str(filename).startswith(('http://', 'https://')):
            return read_checkpoint(filename, map_location)
        return trust.inert(lambda: load(cls, filename, map_location, logger), str(filename))

    return load_checkpoint


def _load_url_wrapper(load_url):

    def load_url_(url, model_dir=None, map_location=None, progress=True, **kwargs):
        return read_checkpoint(url, map_location)

    return load_url_


def _apply_safe_load():
    from mmengine.runner import checkpoint
    _patch(checkpoint.CheckpointLoader, 'load_checkpoint', _safe_loader_wrapper)
    _patch(checkpoint, 'load_url', _load_url_wrapper)


# --- inert-config: no code from a checkpoint's meta['config'] -----------------------------
# mmengine <= 0.10.7's ``Runner.resume`` passes ``checkpoint['meta']['config']`` to
# ``Config.fromstring``, which executes it, only to read ``gpu_ids``: whatever a checkpoint puts
# there runs. ``Runner.load_checkpoint`` hands back that text reduced to the ``gpu_ids``
# assignment, read with ``ast`` (``trust.inert_config``).

def _inert_config_wrapper(load_checkpoint):

    def load_checkpoint_(self, *args, **kwargs):
        checkpoint = load_checkpoint(self, *args, **kwargs)
        meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
        if isinstance(meta, dict) and 'config' in meta:
            meta['config'] = trust.inert_config(meta['config'])
        return checkpoint

    return load_checkpoint_


def _apply_inert_config():
    from mmengine.runner import Runner
    _patch(Runner, 'load_checkpoint', _inert_config_wrapper)


# --- crash-safe-saves: a kill during a save keeps the last good checkpoint -----------------
# mmengine <= 0.10.7's ``save_checkpoint`` and ``CheckpointHook`` write checkpoints and
# ``last_checkpoint`` in place, and the hook removes the checkpoint beyond ``max_keep_ckpts``
# (and the previous best) *before* saving the new one: a kill during a save leaves no
# checkpoint, or an empty ``last_checkpoint``. Local saves and ``last_checkpoint`` go to a
# temporary file renamed when complete (:func:`atomic_save`), and the hook's removals wait
# until its save is done.

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextlib.contextmanager
def _replacing(path: str, mode: str = 'w', **kwargs):
    """A file opened for writing ``path`` whole: a temporary file in the same folder, renamed
    to ``path`` when complete (one left by a killed process is removed by the next save)."""
    folder = os.path.dirname(path) or '.'
    for stale in glob.glob(os.path.join(glob.escape(folder), '.*.tmp')):
        pid = re.search(r'\.(\d+)\.tmp$', stale)
        if pid and not _alive(int(pid[1])):
            os.remove(stale)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.tmp')
    try:
        with open(tmp, mode.replace('w', 'x'), **kwargs) as f:  # never through a file or link
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch's writer reports a full disk as RuntimeError
        raise OSError(f'cannot save checkpoint {path}: {err}') from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file: a reader, or a run killed
    meanwhile, sees the old file or the whole new one."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with _replacing(path, 'wb') as f:
        torch.save(obj, f)


def _atomic_save_wrapper(save):

    def save_checkpoint(checkpoint, filename, file_client_args=None, backend_args=None):
        from mmengine.fileio import LocalBackend, get_file_backend
        if file_client_args is None and isinstance(
                get_file_backend(filename, backend_args=backend_args), LocalBackend):
            return atomic_save(checkpoint, filename)
        return save(checkpoint, filename, file_client_args, backend_args)

    return save_checkpoint


class _DeferredRemovals:
    """A file backend whose ``remove``/``rmtree`` only note what to remove."""

    def __init__(self, backend):
        self.backend, self.removals = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def remove(self, path):
        self.removals.append((self.backend.remove, path))

    def rmtree(self, path):
        self.removals.append((self.backend.rmtree, path))


def _remove_after_save_wrapper(save):

    def save_(self, runner, *args, **kwargs):
        backend = self.file_backend
        self.file_backend = deferred = _DeferredRemovals(backend)
        try:
            save(self, runner, *args, **kwargs)
        finally:
            self.file_backend = backend
        current = {getattr(self, 'last_ckpt', None), getattr(self, 'best_ckpt_path', None),
                   *getattr(self, 'best_ckpt_path_dict', {}).values()}
        for remove, path in deferred.removals:
            if path not in current and backend.exists(path):
                remove(path)

    return save_


def _apply_crash_safe_saves():
    from mmengine.hooks import CheckpointHook, checkpoint_hook
    from mmengine import runner as runner_package
    from mmengine.runner import checkpoint
    from mmengine.runner import runner as runner_module
    for module in (checkpoint, runner_module, runner_package):  # imported by name
        _patch(module, 'save_checkpoint', _atomic_save_wrapper)
    for name in ('_save_checkpoint_with_step', '_save_best_checkpoint'):
        _patch(CheckpointHook, name, _remove_after_save_wrapper)
    checkpoint_hook.open = _replacing  # the module opens only last_checkpoint, to write it


# --- intact-resume: resume skips a damaged latest checkpoint -------------------------------
# mmengine <= 0.10.7's ``--resume`` without a path follows ``last_checkpoint`` even to a
# damaged file (a 25-frame ``PytorchStreamReader`` traceback), and an empty one sends it to
# ''. ``find_latest_checkpoint`` returns the newest intact Runner checkpoint instead and says
# why; ``Runner.resume`` of a damaged file stops with one line naming the intact ones beside it.

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


def intact_checkpoints(*folders: str, newest_only: bool = False) -> List[str]:
    """The Runner checkpoints (``epoch_N.pth``, ``iter_N.pth``) in ``folders`` without
    :func:`damage`, newest first."""
    files = sorted({path for folder in folders for path in glob.glob(os.path.join(
        glob.escape(folder), '*.pth')) if re.fullmatch(r'(epoch|iter)_\d+\.pth',
                                                       os.path.basename(path))},
                   key=os.path.getmtime, reverse=True)
    intact = []
    for path in files:
        if damage(path) is None:
            intact.append(path)
            if newest_only:
                break
    return intact


def _intact_latest_wrapper(find_latest):

    def find_latest_checkpoint(path):
        latest = find_latest(path)  # None: no last_checkpoint; '': an empty one
        if latest is None or '://' in latest:
            return latest
        problem = damage(latest) if latest else 'is empty'
        if problem is None:
            return latest
        what = f'the latest checkpoint {latest}' if latest else f'{path}/last_checkpoint'
        folders = [os.path.dirname(latest) or path, path]
        intact = intact_checkpoints(*filter(os.path.isdir, folders), newest_only=True)
        if not intact:
            raise CheckpointError(f'cannot resume: {what} {problem}, and '
                                  f"{' or '.join(dict.fromkeys(folders))} holds no intact "
                                  'checkpoint')
        from mmengine.logging import print_log
        print_log(f'{what[0].upper()}{what[1:]} {problem}; resuming from {intact[0]}, the newest '
                  'intact checkpoint', logger='current', level=logging.WARNING)
        return intact[0]

    return find_latest_checkpoint


def _intact_resume_wrapper(resume):

    def resume_(self, filename, *args, **kwargs):
        problem = damage(filename) if '://' not in str(filename) else None
        if problem is not None:
            others = [p for p in intact_checkpoints(os.path.dirname(str(filename)) or '.')
                      if os.path.abspath(p) != os.path.abspath(str(filename))]
            raise CheckpointError(
                f'cannot resume from {filename}: it {problem}; ' + (
                    f"intact checkpoints beside it, newest first: {', '.join(others)}"
                    if others else 'there is no intact checkpoint beside it'))
        return resume(self, filename, *args, **kwargs)

    return resume_


def _apply_intact_resume():
    from mmengine.runner import Runner
    from mmengine.runner import runner as runner_module
    _patch(Runner, 'resume', _intact_resume_wrapper)
    _patch(runner_module, 'find_latest_checkpoint', _intact_latest_wrapper)


# --- dense-checkpoints: load_from takes the published PoolFormer detectors / segmentors ----
# mmengine loads a model's checkpoint in two steps, ``_load_checkpoint(filename)`` then
# ``_load_checkpoint_to_model(model, checkpoint)`` (``Runner.load_checkpoint`` and
# ``load_checkpoint`` alike, both looking the functions up at call time); the second, for a
# detector or segmentor whose backbone is this project's, converts a published PoolFormer file
# (:func:`~mmmetaformer.checkpoints.fit_checkpoint_to_model`) and loads it strictly. The first
# step hands the file name to the second, for the messages, in a context variable that holds
# the object it read: the name is used only for that very object, in the same thread.
_read = contextvars.ContextVar('mmmetaformer_read', default=(None, None))


def _read_wrapper(read):

    def _load_checkpoint(filename, *args, **kwargs):
        checkpoint = read(filename, *args, **kwargs)
        _read.set((checkpoint, str(filename)))
        return checkpoint

    return _load_checkpoint


def _load_to_model_wrapper(load):

    def _load_checkpoint_to_model(model, checkpoint, strict=False, logger=None,
                                  revise_keys=[(r'^module\.', '')]):  # noqa: B006 (mmengine's)
        from .models import MetaFormer
        read, source = _read.get()
        _read.set((None, None))
        if isinstance(getattr(model, 'backbone', None), MetaFormer) and \
                isinstance(checkpoint, dict):
            checkpoint, strict = fit_checkpoint_to_model(
                model, checkpoint, source if read is checkpoint else '<checkpoint>', strict)
        return load(model, checkpoint, strict, logger, revise_keys)

    return _load_checkpoint_to_model


def _apply_dense_checkpoints():
    from mmengine.runner import checkpoint, runner
    for module in (checkpoint, runner):
        _patch(module, '_load_checkpoint', _read_wrapper)
        _patch(module, '_load_checkpoint_to_model', _load_to_model_wrapper)


# --- cpu-distributed: torchrun + gloo on a CPU-only host -----------------------------------
# mmengine <= 0.10.7 assumes one GPU per process under ``launcher='pytorch'``:
# ``_init_dist_pytorch`` calls ``torch.cuda.set_device(LOCAL_RANK)`` even for backend='gloo'
# (RuntimeError: Found no NVIDIA driver on your system), and ``Runner.wrap_model`` then gives
# DDP ``device_ids=[LOCAL_RANK]`` for a CPU model (ValueError: DistributedDataParallel
# device_ids and output_device arguments only work with single-device/multiple-device GPU
# modules or CPU modules ...). Both act only where the original can only fail (mmengine on the
# CPU / a module whose parameters are all on the CPU); GPU runs are untouched.

def _init_dist_pytorch_wrapper(init):

    def _init_dist_pytorch(backend, init_backend='torch', **kwargs):
        from mmengine.device import get_device
        if get_device() != 'cpu' or init_backend != 'torch':
            return init(backend, init_backend=init_backend, **kwargs)
        torch.distributed.init_process_group(backend=backend, **kwargs)

    return _init_dist_pytorch


def _ddp_init_wrapper(init):

    def __init__(self, module, *args, **kwargs):
        if kwargs.get('device_ids') and {
                p.device.type for p in module.parameters()} == {'cpu'}:
            kwargs['device_ids'] = None  # DDP's only valid value for CPU modules
        init(self, module, *args, **kwargs)

    return __init__


def _apply_cpu_distributed():
    from mmengine.dist import utils as dist_utils
    from mmengine.model import MMDistributedDataParallel
    _patch(dist_utils, '_init_dist_pytorch', _init_dist_pytorch_wrapper)
    _patch(MMDistributedDataParallel, '__init__', _ddp_init_wrapper)


# --- retrieval-in1d: numpy >= 2.4 removed ``np.in1d`` --------------------------------------
# mmpretrain 1.2.0's ``RetrievalRecall`` and ``RetrievalAveragePrecision`` (its
# ``metrics/retrieval.py``) call ``np.in1d``: AttributeError: module 'numpy' has no attribute
# 'in1d'. Only that module gets a numpy namespace with ``in1d = isin`` (equal for the 1-D
# arrays it passes); numpy itself is left alone.

def _apply_retrieval_in1d():
    from mmpretrain.evaluation.metrics import retrieval
    if hasattr(retrieval.np, 'in1d'):
        return
    numpy_ns = types.ModuleType(np.__name__, np.__doc__)
    numpy_ns.__dict__.update(vars(np), in1d=np.isin)
    retrieval.np = numpy_ns


# --- empty-image-name: an empty image file is named ----------------------------------------
# mmcv <= 2.2.0's ``LoadImageFromFile`` (used by mmdet, mmseg and mmpretrain pipelines) names
# an undecodable image, but a 0-byte one fails in OpenCV with ``cv2.error: ... !buf.empty()
# in function 'imdecode_'``, which does not say which file it was.

def _empty_image_wrapper(transform):

    def transform_(self, results):
        try:
            return transform(self, results)
        except Exception as err:
            path = results.get('img_path')
            if isinstance(path, str) and os.path.isfile(path) and not os.path.getsize(path):
                raise ValueError(f'cannot read image {path}: the file is empty (0 bytes)') \
                    from err
            raise

    return transform_


def _apply_empty_image_name():
    from mmcv.transforms import LoadImageFromFile
    _patch(LoadImageFromFile, 'transform', _empty_image_wrapper)


# --- config-scope: ``_base_ = 'mmmetaformer::coco/...'`` -----------------------------------
# mmengine reads such a base from ``<package>/.mim/configs`` and finds the package through
# ``MODULE2PACKAGE``. The value is a module of the package, not the distribution name:
# mmengine <= 0.10.7 looks a distribution up in site-packages, where an editable install
# (PEP 660) has no files, while a module is found where it is imported from.
# mmengine marks the settings of such a base with its scope (``_scope_``), where their types
# are looked up. The imagenet/ configs are mmpretrain configs written out in full (their types
# are mmpretrain's), so a base under imagenet/ is given the scope ``mmpretrain``.

def _scope_imagenet_configs(get_cfg_path):

    def _get_cfg_path(cfg_path, filename):
        path, scope = get_cfg_path(cfg_path, filename)
        if scope == 'mmmetaformer' and cfg_path.partition('::')[2].startswith('imagenet/'):
            scope = 'mmpretrain'
        return path, scope

    return _get_cfg_path


def _apply_config_scope():
    from mmengine.config import Config, utils
    _patch(Config, '_get_cfg_path', _scope_imagenet_configs)
    utils.MODULE2PACKAGE.setdefault('mmmetaformer', 'mmmetaformer.registry')
    # mmengine finds mmseg's configs (``mmseg::``) through the distribution mmsegmentation;
    # the fork installs the module as onedl-mmsegmentation, which the module name finds
    try:
        importlib.metadata.distribution(utils.MODULE2PACKAGE['mmseg'])
    except importlib.metadata.PackageNotFoundError:
        if importlib.util.find_spec('mmseg') is not None:
            utils.MODULE2PACKAGE['mmseg'] = 'mmseg'


class Patch(NamedTuple):
    name: str  # for MMMETAFORMER_DISABLE_PATCHES
    replaces: str
    needed: Callable[[], bool]  # the probe
    apply: Callable[[], None]


#: Every global change, in the order applied; the comment above each ``_apply_*`` says why.
PATCHES = (
    # The trust rule and crash safety: no mmengine release (upstream 0.10.7, onedl 0.10.12,
    # which even retries a refused load with weights_only=False) provides them, so they are on
    # unless turned off.
    Patch('safe-load', 'mmengine CheckpointLoader.load_checkpoint, checkpoint.load_url',
          lambda: True, _apply_safe_load),
    Patch('inert-config', 'mmengine Runner.load_checkpoint',
          lambda: _calls('mmengine.runner:Runner.resume', 'fromstring'), _apply_inert_config),
    Patch('crash-safe-saves', 'mmengine save_checkpoint (3 names), CheckpointHook.'
          '_save_checkpoint_with_step/_save_best_checkpoint, hooks.checkpoint_hook.open',
          lambda: True, _apply_crash_safe_saves),
    Patch('intact-resume', 'mmengine Runner.resume, runner.find_latest_checkpoint',
          lambda: True, _apply_intact_resume),
    Patch('dense-checkpoints', 'mmengine _load_checkpoint, _load_checkpoint_to_model '
          '(checkpoint and runner modules)', lambda: True, _apply_dense_checkpoints),
    Patch('cpu-distributed', 'mmengine dist.utils._init_dist_pytorch, '
          'MMDistributedDataParallel.__init__',
          lambda: _calls('mmengine.dist.utils:_init_dist_pytorch', 'set_device'),
          _apply_cpu_distributed),
    Patch('retrieval-in1d', "mmpretrain evaluation.metrics.retrieval's numpy namespace",
          lambda: not hasattr(np, 'in1d') and importlib.util.find_spec('mmpretrain') is not None,
          _apply_retrieval_in1d),
    Patch('empty-image-name', 'mmcv LoadImageFromFile.transform', _empty_image_unnamed,
          _apply_empty_image_name),
    Patch('config-scope', "mmengine config.utils.MODULE2PACKAGE: 'mmmetaformer' (and 'mmseg' "
          'where only the fork provides it), Config._get_cfg_path (imagenet/: mmpretrain)',
          lambda: True, _apply_config_scope),
)


def disabled() -> set:
    """The patch names ``MMMETAFORMER_DISABLE_PATCHES`` turns off."""
    names = {n.strip() for n in os.environ.get('MMMETAFORMER_DISABLE_PATCHES', '').split(',')
             if n.strip()}
    known = {p.name for p in PATCHES}
    if 'all' in names:
        return known
    if names - known:
        raise ValueError(f'MMMETAFORMER_DISABLE_PATCHES names unknown patches '
                         f'{sorted(names - known)}; known: all, {", ".join(sorted(known))}')
    return names


def apply():
    """Apply every patch the installed stack needs and the environment does not turn off."""
    off = disabled()
    for patch in PATCHES:
        if patch.name not in off and patch.needed():
            patch.apply()
