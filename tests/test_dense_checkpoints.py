"""The published PoolFormer dense-prediction checkpoints as whole models.

Each test builds the published file's model in mmdet 3 / mmseg 1 with mmpretrain's PoolFormer
as the backbone (the official PoolFormer layout: ``patch_embed``, ``network``, output norms
``norm0/2/4/6``), saves it as the official mmdet 2.x / mmseg 0.x release or as mmseg 1.x's
file, then converts it (tools/convert_checkpoint.py) and loads both the converted and the
original file into this project's config: strict (exactly the model's tensors) and with
outputs equal to the source model's. mmdet 2.19 -> 3.3 and mmseg 0.19 -> 1.2 renamed none of
these models' parameters, so the source model's neck and head names are the old names.
"""
import copy
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import load_checkpoint
from mmengine.structures import InstanceData

import interpreter
import mmmetaformer  # noqa: F401
from mmmetaformer.checkpoints import load_model_checkpoint
from mmmetaformer.trust import CheckpointError
from mmmetaformer.models import MetaFormer

ROOT = Path(__file__).resolve().parents[1]
import convert_checkpoint as convert_tool  # noqa: E402

MASK_RCNN = 'configs/coco/mask-rcnn_poolformer-s12_fpn_1x_coco.py'
RETINANET = 'configs/coco/retinanet_poolformer-s12_fpn_1x_coco.py'
SEMANTIC_FPN = 'configs/ade20k/fpn_poolformer-s12_8xb4-40k_ade20k-512x512.py'
OFFICIAL_BACKBONE = dict(type='mmpretrain.PoolFormer', arch='s12', out_indices=(0, 2, 4, 6),
                         drop_path_rate=0.)


pytestmark = pytest.mark.usefixtures('one_thread')


def project_config(path, num_classes=None):
    """This project's config, pretrained loading off, ``num_classes`` set where given."""
    cfg = Config.fromfile(str(ROOT / path))
    cfg.model.backbone.init_cfg = None
    if num_classes:
        heads = [cfg.model.get('bbox_head'), cfg.model.get('decode_head')]
        if 'roi_head' in cfg.model:
            heads += [cfg.model.roi_head.bbox_head, cfg.model.roi_head.mask_head]
        for head in filter(None, heads):
            head.num_classes = num_classes
    return cfg


def official_config(cfg):
    """The same model with the official backbone: mmpretrain's PoolFormer, four outputs, and
    for RetinaNet the official FPN over them (start_level=1)."""
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone = OFFICIAL_BACKBONE
    if cfg.model.neck.get('start_level') == 0:
        cfg.model.neck.update(in_channels=[64, 128, 320, 512], start_level=1)
    return cfg


def build(cfg):
    import mmpretrain.models  # noqa: F401  (registers mmpretrain.PoolFormer)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return MODELS.build(cfg.model).eval()


def randomized(model):
    """Every 1-D parameter and every norm statistic random too, so that each tensor of the
    file shows in the outputs."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.5 if name.endswith(('weight', 'scale_1', 'scale_2')) else 0., 0.2)
        for name, b in model.named_buffers():
            if name.endswith('running_mean'):
                b.normal_(0., 0.1)
            elif name.endswith('running_var'):
                b.uniform_(0.5, 1.5)
    return model


def outputs(model, scope):
    """Every tensor the model computes from a fixed image: neck features, then the heads
    (Mask R-CNN: RPN, and box and mask heads on fixed proposals)."""
    image = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = model.extract_feat(image)
        if scope == 'mmseg':
            heads = model.decode_head(feats)
        elif hasattr(model, 'roi_head'):
            boxes = torch.tensor([[8., 8., 60., 50.], [30., 20., 120., 90.]])
            proposals = InstanceData(bboxes=boxes)
            heads = (model.rpn_head(feats), model.roi_head(feats, [proposals]))
        else:
            heads = model.bbox_head(feats)
    flat, stack = [], [feats, heads]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            flat.append(item)
        else:
            stack[:0] = list(item)
    return flat


def assert_same_outputs(model, reference, scope):
    got, expected = outputs(model, scope), outputs(reference, scope)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert (g - e).abs().max() <= 1e-4 * max(1., e.abs().max().item())


def official_file(model, path, toolbox, drop=()):
    """``model`` saved as the released files are: mmcv 1.x runner layout (meta with the
    toolbox version and classes, state_dict, optimizer state) or mmengine's (mmseg 1.x)."""
    state = OrderedDict((k, v.clone()) for k, v in model.state_dict().items()
                        if not k.startswith(drop))
    if toolbox.startswith('mmengine'):
        meta = dict(mmengine_version='0.10.7', dataset_meta=dict(classes=['a', 'b']))
    else:
        meta = dict({f"{toolbox.split()[0]}_version": toolbox.split()[1]}, epoch=12,
                    mmcv_version='1.4.0', CLASSES=('a', 'b'), config='model = dict(...)')
    optimizer = dict(state={0: dict(step=10, exp_avg=torch.zeros(3))},
                     param_groups=[dict(lr=1e-4, weight_decay=1e-4, params=[0])])
    torch.save(dict(meta=meta, state_dict=state, optimizer=optimizer), path)
    return state


def assert_loads(path, cfg, reference, source_state):
    """``path`` loads strictly into ``cfg``'s model with mmengine's loader; every non-backbone
    tensor arrives unchanged, and the outputs are the reference model's."""
    model = build(cfg)
    load_checkpoint(model, str(path), map_location='cpu', strict=True)
    state = model.state_dict()
    for key, value in source_state.items():
        if not key.startswith('backbone.'):
            assert state[key].equal(value), key
    assert_same_outputs(model, reference, cfg.default_scope)
    return model


def convert(path, tmp_path):
    dst = tmp_path / f'converted_{Path(path).name}'
    meta = convert_tool.convert(str(path), str(dst))
    saved = torch.load(dst, weights_only=True)
    assert saved['meta'] == meta and set(saved) == {'meta', 'state_dict'}  # no optimizer
    return dst, saved['state_dict'], meta


@pytest.fixture(scope='module')
def mask_rcnn():
    cfg = project_config(MASK_RCNN, num_classes=2)
    return cfg, randomized(build(official_config(cfg)))


@pytest.fixture(scope='module')
def retinanet():
    cfg = project_config(RETINANET, num_classes=2)
    return cfg, randomized(build(official_config(cfg)))


@pytest.fixture
def logs(monkeypatch):
    import mmmetaformer.checkpoints as ckpt
    messages = []
    monkeypatch.setattr(ckpt, 'print_log', lambda msg, **kw: messages.append(msg))
    return messages


def test_mask_rcnn_official_file(mask_rcnn, tmp_path, logs):
    cfg, reference = mask_rcnn
    path = tmp_path / 'mask_rcnn_poolformer_s12.pth'
    state = official_file(reference, path, 'mmdet 2.19.0')
    dst, converted, meta = convert(path, tmp_path)
    assert meta['arch'] == 'poolformer_s12' and meta['model'] == 'Mask R-CNN'
    assert meta['source_toolbox'] == 'mmdet 2.19.0'
    assert meta['dataset_meta'] == dict(classes=('a', 'b'))
    model = build(cfg)
    assert set(converted) == set(model.state_dict())  # nothing missing, nothing unexpected
    assert_loads(dst, cfg, reference, state)
    assert not logs  # a converted file needs no conversion
    assert_loads(path, cfg, reference, state)  # the original file, converted in memory
    assert len(logs) == 1 and str(path) in logs[0] and 'official PoolFormer v1' in logs[0]
    assert 'norm6 -> norm3' in logs[0]
    backbone = MetaFormer(arch='poolformer_s12', init_cfg=dict(type='Pretrained',
                                                               checkpoint=str(path)))
    backbone.init_weights()  # the backbone alone, for fine-tuning on other data
    assert all(v.equal(converted[f'backbone.{k}']) for k, v in backbone.state_dict().items())


def test_retinanet_official_file_without_norm0(retinanet, tmp_path, logs):
    """The RetinaNet files have no norm0 (FORK_LAST3=1): the config's backbone returns
    stages 1-3 to an FPN starting at its first input, the official FPN's start_level=1."""
    cfg, reference = retinanet
    path = tmp_path / 'retinanet_poolformer_s12.pth'
    state = official_file(reference, path, 'mmdet 2.19.0', drop=('backbone.norm0.',))
    assert 'backbone.norm2.weight' in state and 'backbone.norm0.weight' not in state
    dst, converted, meta = convert(path, tmp_path)
    assert meta['model'] == 'RetinaNet'
    assert set(converted) == set(build(cfg).state_dict())
    assert_loads(dst, cfg, reference, state)
    assert_loads(path, cfg, reference, state)
    assert 'norm2 -> norm1' in logs[0] and 'norm0' not in logs[0]


@pytest.mark.parametrize('toolbox', ['mmseg 0.19.0', 'mmengine 0.10.7'])
def test_semantic_fpn_files(toolbox, tmp_path, logs):
    """The official mmseg 0.x release and mmseg 1.x's own file (mmpretrain.PoolFormer)."""
    cfg = project_config(SEMANTIC_FPN)
    reference = randomized(build(official_config(cfg)))
    path = tmp_path / 'fpn_poolformer_s12.pth'
    state = official_file(reference, path, toolbox)
    dst, converted, meta = convert(path, tmp_path)
    assert meta['model'] == 'Semantic FPN' and meta['arch'] == 'poolformer_s12'
    assert set(converted) == set(build(cfg).state_dict())
    assert_loads(dst, cfg, reference, state)
    assert_loads(path, cfg, reference, state)
    assert len(logs) == 1 and 'converted 136 backbone tensors' in logs[0]


def test_file_of_another_model_is_refused(mask_rcnn, retinanet, tmp_path):
    mask_cfg, mask_model = mask_rcnn
    retina_cfg, retina_model = retinanet
    path = tmp_path / 'retinanet_poolformer_s12.pth'
    official_file(retina_model, path, 'mmdet 2.19.0', drop=('backbone.norm0.',))
    model = build(mask_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:  # load_from, tools/test.py, tools/infer.py
        load_model_checkpoint(model, str(path))
    message = str(err.value)
    assert f'{path} (RetinaNet, mmdet 2.19.0) does not fit the Mask R-CNN (MaskRCNN)' in message
    assert 'missing' in message and 'rpn_head' in message and 'roi_head.mask_head' in message
    assert 'unexpected' in message and 'bbox_head' in message
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())  # nothing loaded
    dst, _, _ = convert(path, tmp_path)
    with pytest.raises(CheckpointError, match='does not fit the Mask R-CNN'):
        load_model_checkpoint(model, str(dst))
    load_checkpoint(model, str(dst), map_location='cpu')  # mmengine's: init_detector, Runner
    with pytest.raises(CheckpointError, match=f'checkpoint {dst} did not fit the model'):
        model.eval()


def test_file_with_other_classes_is_refused(mask_rcnn, tmp_path):
    _, reference = mask_rcnn  # 2 classes
    path = tmp_path / 'mask_rcnn_poolformer_s12.pth'
    official_file(reference, path, 'mmdet 2.19.0')
    model = build(project_config(MASK_RCNN))  # COCO: 80 classes
    with pytest.raises(CheckpointError) as err:
        load_model_checkpoint(model, str(path))
    message = str(err.value)
    assert 'wrong shape: roi_head.bbox_head.fc_cls.weight: checkpoint (3, 1024), model ' \
        '(81, 1024)' in message
    assert 'another number of classes' in message and 'missing' not in message


def test_other_files_load_as_before(mask_rcnn, tmp_path):
    """A file of this project's own layout (a training checkpoint) is left to mmengine."""
    cfg, _ = mask_rcnn
    model = build(cfg)
    path = tmp_path / 'epoch_1.pth'
    torch.save(dict(meta=dict(epoch=1), state_dict=model.state_dict()), path)
    other = build(cfg)
    load_checkpoint(other, str(path), map_location='cpu', strict=True)
    assert all(v.equal(model.state_dict()[k]) for k, v in other.state_dict().items())


DEMO_CONFIG = """
_base_ = '{config}'
data_root = '{data}/coco/'
metainfo = dict(classes=('circle', 'square', 'triangle'))
model = dict(bbox_head=dict(num_classes=3))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(160, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
test_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(
    data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_tools_test_with_original_and_converted_files(tmp_path):
    """tools/test.py on the demo data takes the official RetinaNet file (converted in memory,
    one log line) and its conversion, with the same detections."""
    import pickle
    from demo_data import write_coco_demo
    write_coco_demo(str(tmp_path / 'coco'), num_train=1, num_val=2)
    config = tmp_path / 'retinanet_demo.py'
    config.write_text(DEMO_CONFIG.format(config=ROOT / RETINANET, data=tmp_path))
    reference = randomized(build(official_config(project_config(RETINANET, num_classes=3))))
    original = tmp_path / 'retinanet_poolformer_s12.pth'
    official_file(reference, original, 'mmdet 2.19.0', drop=('backbone.norm0.',))
    converted, _, _ = convert(original, tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                    os.getenv('PYTHONPATH')])))
    detections = []
    for checkpoint in (original, converted):
        out = tmp_path / f'{checkpoint.stem}.pkl'
        proc = interpreter.run(['tools/test.py', str(config), str(checkpoint),
                                '--work-dir', str(tmp_path / 'work'), '--out', str(out)],
                               cwd=ROOT, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert 'coco/bbox_mAP:' in proc.stdout
        log = [line for line in (proc.stdout + proc.stderr).splitlines()
               if f'tensors of {checkpoint} (RetinaNet' in line]
        assert len(log) == 1 and ('backbone tensors from the official PoolFormer v1 layout'
                                  in log[0]) == (checkpoint == original), log
        with open(out, 'rb') as f:  # written by this test's run
            detections.append(pickle.load(f))
    assert len(detections[0]) == len(detections[1]) == 2
    for a, b in zip(*detections):
        assert len(a['pred_instances']['scores']) > 0
        for key in ('bboxes', 'scores', 'labels'):
            assert a['pred_instances'][key].equal(b['pred_instances'][key])


# --- round two, 4: whole models under other containers and prefixes --------------------------

@pytest.mark.parametrize('wrap', [
    lambda ck: dict(ck, state_dict={f'module.{k}': v for k, v in ck['state_dict'].items()}),
    lambda ck: dict(meta=ck['meta'], model=ck['state_dict'])],
    ids=['module-prefix', 'model-key'])
def test_whole_model_under_other_containers(mask_rcnn, tmp_path, wrap):
    """Loaded the way load_from does: all of it, or nothing with an error."""
    cfg, reference = mask_rcnn
    path = tmp_path / 'mask_rcnn_poolformer_s12.pth'
    official_file(reference, path, 'mmdet 2.19.0')
    torch.save(wrap(torch.load(path, weights_only=True)), path)
    model = build(cfg)
    load_model_checkpoint(model, str(path))
    assert_same_outputs(model, reference, cfg.default_scope)
