"""What mmmetaformer needs from the installed OpenMMLab stack, checked by module.

The upstream packages and their maintained forks (onedl-mmengine, onedl-mmcv, ...) install
the same modules under different distribution names, so the requirement is on the version of
the module that imports, checked when mmmetaformer is imported rather than by pip.
"""
import importlib
import importlib.metadata
import importlib.util

# module: (lowest accepted version, first version not accepted, the distributions providing it)
REQUIRED = {
    'mmengine': ('0.10.0', '1.0.0', 'mmengine or onedl-mmengine'),
    'mmcv': ('2.0.0', '3.0.0', 'mmcv or onedl-mmcv'),
}
_HOW = ('Install a stack with `bash tools/setup_env.sh` (see docs/get_started.md), or '
        'install the module from one of those distributions into this environment.')


def check():
    """Raise ImportError naming each required module that is missing or out of range."""
    for module, (low, high, dists) in REQUIRED.items():
        try:
            version = importlib.import_module(module).__version__
        except ImportError as err:
            raise ImportError(f'mmmetaformer needs the module {module} >={low},<{high} (from '
                              f'{dists}), and importing it failed: {err}. {_HOW}') from None
        from mmengine.utils import digit_version
        if not digit_version(low) <= digit_version(version) < digit_version(high):
            raise ImportError(f'mmmetaformer needs the module {module} >={low},<{high} (from '
                              f'{dists}); this environment has {module} {version} at '
                              f'{importlib.import_module(module).__file__}. {_HOW}')


def register_config_scope():
    """Let configs anywhere inherit ``_base_ = 'mmmetaformer::coco/...'`` as ``mmdet::``.

    mmengine reads such a base from ``<package>/.mim/configs`` and finds the package through
    ``MODULE2PACKAGE``. The value is a module of the package, not the distribution name:
    mmengine <= 0.10.7 looks a distribution up in site-packages, where an editable install
    (PEP 660) has no files, while a module is found where it is imported from.
    """
    from mmengine.config import utils
    utils.MODULE2PACKAGE.setdefault('mmmetaformer', 'mmmetaformer.registry')
    # mmengine finds mmseg's configs (``mmseg::``) through the distribution mmsegmentation;
    # the fork installs the module as onedl-mmsegmentation, which the module name finds
    try:
        importlib.metadata.distribution(utils.MODULE2PACKAGE['mmseg'])
    except importlib.metadata.PackageNotFoundError:
        if importlib.util.find_spec('mmseg') is not None:
            utils.MODULE2PACKAGE['mmseg'] = 'mmseg'
