"""The demo-data writers, checked with independent readers (pycocotools, cv2) and, where
installed, with the mmdet / mmseg / mmpretrain datasets the configs use."""
import filecmp
import os
from functools import partial

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from mmengine.registry import DefaultScope
from pycocotools.coco import COCO

import demo_data
from demo_data import (ADE20K_LABELS, COCO_CLASSES, IMAGENET_CLASSES,
                                             IMAGENET_WNIDS, write_ade20k_demo, write_all,
                                             write_coco_demo, write_imagenet_demo)

COCO_SIZE = (128, 96)
TINY = dict(coco=partial(write_coco_demo, num_train=6, num_val=2, image_size=COCO_SIZE),
            ade20k=partial(write_ade20k_demo, num_train=4, num_val=2, image_size=(96, 80)),
            imagenet=partial(write_imagenet_demo, num_train_per_class=3, num_val_per_class=1,
                             image_size=(48, 48)))
DOMINANT_CHANNEL = {'circle': 2, 'square': 1, 'triangle': 0}  # BGR: red, green, blue shapes


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo')
    for name, writer in TINY.items():
        writer(str(root / name))
    return root


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file())


def test_coco_annotations_match_polygons_and_pixels(data):
    coco = COCO(str(data / 'coco/annotations/instances_train2017.json'))
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(COCO_CLASSES)
    assert len(coco.getImgIds()) == 6
    for img_info in coco.loadImgs(coco.getImgIds()):
        img = cv2.imread(str(data / 'coco/train2017' / img_info['file_name']))
        h, w = img.shape[:2]
        assert (w, h) == (img_info['width'], img_info['height']) == COCO_SIZE
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_info['id']]))
        assert 1 <= len(anns) <= 4
        for ann in anns:
            poly = np.array(ann['segmentation'][0]).reshape(-1, 2)
            x0, y0 = poly.min(0)
            np.testing.assert_allclose(ann['bbox'], [x0, y0, *(poly.max(0) - (x0, y0))], atol=0.011)
            assert ann['iscrowd'] == 0 and max(ann['bbox'][2:]) >= 0.1 * min(w, h)
            rle = mask_utils.merge(mask_utils.frPyObjects(ann['segmentation'], h, w))
            assert mask_utils.area(rle) == pytest.approx(ann['area'], rel=0.05)
            # the last 1-2 pixels of a triangle's 60-degree corner are narrower than a pixel
            np.testing.assert_allclose(mask_utils.toBbox(rle), ann['bbox'], atol=2.0)
            inside = cv2.erode(coco.annToMask(ann), np.ones((5, 5), np.uint8)).astype(bool)
            mean_bgr = img[inside].mean(0)
            kind = coco.loadCats(ann['category_id'])[0]['name']
            assert mean_bgr.argmax() == DOMINANT_CHANNEL[kind]


def test_ade20k_label_maps(data):
    for split, prefix, num in (('training', 'train', 4), ('validation', 'val', 2)):
        images = sorted(os.listdir(data / 'ade20k/images' / split))
        labels = sorted(os.listdir(data / 'ade20k/annotations' / split))
        assert images == [f'ADE_{prefix}_{i:08d}.jpg' for i in range(1, num + 1)]
        assert labels == [n.replace('.jpg', '.png') for n in images]
        for name in images:
            img = cv2.imread(str(data / 'ade20k/images' / split / name))
            label = cv2.imread(str(data / 'ade20k/annotations' / split / (name[:-4] + '.png')),
                               cv2.IMREAD_UNCHANGED)
            assert label.dtype == np.uint8 and label.shape == img.shape[:2]
            assert set(np.unique(label)) <= {0, *ADE20K_LABELS} and 1 in label
            assert not label[[0, -1]].any() and not label[:, [0, -1]].any()
            assert set(np.unique(label)) - {0, 1}  # at least one shape
            for value, kind in ((3, 'circle'), (2, 'square'), (4, 'triangle')):
                inside = cv2.erode((label == value).astype(np.uint8), np.ones((5, 5), np.uint8))
                if inside.any():
                    assert img[inside.astype(bool)].mean(0).argmax() == DOMINANT_CHANNEL[kind]


def test_imagenet_layout(data):
    root = data / 'imagenet'
    assert (root / 'meta/classes.txt').read_text().split() == list(IMAGENET_CLASSES)
    for split, num in (('train', 3), ('val', 1)):
        lines = [line.split() for line in (root / 'meta' / f'{split}.txt').read_text().splitlines()]
        assert len(lines) == num * len(IMAGENET_WNIDS)
        assert sorted(os.listdir(root / split)) == list(IMAGENET_WNIDS)
        for path, label in lines:
            assert path.split('/')[0] == IMAGENET_WNIDS[int(label)] and path.endswith('.JPEG')
            assert cv2.imread(str(root / split / path)).shape == (48, 48, 3)


@pytest.mark.parametrize('name', sorted(TINY))
def test_writers_are_deterministic(tmp_path, name):
    TINY[name](str(tmp_path / 'a'))
    TINY[name](str(tmp_path / 'b'))
    names = files(tmp_path / 'a')
    assert names == files(tmp_path / 'b') and names
    for n in names:
        a, b = tmp_path / 'a' / n, tmp_path / 'b' / n
        if n.endswith('.json') or n.endswith('.txt'):
            assert filecmp.cmp(a, b, shallow=False)
        else:
            np.testing.assert_array_equal(cv2.imread(str(a), cv2.IMREAD_UNCHANGED),
                                          cv2.imread(str(b), cv2.IMREAD_UNCHANGED))
    TINY[name](str(tmp_path / 'c'), seed=1)
    assert any(not filecmp.cmp(tmp_path / 'a' / n, tmp_path / 'c' / n, shallow=False)
               for n in names)


@pytest.fixture
def tiny_write_all(monkeypatch):
    for name, writer in TINY.items():
        monkeypatch.setattr(demo_data, f'write_{name}_demo', writer)


def test_write_all_is_idempotent(tmp_path, tiny_write_all):
    paths = write_all(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['ade20k', 'coco', 'imagenet']
    (tmp_path / 'coco/annotations/instances_val2017.json').write_text('{}')  # must survive
    before = {p: os.stat(tmp_path / p).st_mtime_ns for p in files(tmp_path)}
    assert write_all(str(tmp_path)) == paths
    assert {p: os.stat(tmp_path / p).st_mtime_ns for p in files(tmp_path)} == before
    assert (tmp_path / 'coco/annotations/instances_val2017.json').read_text() == '{}'


def test_write_all_never_leaves_a_partial_dataset(tmp_path, tiny_write_all, monkeypatch):
    def interrupted(root):
        TINY['imagenet'](root)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_data, 'write_imagenet_demo', interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_all(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['ade20k', 'coco']  # no imagenet, no temp dir
    monkeypatch.setattr(demo_data, 'write_imagenet_demo', TINY['imagenet'])
    write_all(str(tmp_path))
    assert (tmp_path / 'imagenet' / demo_data.COMPLETE_MARKER).exists()


def test_write_all_refuses_a_foreign_directory(tmp_path, tiny_write_all):
    (tmp_path / 'coco').mkdir()
    with pytest.raises(FileExistsError, match='not a complete demo dataset'):
        write_all(str(tmp_path))


def test_mmdet_coco_dataset(data):
    pytest.importorskip('mmdet')
    from mmdet.datasets import CocoDataset
    with DefaultScope.overwrite_default_scope('mmdet'):
        dataset = CocoDataset(
            data_root=str(data / 'coco'), ann_file='annotations/instances_train2017.json',
            data_prefix=dict(img='train2017/'), metainfo=dict(classes=COCO_CLASSES),
            pipeline=[dict(type='LoadImageFromFile'),
                      dict(type='LoadAnnotations', with_bbox=True, with_mask=True)])
        sample = dataset[0]
    assert len(dataset) == 6
    coco = COCO(str(data / 'coco/annotations/instances_train2017.json'))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[sample['img_id']]))
    assert sample['img'].shape == (COCO_SIZE[1], COCO_SIZE[0], 3)
    assert list(sample['gt_bboxes_labels']) == [a['category_id'] - 1 for a in anns]
    np.testing.assert_allclose(sample['gt_masks'].areas, [a['area'] for a in anns], rtol=0.05)


def test_mmseg_ade20k_dataset(data):
    pytest.importorskip('mmseg')
    from mmseg.datasets import ADE20KDataset
    with DefaultScope.overwrite_default_scope('mmseg'):
        dataset = ADE20KDataset(
            data_root=str(data / 'ade20k'),
            data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
            pipeline=[dict(type='LoadImageFromFile'), dict(type='LoadAnnotations')])
        seg = dataset[0]['gt_seg_map']
    assert len(dataset) == 2
    assert seg.shape == (80, 96) and set(np.unique(seg)) <= {0, 1, 2, 3, 255} and 255 in seg


def test_mmpretrain_imagenet_and_custom_dataset(data):
    pytest.importorskip('mmpretrain')
    from mmpretrain.datasets import CustomDataset, ImageNet
    pipeline = [dict(type='LoadImageFromFile')]
    root = str(data / 'imagenet')
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        by_meta = ImageNet(data_root=root, split='train', metainfo=dict(classes=IMAGENET_CLASSES),
                           pipeline=pipeline)
        by_folders = CustomDataset(data_root=root, data_prefix='val', pipeline=pipeline)
        sample = by_meta[0]
    assert len(by_meta) == 3 * len(IMAGENET_CLASSES) and by_meta.CLASSES == IMAGENET_CLASSES
    assert len(by_folders) == len(IMAGENET_CLASSES) and by_folders.CLASSES == IMAGENET_WNIDS
    assert [by_folders.get_data_info(i)['gt_label'] for i in range(4)] == [0, 1, 2, 3]
    assert sample['img'].shape == (48, 48, 3) and sample['gt_label'] == 0


@pytest.mark.parametrize('kind', IMAGENET_CLASSES)
def test_shapes_of_one_size_have_one_area(kind):
    """Every class comes in the same sizes: a shape drawn at radius r has the area of a
    circle of radius r (cv2's polygon area; the circle is a 32-gon)."""
    radius = 30.0
    poly = demo_data._polygon(kind, radius, angle=0.3).astype(np.float32)
    assert cv2.contourArea(poly) == pytest.approx(np.pi * radius ** 2, rel=0.01)


def test_write_all_replaces_an_older_demo_version(tmp_path, tiny_write_all):
    write_all(str(tmp_path))
    marker = tmp_path / 'coco' / demo_data.COMPLETE_MARKER
    marker.write_text('1')  # written by an older version of the writers
    (tmp_path / 'coco/stale.txt').write_text('')
    write_all(str(tmp_path))
    assert marker.read_text() == demo_data.DATA_VERSION
    assert not (tmp_path / 'coco/stale.txt').exists()
