"""Whole detectors in ONNX (mmmetaformer.deploy.detector, tools/export_onnx.py, tools/onnx_infer.py)
against mmdet's own predict(): Mask R-CNN of the demo config trained briefly in this module
(parity per image at a fixed and a dynamic size, pycocotools bbox and segm mAP of both on the
demo validation set), RetinaNet and Cascade Mask R-CNN with random weights, no detection at all,
and tools/onnx_infer.py run with torch, mmcv and mmdet unimportable."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
pytest.importorskip('mmdet')

import export_onnx as export_tool  # noqa: E402
import interpreter  # noqa: E402
from demo_data import write_coco_demo  # noqa: E402
from mmmetaformer.deploy import build_exportable, export_onnx  # noqa: E402
from mmmetaformer.deploy.detector import (compare_detections, mmdet_predict,  # noqa: E402
                                          onnx_detections, preprocess_images)

pytestmark = pytest.mark.slow  # not in `make test-quick`

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / 'configs/demo/caformer_s18_maskrcnn_demo.py')
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                os.getenv('PYTHONPATH')])))
# a quarter of the demo schedule, warmed up in 16 iterations instead of 50: on the 8 validation
# images, 88 shapes found with scores above 0.3, bbox mAP 0.19 (2 cores, 2026-12-06)
TRAIN_ITERS = 48


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """The demo data: ``2 * TRAIN_ITERS`` training and 8 validation images."""
    root = tmp_path_factory.mktemp('deploy') / 'coco'
    write_coco_demo(str(root), num_train=2 * TRAIN_ITERS, num_val=8)
    return root


@pytest.fixture(scope='module')
def demo(data, tmp_path_factory):
    """The demo Mask R-CNN trained on ``data`` for one epoch of ``TRAIN_ITERS`` iterations:
    ``(data root, checkpoint)``."""
    work = tmp_path_factory.mktemp('work')
    options = [f'{split}_dataloader.dataset.data_root={data}/'
               for split in ('train', 'val', 'test')] + [
        f'{split}_evaluator.ann_file={data}/annotations/instances_val2017.json'
        for split in ('val', 'test')] + [
        'train_cfg.max_epochs=1', 'default_hooks.checkpoint.interval=1',
        'param_scheduler.0.end=16',
        'train_cfg.val_begin=2']  # no validation: the tests evaluate the checkpoint themselves
    proc = interpreter.run(['tools/train.py', DEMO, '--work-dir', str(work),
                            '--cfg-options', *options], cwd=ROOT, env=ENV, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data, str(work / 'epoch_1.pth')


def val_images(data):
    return sorted(str(p) for p in (data / 'val2017').iterdir())


def demo_exportable(data, checkpoint):
    exportable, info = build_exportable(DEMO, checkpoint)
    info['cfg'].val_dataloader.dataset.data_root = f'{data}/'
    info['cfg'].test_dataloader.dataset.data_root = f'{data}/'
    return exportable, info


def run_graph(path, x):
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return session.run(None, {'input': x.numpy()})


def test_trained_maskrcnn_check_fixed_size(demo, tmp_path, capsys):
    """The acceptance case: the demo Mask R-CNN exported at its preprocessed size (192x144
    images padded to 160 x 192) gives mmdet's detections on every validation image."""
    data, checkpoint = demo
    export_tool.main([DEMO, checkpoint, '--out', str(tmp_path / 'det.onnx'), '--shape', '160',
                      '192', '--check', '--images', str(data / 'val2017'), '--runs', '2'])
    printed = capsys.readouterr().out
    assert '8/8 images with the same detections' in printed and 'onnxruntime' in printed
    counts = [int(line.split()[1]) for line in printed.splitlines() if line.endswith('.png')
              or '.png ' in line]
    assert sum(counts) >= 8, printed  # the trained model finds shapes scoring >= 0.3


def coco_results(data, predictions):
    """pycocotools bbox and segm results of ``{image id: detections in input pixels}``,
    rescaled to the original images as mmdet's ``rescale=True`` does."""
    import cv2
    from pycocotools import mask as mask_util
    results = []
    for image_id, (det, scale, size) in predictions.items():
        for box, score, label, mask in zip(det['boxes'], det['scores'], det['labels'],
                                           det['masks']):
            x1, y1, x2, y2 = box / scale
            full = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
            rle = mask_util.encode(np.asfortranarray(full))
            rle['counts'] = rle['counts'].decode()
            results.append(dict(image_id=image_id, category_id=int(label) + 1,
                                bbox=[float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                                score=float(score), segmentation=rle))
    return results


def coco_map(ann_file, results, kind):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt = COCO(str(ann_file))
    evaluator = COCOeval(gt, gt.loadRes(results), kind)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats[0]


@pytest.fixture(scope='module')
def dynamic_graph(demo, tmp_path_factory):
    """The trained demo detector exported by tools/export_onnx.py with a dynamic input size:
    ``(graph path, exportable, info)``."""
    data, checkpoint = demo
    path = tmp_path_factory.mktemp('dynamic') / 'det.onnx'
    export_tool.main([DEMO, checkpoint, '--out', str(path), '--shape', '160', '192',
                      '--dynamic'])
    return (path, *demo_exportable(data, checkpoint))


def test_trained_maskrcnn_dynamic_map(demo, dynamic_graph):
    """A dynamic-size export on the demo validation set: the same bbox and segm mAP
    (pycocotools) as mmdet's predict() within 0.01."""
    data, _ = demo
    path, exportable, info = dynamic_graph
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    ann_file = data / 'annotations/instances_val2017.json'
    ids = {img['file_name']: img['id'] for img in json.loads(ann_file.read_text())['images']}
    detector = exportable.model.detector
    torch_preds, onnx_preds = {}, {}
    for image, x, meta in preprocess_images(detector, info['cfg'], val_images(data)):
        ref = mmdet_predict(detector, x)
        got = onnx_detections(session.run(None, {'input': x.numpy()}))
        assert compare_detections(ref, got)['ok']
        (h, w), (h0, w0) = meta['img_shape'], meta['ori_shape']
        image_id = ids[Path(image).name]
        for preds, det in ((torch_preds, ref), (onnx_preds, got)):
            preds[image_id] = (dict(det, masks=det['masks'][:, :h, :w]),
                               np.array(meta['scale_factor'] * 2), (w0, h0))
    for kind in ('bbox', 'segm'):
        ref_map = coco_map(ann_file, coco_results(data, torch_preds), kind)
        onnx_map = coco_map(ann_file, coco_results(data, onnx_preds), kind)
        assert ref_map > 0.05, f'{kind} mAP {ref_map}: the model has not learnt enough'
        assert abs(onnx_map - ref_map) <= 0.01, (kind, onnx_map, ref_map)


@pytest.mark.parametrize('config', [
    'configs/coco/retinanet_poolformer-s12_fpn_1x_coco.py',
    'configs/coco/cascade-mask-rcnn_caformer-s18_fpn_4conv1fc-giou_ms-crop-3x_coco.py'])
def test_random_weights_parity(config, data, tmp_path, one_thread):
    """RetinaNet and Cascade Mask R-CNN (random weights, classifiers biased towards one class
    so that scores pass 0.3) exported with dynamic size and checked on a demo image at two
    sizes against mmdet's predict(). Such scores lie close together, and near-ties at
    ``max_per_img`` fall on either side with the runtimes' rounding: the weights are seeded
    and PyTorch runs on one thread, so that the case is the same on every run."""
    torch.manual_seed(0)
    exportable, info = build_exportable(str(ROOT / config))
    detector = exportable.model.detector
    if hasattr(detector, 'rpn_head'):  # 100 proposals, not 1000: the same graph, less work
        detector.rpn_head.test_cfg.max_per_img = 100
    with torch.no_grad():
        for module in detector.modules():  # a strongly preferred class
            if isinstance(module, torch.nn.Linear) and module.out_features == 81:
                module.bias[0] += 6.0
            elif isinstance(module, torch.nn.Conv2d) and module.out_channels == 9 * 80:
                module.bias.view(9, 80)[:, 0] += 4.0
    path = tmp_path / 'det.onnx'
    export_onnx(exportable, str(path), (160, 192), dynamic=True)
    rows = []
    for image in val_images(data)[:1]:
        for size in ((160, 192), (224, 320)):
            x = torch.nn.functional.interpolate(
                next(preprocess_images(detector, info['cfg'], [image]))[1], size=size,
                mode='bilinear')
            row = compare_detections(mmdet_predict(detector, x),
                                     onnx_detections(run_graph(path, x)))
            rows.append(row)
            assert row['ok'], row
    assert sum(row['reference'] for row in rows) > 0, rows


def test_no_detections(tmp_path):
    """A graph that keeps nothing (score_thr 1) returns empty outputs, as mmdet does, through
    the mask branch's RoiAlign, convolutions and GridSample; its ops are standard ONNX ops."""
    exportable, info = build_exportable(DEMO)
    exportable.model.detector.roi_head.test_cfg.score_thr = 1.0
    path = tmp_path / 'det.onnx'
    export_onnx(exportable, str(path), (64, 96), dynamic=True)
    x = torch.randn(1, 3, 96, 128)
    ref = mmdet_predict(exportable.model.detector, x)
    dets, labels, masks = run_graph(path, x)
    assert len(ref['scores']) == 0
    assert dets.shape == (1, 0, 5) and labels.shape == (1, 0) and masks.shape == (1, 0, 96, 128)
    nodes = onnx.load(str(path)).graph.node  # standard ops only, RoiAlign in half_pixel mode
    assert {node.domain for node in nodes} == {''}
    assert {'NonMaxSuppression', 'RoiAlign', 'GridSample', 'TopK'} <= {n.op_type for n in nodes}
    for node in nodes:
        if node.op_type == 'RoiAlign':
            mode = next(a.s for a in node.attribute if a.name == 'coordinate_transformation_mode')
            assert mode == b'half_pixel'


BLOCKED = ('torch', 'torchvision', 'mmcv', 'mmdet', 'mmengine', 'mmseg', 'mmpretrain')


def onnx_infer(*args):
    """tools/onnx_infer.py in a subprocess where importing any of ``BLOCKED`` fails."""
    code = ('import runpy, sys\n'
            f'sys.modules.update(dict.fromkeys({BLOCKED!r}))\n'
            f'sys.argv = ["tools/onnx_infer.py", *{list(map(str, args))!r}]\n'
            'runpy.run_path("tools/onnx_infer.py", run_name="__main__")\n')
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_onnx_infer_matches_mmdet_on_the_same_input(demo, dynamic_graph, tmp_path):
    """tools/onnx_infer.py, without torch or mmdet, on the demo images draws as many
    detections per image as mmdet's predict() finds on the same padded input tensor: the
    graph clips boxes to its input, as mmdeploy's files do, where mmdet's inference clips them
    to the resized image inside the padding (docs/deploy.md, "Where the graph differs")."""
    data, _ = demo
    path, exportable, info = dynamic_graph
    images = val_images(data)[:4]
    printed = onnx_infer(path, *images, '--out-dir', tmp_path / 'onnx')
    counts = [int(line.split(': ')[1].split()[0]) for line in printed.splitlines()
              if ' detections scoring >= 0.3 -> ' in line]  # '<image>: N detections ...'
    detector = exportable.model.detector
    expected = [int((mmdet_predict(detector, x)['scores'] >= 0.3).sum())
                for _, x, _ in preprocess_images(detector, info['cfg'], images)]
    assert counts == expected and sum(counts) > 0, (counts, expected)
    assert sorted(p.name for p in (tmp_path / 'onnx').iterdir()) == [
        Path(p).stem + '.png' for p in images]


@pytest.mark.parametrize('config,message', [
    ('configs/imagenet/poolformer_s12_in1k.py', r'.+ \(0\.\d\d\) -> '),
    ('configs/demo/upernet_caformer-s18_ade20k_demo.py', 'segmentation -> ')])
def test_onnx_infer_classifier_and_segmentor(config, message, data, tmp_path):
    """A classifier (top class and score) and a segmentor (label map) through onnx_infer.py
    without torch: the preprocessing of their metadata runs and a picture is written."""
    import re
    path = tmp_path / 'model.onnx'
    export_tool.main([str(ROOT / config), '--out', str(path), '--shape', '64', '64',
                      '--dynamic'])
    image = val_images(data)[0]
    printed = onnx_infer(path, image, '--out-dir', tmp_path / 'out')
    assert re.fullmatch(f'{re.escape(image)}: {message}.+png\n', printed), printed
    assert (tmp_path / 'out' / (Path(image).stem + '.png')).is_file()
