"""tools/ end to end on tiny demo datasets (each run a child interpreter, tests/interpreter.py):
train then test (detection and segmentation, real evaluators), 2-process dist_train.sh on CPU
(gloo) of a naive backbone swap, --resume after a run is stopped, and one clear message for a
missing dataset."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import interpreter
from demo_data import write_ade20k_demo, write_coco_demo

ROOT = Path(__file__).resolve().parents[1]
DET = 'configs/demo/caformer_s18_maskrcnn_demo.py'
SEG = 'configs/demo/upernet_caformer-s18_ade20k_demo.py'
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                os.getenv('PYTHONPATH')])))
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo_data')
    write_coco_demo(str(root / 'coco'), num_train=4, num_val=2)
    write_ade20k_demo(str(root / 'ade20k'), num_train=4, num_val=2, image_size=(160, 128))
    return root


def det_options(data, epochs=1):
    coco, ann = f'{data}/coco/', f'{data}/coco/annotations/instances_val2017.json'
    return [f'{split}_dataloader.dataset.data_root={coco}' for split in ('train', 'val', 'test')] \
        + [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}',
           f'train_cfg.max_epochs={epochs}', 'default_hooks.logger.interval=1']


def seg_options(data, iters):
    """The demo config on ``data`` for ``iters`` iterations, at half its image and crop size."""
    ade = f'{data}/ade20k'
    return [f'{split}_dataloader.dataset.data_root={ade}' for split in ('train', 'val', 'test')] \
        + [f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
           'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
           'model.data_preprocessor.size=(128,128)',
           'train_dataloader.dataset.pipeline.2.scale=(160,128)',
           'train_dataloader.dataset.pipeline.3.crop_size=(128,128)',
           'val_dataloader.dataset.pipeline.1.scale=(160,128)',
           'test_dataloader.dataset.pipeline.1.scale=(160,128)']


def tool(*args):
    """Run ``python tools/<args>`` from the repository root; returns the CompletedProcess."""
    proc = interpreter.run(args, cwd=ROOT, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_train_test_infer_detection(data, tmp_path):
    work = tmp_path / 'work'
    train = tool('tools/train.py', DET, '--work-dir', str(work), '--cfg-options',
                 *det_options(data))
    assert 'Epoch(train) [1][2/2]' in train.stdout and 'coco/bbox_mAP' in train.stdout
    checkpoint = (work / 'last_checkpoint').read_text().strip()
    assert checkpoint.endswith('epoch_1.pth')

    out = tmp_path / 'preds.pkl'
    test = tool('tools/test.py', DET, checkpoint, '--work-dir', str(work), '--out', str(out),
                '--show-dir', 'vis', '--cfg-options', *det_options(data))
    assert 'coco/bbox_mAP:' in test.stdout and 'coco/segm_mAP:' in test.stdout
    assert out.stat().st_size > 0
    assert len(list(work.glob('*/vis/*.png'))) == 2

    pictures = tmp_path / 'pictures'  # a folder of images: one picture each, as mmdet names it
    images = sorted((data / 'coco' / 'val2017').glob('*.png'))
    infer = tool('tools/infer.py', str(data / 'coco' / 'val2017'), DET, '--weights', checkpoint,
                 '--out-dir', str(pictures), '--pred-score-thr', '0.05')
    assert sorted(p.name for p in (pictures / 'vis').iterdir()) == [p.name for p in images]
    assert all(p.stat().st_size > 0 for p in (pictures / 'vis').iterdir())
    assert infer.stdout.count(' -> ') == len(images) and 'Warning' not in infer.stderr
    assert infer.stdout.count('scoring >= 0.05') == len(images)


def test_train_resume_test_segmentation(data, tmp_path):
    """A run killed after its first checkpoint continues from the saved iteration with
    --resume; the final checkpoint is then evaluated with mIoU."""
    work = tmp_path / 'work'
    options = ['--work-dir', str(work), '--cfg-options', *seg_options(data, iters=4)]
    first = interpreter.start(['tools/train.py', SEG, *options], cwd=ROOT, env=ENV)
    try:
        deadline = time.time() + 600
        while not (work / 'last_checkpoint').exists() and first.poll() is None:
            assert time.time() < deadline, 'no checkpoint after 10 minutes'
            time.sleep(0.2)
    finally:
        if first.poll() is None:
            first.kill()  # SIGKILL
        first.wait()
    saved = int(Path((work / 'last_checkpoint').read_text().strip()).stem.split('_')[1])
    assert saved < 4, 'the first run finished before it could be stopped'

    resumed = tool('tools/train.py', SEG, *options, '--resume')
    assert f'resumed epoch: 0, iter: {saved}' in resumed.stdout
    assert f'Iter(train) [{saved + 1}/4]' in resumed.stdout
    assert 'Iter(train) [1/4]' not in resumed.stdout
    assert 'mIoU' in resumed.stdout  # the end-of-training validation

    out, show = tmp_path / 'seg_out', tmp_path / 'seg_show'
    test = tool('tools/test.py', SEG, str(work / 'iter_4.pth'), '--work-dir', str(work),
                '--out', str(out), '--show-dir', str(show),
                '--cfg-options', *seg_options(data, iters=4))
    assert 'mIoU:' in test.stdout
    assert len(list(out.glob('*.png'))) == 2
    assert len(list(show.glob('vis_data/vis_image/*.png'))) == 2


# mmdet's RetinaNet with the backbone swapped as a user would (backbone dict and neck
# in_channels, and the README's runner_type): its FPN starts at level 1, so the stride-4 output norm never
# gets a gradient. The rest fits the demo data: its 3 classes, small images, one epoch of two
# steps.
RETINANET_SWAP = """
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmmetaformer'], allow_failed_imports=False)
runner_type = 'mmmetaformer.SafeRunner'  # the README's opt-in line
model = dict(
    backbone=dict(_delete_=True, type='mmmetaformer.PoolFormerV2', arch='s12'),
    neck=dict(in_channels=[64, 128, 320, 512]),
    bbox_head=dict(num_classes=3))  # the demo data's classes, not part of the swap
dataset = dict(data_root='{data}/coco/', metainfo=dict(classes=('circle', 'square', 'triangle')))
train_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False, dataset=dict(
    dataset, pipeline=[dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
                       dict(type='Resize', scale=(128, 96), keep_ratio=True),
                       dict(type='PackDetInputs')]))
val_dataloader = test_dataloader = dict(dataset=dataset)
val_evaluator = test_evaluator = dict(ann_file='{data}/coco/annotations/instances_val2017.json')
train_cfg = dict(max_epochs=1, val_interval=2)
"""


def test_dist_train_of_a_naive_retinanet_swap(data, tmp_path):
    """tools/dist_train.sh with 2 processes (gloo) trains mmdet's RetinaNet with the swapped
    backbone, each process on its half of the data: DDP is told of the unused stride-4 output
    norm, with one warning that names the tidier config."""
    config = tmp_path / 'retinanet_swap.py'
    config.write_text(RETINANET_SWAP.format(data=data))
    work = tmp_path / 'work'
    env = dict(ENV, PYTHON=sys.executable, PORT=interpreter.free_port())
    proc = subprocess.run(['bash', 'tools/dist_train.sh', str(config), '2', '--work-dir',
                           str(work)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 4 images, 1 per step and 2 processes: 2 steps an epoch. DDP would stop at the second step
    # had a parameter no gradient in the first.
    assert 'Distributed training: True' in proc.stdout
    assert 'Epoch(train) [1][2/2]' in proc.stdout and (work / 'epoch_1.pth').exists()
    warnings = [line for line in proc.stderr.splitlines() if line.startswith('warning: ')]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert warnings[0].startswith('warning: backbone.norm0.weight')
    assert 'find_unused_parameters=True' in warnings[0] and 'out_indices' in warnings[0]


def test_missing_dataset_message(tmp_path):
    missing = tmp_path / 'no_coco'
    proc = interpreter.run(
        ['tools/train.py', 'configs/caformer_s18_maskrcnn.py', '--work-dir',
         str(tmp_path / 'work'), '--cfg-options',
         *[f'{s}_dataloader.dataset.data_root={missing}/' for s in ('train', 'val', 'test')]],
        cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 1
    assert 'not found' in proc.stderr and str(missing) in proc.stderr
    assert 'Traceback' not in proc.stderr


class _RunsCode:
    """Unpickling this creates a file: stands for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def test_mmdet_own_tools_train_and_test_the_demo_config(data, tmp_path):
    """mmdet's installed tools/train.py and tools/test.py (what `mim train mmdet` runs) on the
    project's demo config: the config's runner and checkpoint hook, the trust rule."""
    import mmdet
    import torch
    tools = Path(mmdet.__file__).parent / '.mim' / 'tools'
    work = tmp_path / 'work'
    train = tool(str(tools / 'train.py'), DET, '--work-dir', str(work), '--cfg-options',
                 *det_options(data))
    assert 'Epoch(train) [1][2/2]' in train.stdout and not list(work.glob('.*.tmp'))
    checkpoint = (work / 'last_checkpoint').read_text().strip()
    test = tool(str(tools / 'test.py'), DET, checkpoint, '--work-dir', str(work),
                '--cfg-options', *det_options(data))
    assert 'coco/bbox_mAP:' in test.stdout

    marker, evil = tmp_path / 'pwned', tmp_path / 'evil.pth'
    torch.save(dict(torch.load(checkpoint, weights_only=False), extra=_RunsCode(marker)), evil)
    proc = interpreter.run([str(tools / 'test.py'), DET, str(evil), '--work-dir', str(work),
                            '--cfg-options', *det_options(data)], cwd=ROOT, env=ENV, timeout=900)
    assert proc.returncode != 0 and not marker.exists()
    assert f'refused to load {evil}' in proc.stderr
