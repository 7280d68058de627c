"""Narrow runtime fixes for the pinned OpenMMLab stack.

Pinned: mmengine 0.10.7, mmcv 2.1.0, mmdet 3.3.0, mmseg 1.2.2, mmpretrain 1.2.0 on
torch 2.14, numpy 2.x, opencv 5, Python 3.11. Each ``_fix_*`` says what breaks and why
the patch is narrow, and first checks whether it is still needed (by probing the
failing behaviour, or against the last affected version); if not, it does nothing.
``apply()`` runs them all, idempotently; ``import mmmetaformer`` calls it.
"""
import functools
import importlib.util
import io
import logging
import os
import pickle
import types
import warnings

import numpy as np
import torch

from . import trust

_MARK = '_mmmetaformer_compat'


def _patch(owner, name, wrapper, *, classmethod_=False):
    """Replace ``owner.name`` with ``wrapper(original)``, once per process."""
    original = getattr(owner, name)
    if getattr(original, _MARK, False):
        return
    original = original.__func__ if classmethod_ else original
    new = functools.wraps(original)(wrapper(original))
    setattr(new, _MARK, True)
    setattr(owner, name, classmethod(new) if classmethod_ else new)


# --- 1. mmengine checkpoints under torch.load(weights_only=True) -----------------
# torch >= 2.6 defaults ``torch.load`` to ``weights_only=True``; mmengine 0.10.7 does
# not pass ``weights_only``, so ``Runner(resume=True)`` / ``load_from`` of a
# checkpoint that mmengine's own Runner wrote fails with
#   UnpicklingError: Weights only load failed ... Unsupported global: GLOBAL
#   mmengine.logging.history_buffer.HistoryBuffer was not an allowed global
# (the message hub pickles ``HistoryBuffer`` objects holding numpy arrays). While
# ``CheckpointLoader.load_checkpoint`` runs, files are read by the trust rule of
# :mod:`mmmetaformer.trust`: the Runner's numpy and ``HistoryBuffer`` data as validated
# inert data, nothing else. So resume works for checkpoints from any mmengine Runner,
# without trusting any path, and a pickle that needs more is refused before any of its
# code runs, leaving no trace. Its http(s):// (and torchvision://, open-mmlab://) loader
# goes through ``torch.hub.load_state_dict_from_url``, whose default is
# ``weights_only=False``: any such URL in ``load_from`` could run code. It now passes
# ``weights_only=True`` and caches under a name made from the whole URL (by default two
# URLs ending in the same file name share one cache entry).

def _weights_only_rejects_history_buffer():
    from mmengine.logging import HistoryBuffer
    buf = io.BytesIO()
    torch.save({'hb': HistoryBuffer([1.0], [1])}, buf)
    buf.seek(0)
    try:
        with warnings.catch_warnings():  # torch 2.4/2.5 warn about the default
            warnings.simplefilter('ignore', FutureWarning)
            torch.load(buf)
    except pickle.UnpicklingError:
        return True
    return False


def _checkpoint_loader_wrapper(load):

    def load_checkpoint(cls, filename, map_location=None, logger='current'):
        try:
            return trust.inert(lambda: load(cls, filename, map_location, logger), filename)
        except trust.RefusedCheckpoint as err:
            raise trust.RefusedCheckpoint(
                filename, err.reason, f'Refused to load checkpoint {filename!r} with '
                'torch.load(weights_only=True): it holds more than tensors and the '
                'data types mmengine Runner checkpoints use, and unpickling it could run '
                'arbitrary code. Nothing from it was executed. If you trust the file, '
                're-save just its tensors (e.g. its "state_dict") and load that '
                f'instead.\n{err.reason}') from None

    return load_checkpoint


def _weights_only_load_url_wrapper(load_url):

    def load_url_(url, model_dir=None, map_location=None, progress=True, **kwargs):
        from .checkpoints import url_cache_name
        return torch.hub.load_state_dict_from_url(
            url, model_dir, map_location, progress, file_name=url_cache_name(url),
            weights_only=True)

    return load_url_


def _fix_checkpoint_weights_only():
    if not _weights_only_rejects_history_buffer():
        return
    from mmengine.runner import checkpoint
    _patch(checkpoint.CheckpointLoader, 'load_checkpoint', _checkpoint_loader_wrapper,
           classmethod_=True)
    _patch(checkpoint, 'load_url', _weights_only_load_url_wrapper)


# --- 2. mmengine Runner checkpoints: code in meta['config'], non-atomic saves --------
# mmengine <= 0.10.7:
# - ``Runner.resume`` passes ``checkpoint['meta']['config']`` to ``Config.fromstring``,
#   which executes it, only to read ``gpu_ids``: whatever a checkpoint puts there runs.
#   The Runner's ``load_checkpoint`` now hands back that text reduced to the ``gpu_ids``
#   assignment, read with ``ast`` (``trust.inert_config``).
# - ``save_checkpoint`` writes the file in place and ``CheckpointHook`` removes the
#   checkpoint beyond ``max_keep_ckpts`` (and the previous best) *before* saving the new
#   one, so a kill during a save leaves no checkpoint. Local saves now go to a temporary
#   file in the same folder, renamed when complete (``checkpoints.atomic_save``), and the
#   hook's removals wait until its save is done.
# - ``--resume`` without a path follows ``last_checkpoint`` even to a damaged file (a
#   25-frame ``PytorchStreamReader`` traceback): ``find_latest_checkpoint`` now returns
#   the newest intact checkpoint and says why; ``Runner.resume`` of a damaged file stops
#   with one line naming it and the intact ones beside it.

def _inert_config_wrapper(load_checkpoint):

    def load_checkpoint_(self, *args, **kwargs):
        checkpoint = load_checkpoint(self, *args, **kwargs)
        meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
        if isinstance(meta, dict) and 'config' in meta:
            meta['config'] = trust.inert_config(meta['config'])
        return checkpoint

    return load_checkpoint_


def _atomic_save_wrapper(save):

    def save_checkpoint(checkpoint, filename, file_client_args=None, backend_args=None):
        from mmengine.fileio import LocalBackend, get_file_backend
        if file_client_args is None and isinstance(
                get_file_backend(filename, backend_args=backend_args), LocalBackend):
            from .checkpoints import atomic_save
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


def _intact_latest_wrapper(find_latest):

    def find_latest_checkpoint(path):
        from .checkpoints import CheckpointError, damage, intact_checkpoints
        latest = find_latest(path)
        problem = damage(latest) if latest and '://' not in latest else None
        if problem is None:
            return latest
        intact = intact_checkpoints(os.path.dirname(latest) or path, newest_only=True)
        if not intact:
            raise CheckpointError(
                f'cannot resume: the latest checkpoint {latest} {problem}, and '
                f'{os.path.dirname(latest) or path} holds no intact checkpoint')
        from mmengine.logging import print_log
        print_log(f'The latest checkpoint {latest} {problem}; resuming from {intact[0]}, '
                  'the newest intact checkpoint', logger='current', level=logging.WARNING)
        return intact[0]

    return find_latest_checkpoint


def _intact_resume_wrapper(resume):

    def resume_(self, filename, *args, **kwargs):
        from .checkpoints import CheckpointError, damage, intact_checkpoints
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


def _fix_runner_checkpoints():
    if not _mmengine_at_most('0.10.7'):
        return
    from mmengine.hooks import CheckpointHook
    from mmengine import runner as runner_package
    from mmengine.runner import Runner, checkpoint
    from mmengine.runner import runner as runner_module
    _patch(Runner, 'load_checkpoint', _inert_config_wrapper)
    _patch(Runner, 'resume', _intact_resume_wrapper)
    for module in (checkpoint, runner_module, runner_package):  # imported by name
        _patch(module, 'save_checkpoint', _atomic_save_wrapper)
    _patch(runner_module, 'find_latest_checkpoint', _intact_latest_wrapper)
    for name in ('_save_checkpoint_with_step', '_save_best_checkpoint'):
        _patch(CheckpointHook, name, _remove_after_save_wrapper)


# --- 3. torchrun + gloo on a CPU-only host ------------------------------------------
# mmengine <= 0.10.7 assumes one GPU per process under ``launcher='pytorch'``:
# ``_init_dist_pytorch`` calls ``torch.cuda.set_device(LOCAL_RANK)`` even for
# backend='gloo' (RuntimeError: Found no NVIDIA driver on your system), and
# ``Runner.wrap_model`` then gives DDP ``device_ids=[LOCAL_RANK]`` for a CPU model
# (ValueError: DistributedDataParallel device_ids and output_device arguments only work
# with single-device/multiple-device GPU modules or CPU modules ...). Both patches act
# only when mmengine runs on the CPU (no accelerator) / the module's parameters are
# all on the CPU, where the original code can only fail; GPU runs are untouched.

def _mmengine_at_most(version):
    import mmengine
    from mmengine.utils import digit_version
    return digit_version(mmengine.__version__) <= digit_version(version)


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


def _fix_cpu_distributed():
    if not _mmengine_at_most('0.10.7'):
        return
    from mmengine.dist import utils as dist_utils
    from mmengine.model import MMDistributedDataParallel
    _patch(dist_utils, '_init_dist_pytorch', _init_dist_pytorch_wrapper)
    _patch(MMDistributedDataParallel, '__init__', _ddp_init_wrapper)


# --- 4. numpy >= 2.4 removed ``np.in1d`` --------------------------------------------
# mmpretrain 1.2.0's ``RetrievalRecall`` and ``RetrievalAveragePrecision`` (its
# ``metrics/retrieval.py``) call ``np.in1d``, deprecated in numpy 2.0 and removed in
# 2.4: AttributeError: module 'numpy' has no attribute 'in1d'. Only that module gets
# a numpy namespace with ``in1d = isin`` (equal for the 1-D arrays it passes); numpy
# itself is left alone.

def _fix_retrieval_in1d():
    if hasattr(np, 'in1d') or importlib.util.find_spec('mmpretrain') is None:
        return
    from mmpretrain.evaluation.metrics import retrieval
    if hasattr(retrieval.np, 'in1d'):
        return
    numpy_ns = types.ModuleType(np.__name__, np.__doc__)
    numpy_ns.__dict__.update(vars(np), in1d=np.isin)
    retrieval.np = numpy_ns


# --- 5. an empty image file is not named ------------------------------------------------
# mmcv <= 2.2.0's ``LoadImageFromFile`` (used by mmdet, mmseg and mmpretrain pipelines) names
# an undecodable image, but a 0-byte one fails in OpenCV with ``cv2.error: ... !buf.empty()
# in function 'imdecode_'``, which does not say which file it was. That error now does.

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


def _fix_unnamed_empty_image():
    import mmcv
    from mmengine.utils import digit_version
    if digit_version(mmcv.__version__) > digit_version('2.2.0'):
        return
    from mmcv.transforms import LoadImageFromFile
    _patch(LoadImageFromFile, 'transform', _empty_image_wrapper)


_FIXES = (_fix_checkpoint_weights_only, _fix_runner_checkpoints, _fix_cpu_distributed,
          _fix_retrieval_in1d, _fix_unnamed_empty_image)


def apply():
    """Apply every fix still needed by the installed stack (idempotent)."""
    for fix in _FIXES:
        fix()
