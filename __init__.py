"""The root of the mmmetaformer repository, which is not the package (that is ``mmmetaformer/``).

In a clone named mmmetaformer, ``import mmmetaformer`` finds this folder whenever the folder
holding the clone comes first on ``sys.path`` (a script saved there, or Python started there):
without this file it would import as an empty namespace package, with nothing registered and
a confusing error much later. pytest imports this file too (a folder with an ``__init__.py`` is a
test package): tests/conftest.py imports the package first, which pytest then reuses.
"""
import os.path as osp

if __name__ == 'mmmetaformer':
    _CLONE = osp.dirname(osp.abspath(__file__))
    raise ImportError(
        f'`import mmmetaformer` found {_CLONE}, the clone of the mmmetaformer repository, '
        f'instead of the package inside it: Python looks first in {osp.dirname(_CLONE)}, the '
        'folder of the script (or the current folder). Move the script or start Python in '
        f'another folder, with the package installed (pip install -e {_CLONE}), or run with '
        f'PYTHONPATH={_CLONE}.', name=__name__)
