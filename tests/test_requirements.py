"""``import mmmetaformer`` checks the OpenMMLab modules it needs by import name and version
(the forks install them under other distribution names) and says what is wrong."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def import_with_mmcv(tmp_path, mmcv_init):
    """``import mmmetaformer`` in a fresh interpreter that finds ``mmcv`` as given."""
    (tmp_path / 'mmcv').mkdir()
    (tmp_path / 'mmcv' / '__init__.py').write_text(mmcv_init)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    return subprocess.run([sys.executable, '-c', 'import mmmetaformer'], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('mmcv_init, found', [
    ("__version__ = '1.7.2'\n", 'this environment has mmcv 1.7.2 at '),
    ("raise ImportError('libc10.so: cannot open shared object file')\n",
     'importing it failed: libc10.so: cannot open shared object file'),
])
def test_unusable_mmcv_is_named(tmp_path, mmcv_init, found):
    proc = import_with_mmcv(tmp_path, mmcv_init)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('ImportError: mmmetaformer needs the module mmcv >=2.0.0,<3.0.0 '
                           '(from mmcv or onedl-mmcv)')
    assert found in last and 'tools/setup_env.sh' in last



def site_without(tmp_path, module):
    """A site folder holding this environment's installed packages except ``module``, as an
    environment lacks it (setuptools >= 81 has no ``pkg_resources``)."""
    site = tmp_path / 'site'
    site.mkdir()
    for entry in Path(sysconfig.get_paths()['purelib']).iterdir():
        if entry.name != module:
            (site / entry.name).symlink_to(entry)
    return site


@pytest.mark.slow
def test_missing_pkg_resources_is_named_with_the_fix(tmp_path):
    """Upstream mmengine imports pkg_resources when a config names a package; without it,
    ``import mmmetaformer`` says so and gives the command that restores it."""
    site = site_without(tmp_path, 'pkg_resources')
    code = f'import site; site.addsitedir({str(site)!r}); import mmmetaformer'
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, '-S', '-c', code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('ImportError: mmengine ') and 'needs the module pkg_resources' in last
    assert f'{sys.executable} -m pip install "setuptools>=80,<81"' in last


def test_clone_folder_imported_as_the_package_is_named(tmp_path):
    """A script saved next to a clone named mmmetaformer imports the clone, not the package:
    one ImportError names the folder and the fix."""
    clone = tmp_path / 'mmmetaformer'
    clone.mkdir()
    shutil.copy(ROOT / '__init__.py', clone / '__init__.py')
    (clone / 'mmmetaformer').symlink_to(ROOT / 'mmmetaformer')
    (tmp_path / 'script.py').write_text('import mmmetaformer\n')
    proc = subprocess.run([sys.executable, 'script.py'], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f'ImportError: `import mmmetaformer` found {clone}, ')
    assert f'PYTHONPATH={clone}' in last
