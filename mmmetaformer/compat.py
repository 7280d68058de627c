"""Narrow runtime fixes for the pinned OpenMMLab stack.

Pinned: mmengine 0.10.7, mmcv 2.1.0, mmdet 3.3.0, mmseg 1.2.2, mmpretrain 1.2.0 on
torch 2.14, numpy 2.x, opencv 5, Python 3.11. Each ``_fix_*`` says what breaks and why
the patch is narrow, and first checks whether it is still needed (by probing the
failing behaviour, or against the last affected version); if not, it does nothing.
``apply()`` runs them all, idempotently; ``import mmmetaformer`` calls it.
"""
import contextlib
import functools
import importlib.util
import io
import pickle
import types
import warnings

import numpy as np
import torch

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
# The message hub state pickles ``HistoryBuffer`` objects holding numpy arrays (numpy
# ``_reconstruct``/``ndarray``/``dtype``/``scalar``) and, through
# ``HistoryBuffer.__getstate__``, its statistics functions, which pickle as
# ``builtins.getattr(HistoryBuffer, 'min')``; the real ``getattr`` cannot be
# allow-listed, as it would hand a pickle any attribute of any allowed object.
#
# Trust rule: no checkpoint is trusted to run code. Every file mmengine loads stays on
# ``weights_only=True``; only while ``CheckpointLoader.load_checkpoint`` runs, the
# allow-list is extended by exactly the data types mmengine's ``Runner`` saves. These
# constructors are inert (they build arrays, dtypes, scalars and a plain
# ``HistoryBuffer``); the name ``builtins.getattr`` is bound to a stand-in that
# resolves only ``HistoryBuffer``'s four built-in statistics and refuses anything
# else. So resume works for checkpoints from any mmengine Runner (this process, an
# earlier one, another machine) without trusting any path, and a foreign pickle
# that needs anything else is refused before any of its code runs.

_HISTORY_STATS = frozenset({'min', 'max', 'current', 'mean'})


def _history_buffer_getattr(obj, name):
    """``builtins.getattr`` as seen by checkpoints: only ``HistoryBuffer.<stat>``."""
    from mmengine.logging import HistoryBuffer
    if obj is HistoryBuffer and name in _HISTORY_STATS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'refusing getattr({obj!r}, {name!r}): only the HistoryBuffer statistics '
        f'{sorted(_HISTORY_STATS)} may be referenced by a checkpoint')


def _runner_checkpoint_globals():
    """The globals a checkpoint written by mmengine's ``Runner`` references."""
    from mmengine.logging import HistoryBuffer
    try:
        from numpy._core import multiarray
    except ImportError:  # older numpy
        from numpy.core import multiarray
    dtypes = {type(np.dtype(code)) for code in np.typecodes['All']}
    return [HistoryBuffer, np.ndarray, np.dtype, *sorted(dtypes, key=str),
            (_history_buffer_getattr, 'builtins.getattr')] + [
        (getattr(multiarray, fn), f'{mod}.multiarray.{fn}')
        for fn in ('_reconstruct', 'scalar')
        for mod in ('numpy._core', 'numpy.core')]  # numpy 2 / numpy 1 pickles


@contextlib.contextmanager
def runner_checkpoint_globals():
    """Let ``torch.load(weights_only=True)`` read mmengine Runner checkpoints here.

    Adds only the globals not allow-listed already, so leaving the block does not
    remove ones the user added with ``torch.serialization.add_safe_globals``.
    """
    known = torch.serialization.get_safe_globals()
    with torch.serialization.safe_globals(
            [g for g in _runner_checkpoint_globals() if g not in known]):
        yield


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
            with runner_checkpoint_globals():
                return load(cls, filename, map_location, logger)
        except pickle.UnpicklingError as err:
            if 'Weights only load failed' not in str(err):
                raise
            raise pickle.UnpicklingError(
                f'Refused to load checkpoint {filename!r} with '
                'torch.load(weights_only=True): it references Python objects '
                'beyond tensors and the data types mmengine Runner checkpoints '
                'use, and unpickling those could run arbitrary code. Nothing '
                'from it was executed. If you trust the file, re-save just its '
                'tensors (e.g. its "state_dict") and load that instead.\n'
                f'{err}') from err

    return load_checkpoint


def _fix_checkpoint_weights_only():
    if not _weights_only_rejects_history_buffer():
        return
    from mmengine.runner.checkpoint import CheckpointLoader
    _patch(CheckpointLoader, 'load_checkpoint', _checkpoint_loader_wrapper,
           classmethod_=True)


# --- 2. torchrun + gloo on a CPU-only host ------------------------------------------
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


# --- 3. numpy >= 2.4 removed ``np.in1d`` --------------------------------------------
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


_FIXES = (_fix_checkpoint_weights_only, _fix_cpu_distributed, _fix_retrieval_in1d)


def apply():
    """Apply every fix still needed by the installed stack (idempotent)."""
    for fix in _FIXES:
        fix()
