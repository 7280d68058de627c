"""Every detection/segmentation config parses and follows its recipe; one of each recipe and
family builds its model (pretrained off) and runs a forward; the backbone swaps into mmdet's
and mmseg's own configs."""
import copy
import functools
import importlib.util
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

import mmmetaformer  # noqa: F401
from mmmetaformer.archs import ARCHS
from mmmetaformer.engine.runner import params_without_gradient

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'configs'
spec = importlib.util.spec_from_file_location('generate_configs', CONFIGS / 'generate.py')
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)
GENERATED = generate.configs()
ZOO = {path: (recipe, family, size) for path, recipe, family, size, _ in generate.zoo()}
SIZE_ORDER = ('s12', 's18', 's24', 's36', 'm36', 'm48', 'b36')


def smallest_of_each_recipe_and_family():
    groups = {}
    for path, (recipe, family, _) in ZOO.items():
        groups.setdefault((recipe, family), []).append(path)
    return [min(paths, key=lambda p: SIZE_ORDER.index(ZOO[p][2])) for paths in groups.values()]


SMALLEST = smallest_of_each_recipe_and_family()

# built and run: the smallest model of each recipe and family, the headline config and the
# demos (the ImageNet demo: tests/test_tools_demo.py). The other sizes differ in the backbone
# arch and the widths the neck or heads read, which test_zoo_config_recipe checks against the
# arch table for every config, and test_fidelity builds every arch.
BUILT = sorted([
    *SMALLEST,
    'caformer_s18_maskrcnn.py',
    *(p.relative_to(CONFIGS).as_posix() for p in (CONFIGS / 'demo').glob('*.py')
      if 'imagenet' not in p.name)])

# (lr, weight decay, layer decay paramwise_cfg or None, auto_scale_lr base batch size)
RECIPES = {
    'mask-rcnn_metaformer_fpn_1x_coco': (2e-4, 1e-4, None, 16),
    'retinanet_metaformer_fpn_1x_coco': (1e-4, 1e-4, None, 16),
    'mask-rcnn_metaformer_fpn_ms-crop-3x_coco': (
        1e-4, 0.05, dict(decay_rate=0.95, decay_type='layer_wise', num_layers=6), 16),
    'cascade-mask-rcnn_metaformer_fpn_4conv1fc-giou_ms-crop-3x_coco': (
        2e-4, 0.05, dict(decay_rate=0.7, decay_type='layer_wise', num_layers=6), 16),
    'upernet_metaformer_8xb2-160k_ade20k-512x512': (
        1e-4, 0.05, dict(decay_rate=0.9, decay_type='stage_wise'), 16),
    'fpn_metaformer_8xb4-40k_ade20k-512x512': (2e-4, 1e-4, None, 32),
}


pytestmark = pytest.mark.usefixtures('one_thread')


@functools.lru_cache(maxsize=None)
def _parsed(name):
    return Config.fromfile(str(CONFIGS / name))


def load(name):
    """The config ``configs/name``, parsed once per test process (the tests change it)."""
    return copy.deepcopy(_parsed(name))


def test_generated_configs_match_generator():
    on_disk = {p.relative_to(CONFIGS).as_posix()
               for d in ('coco', 'ade20k') for p in (CONFIGS / d).glob('*.py')}
    assert on_disk == set(GENERATED), 'run python configs/generate.py'
    for name, text in GENERATED.items():
        assert (CONFIGS / name).read_text() == text, f'{name}: run python configs/generate.py'
    assert len(GENERATED) == 100


# in `make test-quick` the smallest model of each recipe and family: a config parses in about
# 0.4 s, most of it mmengine reading mmdet's or mmseg's model index for its `mmdet::` or
# `mmseg::` base
@pytest.mark.parametrize('name', [
    pytest.param(name, marks=() if name in SMALLEST else pytest.mark.slow) for name in sorted(ZOO)])
def test_zoo_config_recipe(name):
    cfg = load(name)
    recipe, family, size = ZOO[name]
    lr, wd, decay, base_batch = RECIPES[recipe]
    backbone = cfg.model.backbone
    assert cfg.custom_imports.imports == ['mmmetaformer']
    assert cfg.default_scope == ('mmdet' if name.startswith('coco/') else 'mmseg')
    assert backbone.type.lower() == f'mmmetaformer.{family}' and backbone.arch == size
    assert backbone.init_cfg == dict(type='Pretrained',
                                     checkpoint=generate.pretrained_url(family, size))
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ('AdamW', lr, wd)
    assert cfg.optim_wrapper.get('paramwise_cfg') == decay
    if decay:
        assert cfg.optim_wrapper.constructor == 'mmmetaformer.LayerDecayOptimWrapperConstructor'
    assert cfg.auto_scale_lr.base_batch_size == base_batch
    dims = list(ARCHS[f'{family}_{size}']['dims'])
    head_widths = cfg.model.decode_head.in_channels if 'upernet' in name else \
        cfg.model.neck.in_channels
    returned = [dims[i] for i in backbone.get('out_indices', range(4))]
    assert list(head_widths) == returned
    official = generate.official_poolformer(family, recipe)
    assert backbone.drop_path_rate == (0. if official else generate.FAMILIES[family][1][size][1])


OFFICIAL = sorted(name for name, (recipe, family, _) in ZOO.items()
                  if generate.official_poolformer(family, recipe))


def _steps(pipeline):
    return [{k: v for k, v in step.items() if k != '_scope_'} for step in pipeline]


@pytest.mark.parametrize('name', OFFICIAL)
def test_poolformer_config_is_official_protocol(name):
    """The official sail-sg/poolformer settings (detection/ on mmdet 2.19, segmentation/ on
    mmseg 0.19), in their mmdet 3 / mmseg 1 form."""
    cfg = load(name)
    backbone, neck = cfg.model.backbone, cfg.model.neck
    assert backbone.drop_path_rate == 0. and backbone.get('frozen_stages', -1) == -1
    assert backbone.get('out_norm', 'default') == 'default'  # GroupNorm(1), eps 1e-5
    assert cfg.optim_wrapper.type == 'OptimWrapper' and 'clip_grad' not in cfg.optim_wrapper
    assert cfg.optim_wrapper.optimizer.get('betas', (0.9, 0.999)) == (0.9, 0.999)
    train, test = _steps(cfg.train_dataloader.dataset.get('pipeline') or
                         cfg.train_dataloader.dataset.dataset.pipeline), \
        _steps(cfg.test_dataloader.dataset.pipeline)
    if name.startswith('coco/'):
        assert neck.out_channels == 256 and neck.num_outs == 5
        if 'retinanet' in name:  # official: start_level=1 over 4 outputs, norm0 unused
            assert tuple(backbone.out_indices) == (1, 2, 3) and neck.start_level == 0
            assert neck.add_extra_convs == 'on_input'
        else:
            assert tuple(backbone.get('out_indices', (0, 1, 2, 3))) == (0, 1, 2, 3)
            assert neck.get('start_level', 0) == 0
        assert dict(type='Resize', scale=(1333, 800), keep_ratio=True) in train + test
        assert dict(type='RandomFlip', prob=0.5) in train
        assert cfg.model.data_preprocessor.pad_size_divisor == 32
        assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
        warmup, steps = cfg.param_scheduler
        assert (warmup.type, warmup.start_factor, warmup.end, warmup.by_epoch) == \
            ('LinearLR', 0.001, 500, False)
        assert (steps.type, steps.milestones, steps.gamma) == ('MultiStepLR', [8, 11], 0.1)
        assert cfg.train_cfg.max_epochs == 12 and cfg.train_cfg.val_interval == 1
        assert cfg.default_hooks.checkpoint.interval == 1
    else:
        assert neck.num_outs == 4 and cfg.model.decode_head.num_classes == 150
        assert dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0),
                    keep_ratio=True) in train
        assert dict(type='RandomCrop', crop_size=(512, 512), cat_max_ratio=0.75) in train
        assert dict(type='PhotoMetricDistortion') in train
        assert [s['type'] for s in test][1:3] == ['Resize', 'ResizeToMultiple']
        assert test[1]['scale'] == (2048, 512) and test[2]['size_divisor'] == 32
        assert cfg.train_dataloader.batch_size == 4 and cfg.auto_scale_lr.base_batch_size == 32
        (poly,) = cfg.param_scheduler
        assert (poly.type, poly.power, poly.eta_min, poly.end) == ('PolyLR', 0.9, 0., 40000)
        assert cfg.train_cfg.max_iters == 40000 and cfg.train_cfg.val_interval == 4000
        assert cfg.default_hooks.checkpoint.interval == 4000


def _dummy_batch(scope, size, num=1):
    inputs = torch.rand(num, 3, size, size)
    meta = dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                batch_input_shape=(size, size), scale_factor=(1.0, 1.0))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        return inputs, [DetDataSample(metainfo=meta) for _ in range(num)]
    from mmseg.structures import SegDataSample
    return inputs, [SegDataSample(metainfo=meta) for _ in range(num)]


def build_model(cfg):
    """The config's model with pretrained loading off and few RPN proposals (fast tests)."""
    cfg.model.backbone.init_cfg = None
    if 'rpn' in cfg.model.get('test_cfg', {}):
        cfg.model.test_cfg.rpn.max_per_img = 20
    from mmengine.registry import MODELS
    return MODELS.build(cfg.model)


@pytest.mark.parametrize('name', BUILT)
@pytest.mark.slow
def test_config_builds_and_runs(name):
    cfg = load(name)
    scope = cfg.default_scope
    assert scope in ('mmdet', 'mmseg') and 'mmmetaformer' in cfg.custom_imports.imports
    with DefaultScope.overwrite_default_scope(scope):
        model = build_model(cfg).eval()
        inputs, samples = _dummy_batch(scope, 128 if scope == 'mmdet' else 64)
        with torch.no_grad():
            out = model(inputs, samples, mode='tensor')
    assert out is not None
    assert type(model.backbone).__module__.startswith('mmmetaformer.')



def _training_batch(scope, size, num_classes):
    """Random images with one ground-truth object (box, mask) or a label map each."""
    inputs, samples = _dummy_batch(scope, size, num=2)
    for sample in samples:
        if scope == 'mmdet':
            from mmdet.structures.mask import BitmapMasks
            from mmengine.structures import InstanceData
            masks = torch.zeros(1, size, size, dtype=torch.uint8)
            masks[:, size // 4:size // 2, size // 4:size // 2] = 1
            sample.gt_instances = InstanceData(
                bboxes=torch.tensor([[size / 4, size / 4, size / 2, size / 2]]),
                labels=torch.tensor([num_classes - 1]),
                masks=BitmapMasks(masks.numpy(), size, size))
        else:
            from mmengine.structures import PixelData
            sample.gt_sem_seg = PixelData(
                data=torch.randint(0, num_classes, (1, size, size)))
    return inputs, samples


def unused_by_one_loss(cfg):
    """The trainable parameters one training loss of ``cfg``'s model on a small random batch
    leaves without a gradient."""
    scope = cfg.default_scope
    if 'rpn_proposal' in cfg.model.get('train_cfg', {}):
        cfg.model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=50)
    with DefaultScope.overwrite_default_scope(scope):
        model = build_model(cfg).train()
        heads = [cfg.model.get(k, {}) for k in ('bbox_head', 'decode_head')]
        num_classes = next((h['num_classes'] for h in heads if 'num_classes' in h), 80)
        inputs, samples = _training_batch(scope, 128 if scope == 'mmdet' else 64, num_classes)
        losses = model(inputs, samples, mode='loss')
    loss, _ = model.parse_losses(losses)
    loss.backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize('name', sorted({  # the smallest model of each recipe
    min(path for path, (r, _, size) in ZOO.items() if r == recipe and size in ('s12', 's18'))
    for recipe in RECIPES}))
@pytest.mark.slow
def test_every_parameter_trains(name):
    """One training loss reaches every trainable parameter: DDP, as the recipes run it
    (``find_unused_parameters=False``), stops at the second iteration otherwise; and the
    SafeRunner's check before a DDP run finds nothing to report."""
    cfg = load(name)
    unused = unused_by_one_loss(cfg)
    assert not unused, f'{name}: parameters without a gradient: {unused[:8]}'
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        assert params_without_gradient(build_model(cfg)) == []


# mmdet's / mmseg's own configs with the backbone swapped as a user would, nothing else: the
# neck or the heads skip backbone outputs (RetinaNet's FPN starts at level 1; FCN's heads read
# stages 2 and 3 by in_index).
SKIPPING_SWAPS = {
    'retinanet': """
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmmetaformer'], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='mmmetaformer.PoolFormerV2', arch='s12'),
             neck=dict(in_channels=[64, 128, 320, 512]))
""",
    'fcn': """
_base_ = 'mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py'
custom_imports = dict(imports=['mmmetaformer'], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='mmmetaformer.ConvFormer', arch='s18'),
             decode_head=dict(in_channels=512), auxiliary_head=dict(in_channels=320))
"""}


@pytest.mark.parametrize('name', sorted(SKIPPING_SWAPS))
def test_check_before_ddp_finds_what_one_loss_leaves_out(name, tmp_path):
    """The SafeRunner's check before a DDP run names exactly the parameters one training loss
    leaves without a gradient: the output norms of the skipped stages."""
    path = tmp_path / 'swap.py'
    path.write_text(SKIPPING_SWAPS[name])
    cfg = Config.fromfile(str(path))
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        found = params_without_gradient(build_model(copy.deepcopy(cfg)))
    skipped = ('norm0.', ) if name == 'retinanet' else ('norm0.', 'norm1.')
    assert found and all(n.startswith(tuple(f'backbone.{s}' for s in skipped)) for n in found)
    assert found == unused_by_one_loss(cfg)


SWAP_MMDET = """
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmmetaformer'], allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, type='mmmetaformer.CAFormer', arch='s18', drop_path_rate=0.15,
                  init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/sail/dl/resolve/main/caformer/caformer_s18.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))
"""
SWAP_MMSEG = """
_base_ = 'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'
custom_imports = dict(imports=['mmmetaformer'], allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, type='mmmetaformer.ConvFormer', arch='s18', drop_path_rate=0.2,
                  init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/sail/dl/resolve/main/convformer/convformer_s18.pth')),
    decode_head=dict(in_channels=[64, 128, 320, 512]),
    auxiliary_head=dict(in_channels=320))
"""


@pytest.mark.parametrize('text', [SWAP_MMDET, SWAP_MMSEG], ids=['mmdet', 'mmseg'])
@pytest.mark.slow
def test_backbone_swaps_into_toolbox_config(text, tmp_path):
    """Only the backbone dict and the neck/head in_channels of mmdet's / mmseg's own config
    change; the model builds and trains one iteration (SGD as in the toolbox config)."""
    from mmengine.optim import build_optim_wrapper
    path = tmp_path / 'swap.py'
    path.write_text(text)
    cfg = Config.fromfile(str(path))
    scope = cfg.default_scope
    if scope == 'mmseg':
        cfg.model.data_preprocessor.size = (128, 128)  # test speed: no padding to 512x512
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(scope):
        model = build_model(cfg)
        model.train()
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        # two images: the segmentor's BatchNorm after global pooling needs a batch > 1
        inputs, samples = _dummy_batch(scope, 128, num=2)
        for sample in samples:
            if scope == 'mmdet':
                from mmdet.structures.mask import BitmapMasks
                from mmengine.structures import InstanceData
                masks = torch.zeros(1, 128, 128, dtype=torch.uint8)
                masks[0, 20:80, 30:100] = 1
                sample.gt_instances = InstanceData(
                    bboxes=torch.tensor([[30., 20., 100., 80.]]), labels=torch.tensor([1]),
                    masks=BitmapMasks(masks.numpy(), 128, 128))
            else:
                from mmengine.structures import PixelData
                sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 128, 128)))
        before = model.backbone.stem.conv.weight.detach().clone()
        data = dict(inputs=list((inputs * 255).byte()), data_samples=samples)
        log_vars = model.train_step(data, optim_wrapper)
    assert torch.isfinite(log_vars['loss'])
    assert not torch.equal(before, model.backbone.stem.conv.weight)
