"""tools/demo.py's summary: per-class AP against pycocotools' own per-class evaluation, the
check of the drawn predictions against the picture's objects, and the drawing step's silence."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.structures import InstanceData

ROOT = Path(__file__).resolve().parents[1]
import demo  # noqa: E402

from demo_data import COCO_CLASSES, write_coco_demo  # noqa: E402


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp('coco')
    write_coco_demo(str(root), num_train=1, num_val=12, image_size=(128, 96))
    return root / 'annotations' / 'instances_val2017.json'


def write_results(coco_file, prefix, rng):
    """Detections from the ground truth: boxes and masks jittered, some classes mislabelled,
    random scores."""
    from pycocotools import mask as mask_utils
    coco = json.loads(coco_file.read_text())
    sizes = {img['id']: (img['height'], img['width']) for img in coco['images']}
    results = []
    for ann in coco['annotations']:
        x, y, w, h = ann['bbox']
        dx, dy = rng.normal(0, 0.08 * w), rng.normal(0, 0.08 * h)
        category = ann['category_id'] if rng.random() > 0.2 else int(rng.integers(1, 4))
        poly = (np.array(ann['segmentation'][0]).reshape(-1, 2) + (dx, dy)).ravel().tolist()
        rle = mask_utils.merge(mask_utils.frPyObjects([poly], *sizes[ann['image_id']]))
        rle['counts'] = rle['counts'].decode()  # as mmdet writes it
        results.append(dict(image_id=ann['image_id'], category_id=category,
                            bbox=[x + dx, y + dy, w, h], score=float(rng.random()),
                            segmentation=rle))
    Path(f'{prefix}.bbox.json').write_text(json.dumps(
        [{k: v for k, v in r.items() if k != 'segmentation'} for r in results]))
    Path(f'{prefix}.segm.json').write_text(json.dumps(
        [{k: v for k, v in r.items() if k != 'bbox'} for r in results]))


def test_per_class_ap_matches_pycocotools_per_category(coco, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    prefix = str(tmp_path / 'results')
    write_results(coco, prefix, np.random.default_rng(0))
    table = demo.per_class_ap(str(coco), prefix)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco))
        for iou_type in ('bbox', 'segm'):
            dt = gt.loadRes(f'{prefix}.{iou_type}.json')
            for cat in gt.getCatIds():
                evaluation = COCOeval(gt, dt, iou_type)
                evaluation.params.catIds = [cat]
                evaluation.evaluate()
                evaluation.accumulate()
                evaluation.summarize()
                ap = table[gt.cats[cat]['name'], iou_type]
                assert ap == pytest.approx(evaluation.stats[0], abs=1e-6)
                assert 0 < ap < 1
    lines = demo.class_table(table)
    assert [line.split()[0] for line in lines] == ['class', *COCO_CLASSES, 'all']


def test_found_objects_counts_right_class_and_overlap():
    objects = [(0, [10., 10., 50., 50.]), (2, [60., 10., 100., 60.]), (1, [0., 60., 30., 90.])]
    pred = InstanceData(
        bboxes=torch.tensor([[12., 11., 50., 52.],    # object 0, right class
                             [60., 10., 100., 60.],   # object 1, wrong class
                             [0., 60., 30., 90.],     # object 2, right class, low score
                             [61., 12., 99., 58.]]),  # object 1, right class
        labels=torch.tensor([0, 1, 1, 2]), scores=torch.tensor([0.9, 0.8, 0.2, 0.6]))
    assert demo.found_objects(pred, objects, score_thr=0.5) == (2, 3)
    assert demo.found_objects(pred, objects, score_thr=0.1) == (3, 4)
    assert demo.found_objects(pred, objects, score_thr=0.7) == (1, 2)


def test_imagenet_demo_config_trains_on_the_demo_data(tmp_path):
    """configs/demo/caformer_s18_imagenet_demo.py reads the demo ImageNet layout with its
    classes, and its classifier trains one step on it."""
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import DATASETS, MODELS

    from demo_data import IMAGENET_CLASSES, write_imagenet_demo
    write_imagenet_demo(str(tmp_path), num_train_per_class=1, num_val_per_class=1)
    cfg = Config.fromfile(str(ROOT / 'configs/demo/caformer_s18_imagenet_demo.py'))
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        dataset = DATASETS.build(dict(cfg.train_dataloader.dataset, data_root=str(tmp_path)))
        model = MODELS.build(dict(cfg.model, data_preprocessor=cfg.data_preprocessor))
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        log_vars = model.train_step(pseudo_collate([dataset[i] for i in range(4)]),
                                    optim_wrapper)
    assert dataset.CLASSES == IMAGENET_CLASSES and len(dataset) == 4
    assert model.head.num_classes == len(IMAGENET_CLASSES)
    assert torch.isfinite(log_vars['loss'])


def test_draw_busiest_image_is_quiet(coco, tmp_path, capsys):
    """The demo's last step draws a checkpoint's predictions on the busiest validation image
    and prints nothing of its own (mmengine prints "Loads checkpoint ..." when loading)."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    cfg = Config.fromfile(str(ROOT / demo.CONFIG))
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    with torch.no_grad():  # every RoI scores high as a circle: boxes get drawn
        model.roi_head.bbox_head.fc_cls.bias[0] = 10.
    checkpoint = tmp_path / 'demo.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict(
        dataset_meta=dict(classes=COCO_CLASSES))), checkpoint)
    picture = tmp_path / 'predictions.png'
    capsys.readouterr()
    image, objects, found, drawn = demo.draw_busiest_image(
        str(checkpoint), str(coco), str(coco.parent.parent / 'val2017'), str(picture))
    assert capsys.readouterr().out == ''
    assert picture.stat().st_size > 0
    assert (Path(image).name, objects) == demo.busiest_image(str(coco))
    # the counts are those of mmdet's own inference on that image with the same checkpoint
    from mmdet.apis import inference_detector, init_detector
    with contextlib.redirect_stdout(io.StringIO()):
        detector = init_detector(cfg, str(checkpoint), device='cpu')
    pred = inference_detector(detector, image).pred_instances
    assert drawn > 0 and (found, drawn) == demo.found_objects(pred, objects, demo.SCORE_THR)
