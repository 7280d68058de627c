"""``mim`` (onedl-mim) on this package: ``mim search`` lists the model index, ``mim download``
writes a config with its weights (from a local server) and writes nothing offline, ``mim train``
and ``mim test`` run the tools; a wheel carries the index, the configs and the tools.

mim runs on an editable install of a copy of this checkout (the install tools/setup_env.sh
makes); onedl-mim 0.5.1 cannot locate regular installs (docs/get_started.md, "mim").
"""
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
from mim.commands.search import convert2df, filter_by_models, filter_by_training_datasets
from modelindex.load_model_index import load

from demo_data import write_coco_demo

pytestmark = pytest.mark.slow  # not in `make test-quick`

ROOT = Path(__file__).resolve().parents[1]
WEIGHT = 'https://huggingface.co/sail/dl/resolve/main/caformer/caformer_s18.pth'
DEMO = 'configs/demo/caformer_s18_maskrcnn_demo.py'
MIM = Path(sys.executable).with_name('mim')
# what a checkout holds beside its source (setup_env's environments, outputs)
NOT_SOURCE = shutil.ignore_patterns('.git', '.venv*', 'build', '*.egg-info', '__pycache__',
                                    'data', 'work_dirs')


def pip_install(source, site, *options):
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-index',
                    '--no-build-isolation', '--target', str(site), *options, str(source)],
                   check=True, capture_output=True, timeout=600)
    return site


@pytest.fixture(scope='module')
def checkout(tmp_path_factory):
    """A copy of this checkout (the download test points one weight at a local server),
    installed in editable mode into ``site``: ``(checkout, site)``."""
    folder = tmp_path_factory.mktemp('mim')
    shutil.copytree(ROOT, folder / 'checkout', symlinks=True, ignore=NOT_SOURCE)
    return folder / 'checkout', pip_install(folder / 'checkout', folder / 'site', '-e')


def mim(checkout, *args, cwd=None, **env):
    """The ``mim`` command, with the editable install and its package first on the path (the
    command itself: ``python -m mim`` would put the working directory first, and a checkout's
    mmmetaformer.egg-info there before the install)."""
    path = os.pathsep.join([str(checkout[1]), str(checkout[0])])
    return subprocess.run([str(MIM), *args], cwd=cwd or checkout[0], capture_output=True,
                          env=dict(os.environ, PYTHONPATH=path, **env), text=True, timeout=600)


def listed(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return sorted(re.findall(r'^config id: (\S+)$', proc.stdout, re.M))


def test_search_lists_the_index(checkout):
    """``mim search mmmetaformer`` lists every entry; its filters (``--model caformer
    --dataset coco``, mim's functions here) select by the index's fields."""
    table = convert2df(load(str(ROOT / 'model-index.yml')))
    assert listed(mim(checkout, 'search', 'mmmetaformer')) == sorted(table.index)
    coco = table[(table['model'] == 'caformer') & (table['training_data'] == 'coco')]
    assert len(coco) == 16
    found = filter_by_training_datasets(filter_by_models(table, ['caformer']), ['coco'])
    assert sorted(found.index) == sorted(coco.index)


def serve(folder):
    """An HTTP server of ``folder`` on a free local port, in a thread."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_writes_config_and_weights(checkout, tmp_path):
    """caformer_s18_in1k, its weight served from a local folder."""
    from mmengine.config import Config
    served = tmp_path / 'served'
    served.mkdir()
    torch.save({'stem.weight': torch.randn(4, 3, 7, 7)}, served / 'caformer_s18.pth')
    server = serve(served)
    metafile = checkout[0] / 'configs' / 'caformer' / 'metafile.yml'
    original = metafile.read_text()
    url = f'http://127.0.0.1:{server.server_port}/caformer_s18.pth'
    metafile.write_text(original.replace(f'Weights: {WEIGHT}\n', f'Weights: {url}\n', 1))
    dest = tmp_path / 'dest'
    try:
        proc = mim(checkout, 'download', 'mmmetaformer', '--config', 'caformer_s18_in1k',
                   '--dest', str(dest), NO_PROXY='127.0.0.1', no_proxy='127.0.0.1')
    finally:
        server.shutdown()
        metafile.write_text(original)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in dest.iterdir()) == ['caformer_s18.pth', 'caformer_s18_in1k.py']
    assert (dest / 'caformer_s18.pth').read_bytes() == (served / 'caformer_s18.pth').read_bytes()
    written = Config.fromfile(str(dest / 'caformer_s18_in1k.py'))
    config = Config.fromfile(str(ROOT / 'configs' / 'imagenet' / 'caformer_s18_in1k.py'))
    assert written.model == config.model and written.train_cfg == config.train_cfg


def test_download_offline(checkout, tmp_path):
    """Without a connection nothing is written; with the weight file already in --dest, mim
    writes the config alone."""
    offline = dict(HTTPS_PROXY='http://127.0.0.1:9', https_proxy='http://127.0.0.1:9',
                   NO_PROXY='', no_proxy='')
    dest = tmp_path / 'dest'
    args = ('download', 'mmmetaformer', '--config', 'caformer_s18_in1k', '--dest', str(dest))
    proc = mim(checkout, *args, **offline)
    assert proc.returncode != 0 and 'huggingface.co' in proc.stderr
    assert list(dest.iterdir()) == []
    (dest / 'caformer_s18.pth').write_bytes(b'downloaded elsewhere')
    proc = mim(checkout, *args, **offline)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in dest.iterdir()) == ['caformer_s18.pth', 'caformer_s18_in1k.py']


def test_wheel_carries_index_configs_and_tools(checkout, tmp_path):
    """A regular install holds mmmetaformer/.mim with real files: the index as mim reads it,
    every config it names, the tools; and mmengine finds a model's weights through it."""
    from mmengine.config.utils import _get_cfg_metainfo
    site = pip_install(checkout[0], tmp_path / 'site')
    assert not (site / '__init__.py').exists()  # the repository root's is no package's
    mim_dir = site / 'mmmetaformer' / '.mim'
    assert not any(p.is_symlink() for p in mim_dir.rglob('*'))
    table = convert2df(load(str(mim_dir / 'model-index.yml')))
    assert sorted(table.index) == sorted(convert2df(load(str(ROOT / 'model-index.yml'))).index)
    assert all((mim_dir / config).is_file() for config in table['config'])
    assert sorted(p.name for p in (mim_dir / 'tools').glob('*.py')) == \
        sorted(p.name for p in (ROOT / 'tools').glob('*.py'))
    found = _get_cfg_metainfo(str(mim_dir.parent), 'imagenet/caformer_s18_in1k.py')
    assert found['Weights'] == WEIGHT


@pytest.mark.e2e
def test_train_and_test(checkout, tmp_path):
    """``mim train`` and ``mim test`` of the demo config, from a folder holding the configs and
    the demo data: one epoch, then its evaluation, by the installed package's tools."""
    (tmp_path / 'configs').symlink_to(ROOT / 'configs')
    write_coco_demo(str(tmp_path / 'data' / 'demo' / 'coco'), num_train=4, num_val=2)
    tools = checkout[0] / 'tools'
    # one epoch without its validation: `mim test` evaluates the checkpoint
    train = mim(checkout, 'train', 'mmmetaformer', DEMO, '--cfg-options',
                'train_cfg.max_epochs=1', 'train_cfg.val_begin=2', cwd=tmp_path)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert f' {tools / "train.py"} {DEMO} --launcher none ' in train.stdout
    assert 'Training finished successfully' in train.stdout
    checkpoint = 'work_dirs/caformer_s18_maskrcnn_demo/epoch_1.pth'
    assert (tmp_path / checkpoint).is_file()
    test = mim(checkout, 'test', 'mmmetaformer', DEMO, '--checkpoint', checkpoint, cwd=tmp_path)
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    assert f' {tools / "test.py"} {DEMO} {checkpoint} --launcher none' in test.stdout
    assert 'coco/bbox_mAP:' in test.stdout and 'coco/segm_mAP:' in test.stdout
