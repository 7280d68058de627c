"""How the tools talk to a user: one ``error:`` line naming the file (traceback only with
``--debug`` / MMMETAFORMER_DEBUG=1), no known third-party warnings (and only those hidden),
and the shell launchers finding the project environment by themselves."""
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DET = 'configs/demo/caformer_s18_maskrcnn_demo.py'
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                os.getenv('PYTHONPATH')])))
ENV.pop('MMMETAFORMER_DEBUG', None)
import common  # noqa: E402
import interpreter  # noqa: E402

pytestmark = pytest.mark.slow  # not in `make test-quick`


def tool(*args, env=None, fresh=False):
    """Run ``python tools/<args>`` (in a child interpreter of tests/interpreter.py, or with
    ``fresh`` in a new one: warnings raised while the stack imports show only there); returns
    the CompletedProcess."""
    if fresh:
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env or ENV,
                              capture_output=True, text=True, timeout=600)
    return interpreter.run(args, cwd=ROOT, env=env or ENV, timeout=600)


def assert_one_error_line(proc, *words):
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize('message,category,module', common.KNOWN_WARNINGS)
def test_known_warnings_hidden_by_message_and_module(message, category, module):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        common.silence_known_warnings()
        warnings.warn_explicit(message + ' (details)', category, 'x.py', 1, module=module)
        assert not seen
        warnings.warn_explicit(message, category, 'x.py', 1, module='my_project')
        warnings.warn_explicit('something else', category, 'x.py', 1, module=module)
        warnings.warn_explicit(message, Warning, 'x.py', 1, module=module)
    assert len(seen) == 3


def test_missing_checkpoint_of_test_py(tmp_path):
    missing = tmp_path / 'epoch_12.pth'
    proc = tool('tools/test.py', DET, str(missing), fresh=True)
    assert_one_error_line(proc, 'checkpoint', str(missing))
    assert 'Warning' not in proc.stderr + proc.stdout


@pytest.mark.parametrize('option', ['load_from', '--resume'])
def test_missing_load_from_or_resume_file_of_train_py(tmp_path, option):
    """Named before the runner is built (its build output is hundreds of lines)."""
    from demo_data import write_coco_demo
    data = tmp_path / 'coco'
    write_coco_demo(str(data), num_train=1, num_val=1, image_size=(96, 64))
    missing = tmp_path / 'epoch_12.pth'
    options = [f'{split}_dataloader.dataset.data_root={data}/' for split in ('train', 'val', 'test')]
    given = [*options, f'load_from={missing}'] if option == 'load_from' else \
        [*options, '--resume', str(missing)]
    proc = tool('tools/train.py', DET, '--work-dir', str(tmp_path / 'work'), '--cfg-options',
                *given)
    assert_one_error_line(proc, f'{option} file not found: {missing}')
    assert proc.stdout == ''


@pytest.mark.parametrize('config,words', [
    (DET, ["mmdet's DetTTAModel merges boxes only"]),
    ('configs/demo/caformer_s18_imagenet_demo.py', ['--tta needs tta_model and tta_pipeline'])])
def test_tta_where_the_config_allows(tmp_path, config, words):
    from demo_data import write_coco_demo, write_imagenet_demo
    data = tmp_path / 'data'
    if config == DET:
        write_coco_demo(str(data), num_train=1, num_val=1, image_size=(96, 64))
    else:
        write_imagenet_demo(str(data), num_train_per_class=1, num_val_per_class=1)
    checkpoint = tmp_path / 'epoch_1.pth'
    checkpoint.write_bytes(b'')  # never read: refused before the model is built
    proc = tool('tools/test.py', config, str(checkpoint), '--tta',
                '--work-dir', str(tmp_path / 'work'),
                '--cfg-options', f'test_dataloader.dataset.data_root={data}/')
    assert_one_error_line(proc, *words)


def test_infer_checks_files_before_building(tmp_path):
    checkpoint = tmp_path / 'empty.pth'
    proc = tool('tools/infer.py', 'no_such.jpg', DET, '--weights', str(checkpoint))
    assert_one_error_line(proc, 'checkpoint', str(checkpoint))
    checkpoint.write_bytes(b'')  # never read: the image is checked before the model is built
    proc = tool('tools/infer.py', str(tmp_path / 'no_such.jpg'), DET, '--weights',
                str(checkpoint))
    assert_one_error_line(proc, 'no images found', str(tmp_path / 'no_such.jpg'))
    assert 'Warning' not in proc.stderr + proc.stdout


def test_damaged_annotation_file_in_train_py(tmp_path):
    from demo_data import write_coco_demo
    data = tmp_path / 'coco'
    write_coco_demo(str(data), num_train=2, num_val=1, image_size=(96, 64))
    annotations = data / 'annotations' / 'instances_train2017.json'
    annotations.write_text('{"images": [')  # an interrupted export
    proc = tool('tools/train.py', DET, '--work-dir', str(tmp_path / 'work'), '--cfg-options',
                f'train_dataloader.dataset.data_root={data}/')
    assert_one_error_line(proc, str(annotations), 'again')
    assert 'ValueError' not in proc.stderr

def test_classes_missing_from_the_annotation_file_in_train_py(tmp_path):
    from demo_data import write_coco_demo
    data = tmp_path / 'coco'
    write_coco_demo(str(data), num_train=2, num_val=1, image_size=(96, 64))
    proc = tool('tools/train.py', DET, '--work-dir', str(tmp_path / 'work'), '--cfg-options',
                f'train_dataloader.dataset.data_root={data}/',
                "train_dataloader.dataset.metainfo.classes=['circle','square','hexagon']")
    assert_one_error_line(proc, str(data / 'annotations/instances_train2017.json'),
                          "the config's classes 1 (hexagon)", 'metainfo')


def test_failed_pretrained_download_in_train_py(tmp_path):
    from demo_data import write_coco_demo
    data = tmp_path / 'coco'
    write_coco_demo(str(data), num_train=2, num_val=1, image_size=(96, 64))
    url = 'http://127.0.0.1:9/caformer_s18.pth'  # the discard port: refused at once
    config = tmp_path / 'pretrained.py'
    config.write_text(f"""_base_ = {str(ROOT / DET)!r}
model = dict(backbone=dict(init_cfg=dict(_delete_=True, type='Pretrained', checkpoint={url!r})))
train_dataloader = dict(dataset=dict(data_root={str(data)!r}))
val_dataloader = dict(dataset=dict(data_root={str(data)!r}))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file={str(data / 'annotations/instances_val2017.json')!r})
""")
    args = ['tools/train.py', str(config), '--work-dir', str(tmp_path / 'work')]
    proc = tool(*args)
    assert_one_error_line(proc, url, 'download')
    debug = tool(*args, env=dict(ENV, MMMETAFORMER_DEBUG='1'))
    assert debug.returncode == 1 and 'Traceback' in debug.stderr


@pytest.mark.skipif(not (ROOT / '.venv/bin/python').exists(), reason='no .venv')
def test_dist_launcher_finds_the_project_environment():
    """With no environment active and PYTHON unset, torchrun comes from .venv."""
    env = {k: v for k, v in ENV.items() if k not in ('PYTHON', 'VIRTUAL_ENV', 'CONDA_PREFIX')}
    env['PATH'] = '/usr/bin:/bin'
    proc = subprocess.run(['bash', 'tools/dist_train.sh', '--help', '1'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'Train a model from an OpenMMLab config' in proc.stdout


# The Python API example of the docs, as a user pastes it after `make demo`.
def readme_api_example() -> str:
    """The README's Python API example (the first Python block under "### Inference")."""
    section = (ROOT / 'README.md').read_text().split('### Inference', 1)[1]
    return re.search(r'```python\n(.*?)```', section, re.S)[1]


def test_python_api_example_draws_quietly(tmp_path):
    """Run in a fresh interpreter from a copy of the repository layout (demo data, a
    checkpoint of the demo config), the example writes the drawing and prints no warning."""
    import cv2
    import torch
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope
    from demo_data import write_coco_demo
    write_coco_demo(str(tmp_path / 'data/demo/coco'), num_train=1, num_val=1)
    (tmp_path / 'configs').symlink_to(ROOT / 'configs')
    cfg = Config.fromfile(str(ROOT / DET))
    cfg.model.backbone.init_cfg = None
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    (tmp_path / 'work_dirs/demo').mkdir(parents=True)
    meta = dict(dataset_meta=dict(classes=('circle', 'square', 'triangle')))  # as training saves
    torch.save(dict(state_dict=model.state_dict(), meta=meta),
               tmp_path / 'work_dirs/demo/epoch_3.pth')
    proc = subprocess.run([sys.executable, '-c', readme_api_example()], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert 'arning' not in proc.stderr + proc.stdout, proc.stderr
    image = cv2.imread(str(tmp_path / 'data/demo/coco/val2017/000000000001.png'))
    assert cv2.imread(str(tmp_path / 'result.png')).shape == image.shape
