"""The ``mmmetaformer`` registry scope, and every other registration ``import mmmetaformer``
makes: importing the package changes mmengine only through these public extension points.

- the registries below, children of mmengine's roots, so that configs of mmdet, mmseg and
  mmpretrain name ``type='mmmetaformer.CAFormer'``, ``runner_type='mmmetaformer.SafeRunner'``
  or ``dict(type='mmmetaformer.SafeCheckpointHook')`` once ``mmmetaformer`` is imported
  (``custom_imports=dict(imports=['mmmetaformer'], allow_failed_imports=False)``);
- :func:`register_extensions`: the checkpoint schemes of :mod:`mmmetaformer.sources`
  (``CheckpointLoader.register_scheme``: every checkpoint mmengine loads is read by the trust
  rule), the file backend ``'mmmetaformer_local'`` (:class:`~mmmetaformer.engine.hooks.
  AtomicLocalBackend`) and the config scope ``mmmetaformer::`` (mmengine's ``MODULE2PACKAGE``).
"""
import importlib.metadata
import importlib.util

from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import \
    OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import RUNNERS as MMENGINE_RUNNERS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmmetaformer',
                  locations=['mmmetaformer.models'])
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor', parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS,
    scope='mmmetaformer', locations=['mmmetaformer.engine'])
OPTIM_WRAPPERS = Registry('optim wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='mmmetaformer',
                          locations=['mmmetaformer.engine'])
RUNNERS = Registry('runner', parent=MMENGINE_RUNNERS, scope='mmmetaformer',
                   locations=['mmmetaformer.engine'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mmmetaformer',
                 locations=['mmmetaformer.engine'])


def register_extensions():
    """Register the checkpoint schemes, the file backend and the config scope (idempotent)."""
    from mmengine.config import utils
    from mmengine.fileio import register_backend
    from mmengine.runner import CheckpointLoader

    from .engine.hooks import AtomicLocalBackend
    from .sources import SCHEMES
    for prefixes, loader in SCHEMES.items():
        CheckpointLoader.register_scheme(prefixes, loader, force=True)
    register_backend('mmmetaformer_local', AtomicLocalBackend, force=True)
    # mmengine finds a scope's configs in <package>/.mim/configs through MODULE2PACKAGE. A
    # module of the package is named rather than its distribution: mmengine looks a
    # distribution up in site-packages, where an editable install (PEP 660) has no files, and
    # finds a module where it is imported from.
    utils.MODULE2PACKAGE.setdefault('mmmetaformer', 'mmmetaformer.registry')
    # The fork stack installs the module mmseg as the distribution onedl-mmsegmentation; the
    # module name finds it where the distribution name mmengine has for ``mmseg::`` does not.
    try:
        importlib.metadata.distribution(utils.MODULE2PACKAGE['mmseg'])
    except importlib.metadata.PackageNotFoundError:
        if importlib.util.find_spec('mmseg') is not None:
            utils.MODULE2PACKAGE['mmseg'] = 'mmseg'
