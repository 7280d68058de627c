"""check_dataset: one clear FileNotFoundError for missing COCO / ADE20K / ImageNet data, a
ValueError naming a damaged COCO annotation file, the config's classes it lacks or the empty
image files, a report of the annotations mmdet would skip; check_image reads an image's
header and names the file it refuses."""
import json
import math
import re
import shutil
import struct
import zlib

import cv2
import numpy as np
import pytest
from mmengine.config import Config

from mmmetaformer.dataset_checks import check_dataset, check_image
from demo_data import write_ade20k_demo, write_coco_demo, write_imagenet_demo

HINT = '(see docs/user_guides/train_test.md#prepare-datasets)'


def coco(root, split='train', type='CocoDataset'):
    return dict(type=type, data_root=root, ann_file=f'annotations/instances_{split}2017.json',
                data_prefix=dict(img=f'{split}2017/'), pipeline=[])


def ade(root, split='training', type='ADE20KDataset'):
    return dict(type=type, data_root=root,
                data_prefix=dict(img_path=f'images/{split}', seg_map_path=f'annotations/{split}'))


def imagenet(root, split='train', type='ImageNet'):
    return dict(type=type, data_root=root, split=split)


def config(train=None, val=None, test=None):
    return Config({f'{key}_dataloader': dict(batch_size=1, dataset=dataset) if dataset else None
                   for key, dataset in (('train', train), ('val', val), ('test', test))})


def message(cfg):
    with pytest.raises(FileNotFoundError) as error:
        check_dataset(cfg)
    return str(error.value)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo')
    write_coco_demo(str(root / 'coco'), num_train=1, num_val=1, image_size=(64, 48))
    write_ade20k_demo(str(root / 'ade20k'), num_train=1, num_val=1, image_size=(64, 48))
    write_imagenet_demo(str(root / 'imagenet'), num_train_per_class=1, num_val_per_class=1,
                        image_size=(32, 32))
    return root


def test_documented_messages():
    assert message(config(train=coco('data/coco'))) == (
        'COCO not found at data/coco: expected annotations/instances_train2017.json and '
        f'train2017/ {HINT}')
    assert message(config(train=ade('data/ade/ADEChallengeData2016'))) == (
        'ADE20K not found at data/ade/ADEChallengeData2016: expected images/training and '
        f'annotations/training {HINT}')
    assert message(config(val=imagenet('data/imagenet', 'val'))) == (
        f'ImageNet not found at data/imagenet: expected val/ {HINT}')


def test_one_line_per_dataset_root(tmp_path):
    root = str(tmp_path / 'coco')
    cfg = config(train=coco(root), val=coco(root, 'val'), test=coco(root, 'val'))
    assert message(cfg) == (
        f'COCO not found at {root}: expected annotations/instances_train2017.json, train2017/, '
        f'annotations/instances_val2017.json and val2017/ {HINT}')
    lines = message(config(train=coco('a'), val=ade('b', 'validation'))).splitlines()
    assert [line.split(':')[0] for line in lines] == ['COCO not found at a', 'ADE20K not found at b']


@pytest.mark.parametrize('wrap', [
    lambda d: dict(type='RepeatDataset', times=2, dataset=d),
    lambda d: dict(type='ClassBalancedDataset', oversample_thr=0.1,
                   dataset=dict(type='RepeatDataset', times=2, dataset=d)),
    lambda d: dict(type='ConcatDataset', datasets=[dict(type='UnknownDataset'), d]),
])
def test_wrappers_and_scoped_types(wrap):
    cfg = config(train=wrap(ade('data/nowhere', type='mmseg.ADE20KDataset')))
    assert message(cfg).startswith('ADE20K not found at data/nowhere: expected images/training')


def test_partially_present_dataset_fails(data):
    (data / 'partial').mkdir()
    (data / 'partial/annotations').symlink_to(data / 'coco/annotations')
    assert 'COCO not found at' in message(config(train=coco(str(data / 'partial'))))


def test_custom_dataset_and_class_types(data):
    assert message(config(train=dict(type='mmpretrain.CustomDataset', data_root='x/y'))) == (
        f'CustomDataset not found at x/y: expected a directory {HINT}')
    cocodataset = type('CocoDataset', (), {})
    cfg = dict(train_dataloader=dict(dataset=dict(coco('nowhere'), type=cocodataset)))
    assert message(cfg).startswith('COCO not found at nowhere')


def test_passes_for_demo_data(data):
    assert check_dataset(config(
        train=with_classes(coco(str(data / 'coco'))),
        val=with_classes(coco(str(data / 'coco'), 'val', type='mmdet.CocoDataset')))) == []
    check_dataset(config(train=ade(str(data / 'ade20k')), val=ade(str(data / 'ade20k'), 'validation')))
    check_dataset(config(train=imagenet(str(data / 'imagenet')),
                         val=dict(type='CustomDataset', data_root=str(data / 'imagenet'),
                                  ann_file='meta/val.txt', data_prefix='val')))


def test_leaves_unknown_and_remote_datasets_alone():
    check_dataset(config(train=dict(type='CityscapesDataset', data_root='data/nowhere'),
                         val=coco('s3://bucket/coco')))
    check_dataset(Config(dict(model=dict(type='X'))))


@pytest.mark.parametrize('content,problem', [
    (b'', 'is empty'), (b'{"images": [], "annotations": [', 'is not a JSON object'),
    (b'{"images": [], "categories": [],}', 'is not valid JSON'),
    (b'{"annotations": []}', "is not a COCO annotation file: it has no ['images', 'categories']")])
def test_malformed_coco_annotations_are_named(data, tmp_path, content, problem):
    root = tmp_path / 'coco'
    shutil.copytree(data / 'coco', root)
    ann = root / 'annotations' / 'instances_val2017.json'
    ann.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f'{ann} {problem}')):
        check_dataset(config(train=with_classes(coco(str(root))),
                             val=with_classes(coco(str(root), 'val'))))


# --- empty image files ---------------------------------------------------------------------

def empty(path, files):
    """``files`` (relative to ``path``) emptied: as an interrupted copy or extraction leaves
    them. mmcv's loader, as the pipelines run it, fails on each."""
    from mmcv.transforms import LoadImageFromFile
    for name in files:
        (path / name).write_bytes(b'')
        with pytest.raises(Exception):
            LoadImageFromFile()(dict(img_path=str(path / name)))
    return [str(path / name) for name in files]


def test_empty_coco_images_are_named(data, tmp_path):
    """The images the annotation file lists, not the other files of the folder."""
    root = tmp_path / 'coco'
    shutil.copytree(data / 'coco', root)
    listed = json.loads((root / 'annotations/instances_val2017.json').read_text())['images']
    (root / 'val2017' / 'unlisted.jpg').write_bytes(b'')
    [path] = empty(root / 'val2017', [listed[0]['file_name']])
    with pytest.raises(ValueError) as error:
        check_dataset(config(train=with_classes(coco(str(root))),
                             val=with_classes(coco(str(root), 'val'))))
    assert str(error.value) == (f'empty (0-byte) image files: 1 ({path}); mmcv cannot decode '
                                'them: download or extract them again, or leave them out of '
                                'the dataset')


def test_empty_images_of_folder_datasets_are_named(data, tmp_path):
    """ADE20K images and label maps, ImageNet's class folders: the first three and a count."""
    for name in ('ade20k', 'imagenet'):
        shutil.copytree(data / name, tmp_path / name)
    ade_images = sorted((tmp_path / 'ade20k/images/training').iterdir())
    ade_maps = sorted((tmp_path / 'ade20k/annotations/training').iterdir())
    classes = sorted(p for p in (tmp_path / 'imagenet/train').iterdir())
    paths = (empty(ade_images[0].parent, [ade_images[0].name])
             + empty(ade_maps[0].parent, [ade_maps[0].name])
             + empty(classes[0], [next(classes[0].iterdir()).name])
             + empty(classes[1], [next(classes[1].iterdir()).name]))
    with pytest.raises(ValueError) as error:
        check_dataset(config(train=ade(str(tmp_path / 'ade20k')),
                             val=ade(str(tmp_path / 'ade20k'), 'validation'),
                             test=imagenet(str(tmp_path / 'imagenet'))))
    first = '; '.join(sorted(paths)[:3])
    assert str(error.value).startswith(f'empty (0-byte) image files: 4 ({first}; ...); ')


def test_folder_scan_reads_sizes_only(data, tmp_path):
    """Each folder once (a link back to a parent is not followed again), nothing decoded: a
    file that is no image at all but has bytes passes, so does a broken link."""
    root = tmp_path / 'imagenet'
    shutil.copytree(data / 'imagenet', root)
    (root / 'train' / 'loop').symlink_to(root / 'train')
    (root / 'train' / 'broken.jpg').symlink_to(root / 'nowhere.jpg')
    (root / 'train' / 'text.jpg').write_text('not an image')
    check_dataset(config(train=imagenet(str(root))))
    (root / 'train' / 'empty.JPEG').write_bytes(b'')
    with pytest.raises(ValueError, match=re.escape(
            f"empty (0-byte) image files: 1 ({root / 'train' / 'empty.JPEG'}); ")):
        check_dataset(config(train=imagenet(str(root))))


# --- annotation files nested too deeply, boxes that are not finite ---------------------------

def test_deeply_nested_annotation_file_is_named(data, tmp_path):
    root = tmp_path / 'coco'
    shutil.copytree(data / 'coco', root)
    ann = root / 'annotations' / 'instances_train2017.json'
    ann.write_text('{"images": ' + '[' * 100000 + ']' * 100000 + '}')
    with pytest.raises(ValueError, match=re.escape(f'{ann} is not valid JSON (nested too '
                                                   'deeply): download or export')):
        check_dataset(config(train=with_classes(coco(str(root)))))


# --- an image's header ---------------------------------------------------------------------

def _png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def _cut_png(width, height):
    """A PNG of ``width`` x ``height`` gray pixels whose data is cut short after a few rows."""
    return (b'\x89PNG\r\n\x1a\n'
            + _png_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
            + _png_chunk(b'IDAT', zlib.compress(bytes(4 * (width + 1)))))


@pytest.mark.parametrize('ext,params', [
    ('.png', []), ('.bmp', []), ('.jpg', []),
    ('.jpg', [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])], ids=['png', 'bmp', 'jpeg', 'progressive'])
def test_check_image_reads_the_size_opencv_decodes(tmp_path, ext, params):
    path = str(tmp_path / f'image{ext}')
    cv2.imwrite(path, np.zeros((37, 53, 3), np.uint8), params)
    fmt, width, height = check_image(path)
    assert fmt == {'.png': 'PNG', '.bmp': 'BMP', '.jpg': 'JPEG'}[ext]
    assert cv2.imread(path).shape[:2] == (height, width) == (37, 53)


@pytest.mark.parametrize('content,problem', [
    (b'', 'the file is empty (0 bytes)'),
    (b'GIF89a\x01\x00', 'it is not a PNG, JPEG or BMP image'),
    (b'\xff\xd8\xff\xe0\x00\x10JFIF', 'its JPEG header is damaged (truncated?)'),
    (b'\x89PNG\r\n\x1a\n\x00\x00', 'its PNG header is damaged (truncated?)')],
    ids=['empty', 'gif', 'jpeg-cut', 'png-cut'])
def test_check_image_names_what_it_cannot_read(tmp_path, content, problem):
    path = tmp_path / 'image.png'
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        check_image(str(path))
    assert str(error.value) == f'cannot read image {path}: {problem}'


def test_check_image_refuses_what_opencv_refuses(tmp_path):
    """A 60000x60000 PNG: OpenCV refuses it without naming the file; the check names it."""
    path = tmp_path / 'huge.png'
    path.write_bytes(_cut_png(60000, 60000))
    with pytest.raises(cv2.error, match='CV_IO_MAX_IMAGE_PIXELS') as error:
        cv2.imread(str(path))
    assert str(path) not in str(error.value)
    with pytest.raises(ValueError) as error:
        check_image(str(path))
    assert str(error.value).startswith(f'cannot read image {path}: it is a 60000x60000 PNG '
                                       'image, larger than OpenCV decodes (1073741824 pixels')


# --- annotations that change metrics or break evaluation -------------------------------------

DEMO_CLASSES = ('circle', 'square', 'triangle')


def edited_coco(data, tmp_path, edit):
    """A copy of the demo COCO set whose training annotation file ``edit`` changes in place."""
    root = tmp_path / 'coco'
    shutil.copytree(data / 'coco', root)
    ann = root / 'annotations' / 'instances_train2017.json'
    coco = json.loads(ann.read_text())
    edit(coco)
    ann.write_text(json.dumps(coco))
    return root, ann


def with_classes(dataset, classes=DEMO_CLASSES):
    return dict(dataset, metainfo=dict(classes=classes))


@pytest.fixture(scope='module')
def many(tmp_path_factory):
    """A demo COCO set with enough annotations for four kinds of damage and a clean rest."""
    root = tmp_path_factory.mktemp('many')
    write_coco_demo(str(root / 'coco'), num_train=8, num_val=1, image_size=(96, 64))
    return root


def test_bad_annotations_are_counted_with_examples(many, tmp_path):
    """Counted as mmdet's CocoDataset counts what it skips: every annotation reported as a bad
    box, unknown category or unknown image is one that mmdet leaves out of training."""
    def damage(coco):
        anns = coco['annotations']
        assert len(anns) >= 12
        for ann in anns[:4]:  # zero widths and negative heights
            ann['bbox'][3 if ann['id'] % 2 else 2] = -3.0 if ann['id'] % 2 else 0.0
        anns[4]['category_id'] = anns[5]['category_id'] = 99
        anns[6]['image_id'] = 999
    root, ann = edited_coco(many, tmp_path, damage)
    reports = check_dataset(config(train=with_classes(coco(str(root)))))
    coco_file = json.loads(ann.read_text())
    ids = [a['id'] for a in coco_file['annotations']]
    assert reports == [
        f'{ann}: 4 (id {ids[0]}: bbox {coco_file["annotations"][0]["bbox"]}; id {ids[1]}: bbox '
        f'{coco_file["annotations"][1]["bbox"]}; id {ids[2]}: bbox '
        f'{coco_file["annotations"][2]["bbox"]}; ...) annotations without a finite box of '
        'positive width and height (mmdet trains without them, COCO evaluation counts them as '
        'missed)',
        f"{ann}: 2 (id {ids[4]}: category_id 99; id {ids[5]}: category_id 99) annotations of "
        "category ids missing from 'categories' (left out of training and evaluation)",
        f"{ann}: 1 (id {ids[6]}: image_id 999) annotations of image ids missing from 'images' "
        '(left out of training and evaluation)']

    from mmdet.datasets import CocoDataset
    dataset = CocoDataset(data_root=str(root), ann_file='annotations/instances_train2017.json',
                          data_prefix=dict(img='train2017/'), metainfo=dict(classes=DEMO_CLASSES),
                          pipeline=[], filter_cfg=None)
    kept = sum(len(dataset.get_data_info(i)['instances']) for i in range(len(dataset)))
    assert len(ids) - kept == 4 + 2 + 1


def test_boxes_that_are_not_finite_are_reported(many, tmp_path):
    """A width of 1e400 reads as infinity (json, as mmdet reads the file), an x of NaN as NaN."""
    def damage(coco):
        coco['annotations'][0]['bbox'][2] = coco['annotations'][1]['bbox'][0] = 'number'
    root, ann = edited_coco(many, tmp_path, damage)
    ann.write_text(ann.read_text().replace('"number"', '1e400', 1).replace('"number"', 'NaN'))
    anns = json.loads(ann.read_text())['annotations']
    assert math.isinf(anns[0]['bbox'][2]) and math.isnan(anns[1]['bbox'][0])
    assert check_dataset(config(train=with_classes(coco(str(root))))) == [
        f"{ann}: 2 (id {anns[0]['id']}: bbox {anns[0]['bbox']}; id {anns[1]['id']}: bbox "
        f"{anns[1]['bbox']}) annotations without a finite box of positive width and height "
        '(mmdet trains without them, COCO evaluation counts them as missed)']


def test_polygon_of_one_point_is_reported(many, tmp_path):
    """pycocotools cannot turn it into a mask (the segm evaluation fails on it)."""
    from pycocotools import mask
    def damage(coco):
        coco['annotations'][1]['segmentation'] = [[10.0, 12.0]]
    root, ann = edited_coco(many, tmp_path, damage)
    second = json.loads(ann.read_text())['annotations'][1]['id']
    assert check_dataset(config(train=with_classes(coco(str(root))))) == [
        f'{ann}: 1 (id {second}: segmentation [[10.0, 12.0]]) annotations with a polygon of '
        "fewer than 3 points (mmdet trains without them, pycocotools' segm evaluation fails on "
        'them)']
    with pytest.raises(Exception, match='input type is not supported'):
        mask.frPyObjects([[10.0, 12.0]], 64, 96)


def test_clean_demo_annotations_give_no_report(many):
    assert check_dataset(config(train=with_classes(coco(str(many / 'coco'))))) == []


@pytest.mark.parametrize('classes,named', [
    (('circle', 'Square', 'hexagon'), "2 (Square; hexagon)"),
    (None, '80 (person; bicycle; car; ...)')])  # no metainfo: mmdet's 80 COCO classes
def test_classes_missing_from_the_file_are_named(many, classes, named):
    """A config class the file does not name fails evaluation (IndexError in mmdet's
    CocoMetric); the check names the classes, the file and the names it has."""
    dataset = coco(str(many / 'coco'))
    ann = many / 'coco' / 'annotations' / 'instances_train2017.json'
    with pytest.raises(ValueError) as error:
        check_dataset(config(train=with_classes(dataset, classes) if classes else dataset))
    assert str(error.value) == (
        f"{ann}: the config's classes {named} are not category names of the file, which has "
        "3 (circle; square; triangle): set the dataset's metainfo=dict(classes=...) to names "
        "of the file")


@pytest.mark.parametrize('content', [b'{"images": {}, "categories": []}',
                                     b'{"images": [], "categories": [], "annotations": [1]}'])
def test_coco_lists_of_other_things_are_named(many, tmp_path, content):
    root = tmp_path / 'coco'
    shutil.copytree(many / 'coco', root)
    ann = root / 'annotations' / 'instances_train2017.json'
    ann.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f'{ann} is not a COCO annotation file: ')):
        check_dataset(config(train=with_classes(coco(str(root)))))
