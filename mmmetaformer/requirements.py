"""What mmmetaformer needs from the installed OpenMMLab stack, checked by module.

The upstream packages and their maintained forks (onedl-mmengine, onedl-mmcv, ...) install
the same modules under different distribution names, so the requirement is on the version of
the module that imports, checked when mmmetaformer is imported rather than by pip. Nothing is
changed: a missing or unusable module is an ImportError that says how to fix it.
"""
import importlib
import importlib.metadata
import importlib.util
import sys

# module: (lowest accepted version, first version not accepted, the distributions providing it)
REQUIRED = {
    'mmengine': ('0.10.0', '1.0.0', 'mmengine or onedl-mmengine'),
    'mmcv': ('2.0.0', '3.0.0', 'mmcv or onedl-mmcv'),
}
_HOW = ('Install a stack with `bash tools/setup_env.sh` (see docs/get_started.md), or '
        'install the module from one of those distributions into this environment.')


def check():
    """Raise ImportError naming each required module that is missing or out of range."""
    _check_versions()
    _check_pkg_resources()


def _check_versions():
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


def _check_pkg_resources():
    """Upstream mmengine reads installed packages with ``pkg_resources`` (for a config naming
    ``mmdet::...``, say), which setuptools 81 and later no longer ship; the forks do not."""
    if importlib.util.find_spec('pkg_resources') is not None:
        return
    from mmengine import __version__ as mmengine_version
    from mmengine.utils import is_installed
    try:
        is_installed('mmengine')
    except ModuleNotFoundError as err:
        if err.name != 'pkg_resources':
            raise
        try:
            setuptools = 'setuptools ' + importlib.metadata.version('setuptools')
        except importlib.metadata.PackageNotFoundError:
            setuptools = 'no setuptools'
        raise ImportError(
            f'mmengine {mmengine_version} needs the module pkg_resources, which this '
            f'environment lacks ({setuptools}; setuptools 81 and later do not provide it). Fix: '
            f'{sys.executable} -m pip install "setuptools>=80,<81" (docs/get_started.md, '
            'Troubleshooting).') from None
