"""Layer-wise lr decay from mmdet, mmseg and mmpretrain configs."""
import pytest
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope

import mmmetaformer  # noqa: F401
from mmmetaformer.models import CAFormer

BACKBONE = dict(type='mmmetaformer.CAFormer',
                arch=dict(depths=(1, 2, 3, 1), dims=(16, 32, 64, 96)))
MODELS = {
    'mmdet': dict(
        type='RetinaNet',
        data_preprocessor=dict(type='DetDataPreprocessor'),
        backbone=BACKBONE,
        neck=dict(type='FPN', in_channels=[16, 32, 64, 96], out_channels=16, num_outs=5,
                  start_level=1, add_extra_convs='on_input'),
        bbox_head=dict(type='RetinaHead', num_classes=3, in_channels=16, feat_channels=16,
                       anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4,
                                             scales_per_octave=3, ratios=[0.5, 1.0, 2.0],
                                             strides=[8, 16, 32, 64, 128]),
                       bbox_coder=dict(type='DeltaXYWHBBoxCoder'),
                       loss_cls=dict(type='FocalLoss', use_sigmoid=True),
                       loss_bbox=dict(type='L1Loss'))),
    'mmseg': dict(
        type='EncoderDecoder',
        backbone=BACKBONE,
        decode_head=dict(type='FCNHead', in_channels=96, in_index=3, channels=16,
                         num_classes=4, num_convs=1)),
    'mmpretrain': dict(
        type='ImageClassifier',
        backbone=dict(BACKBONE, out_indices=(3, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=4, in_channels=96)),
}


def build(scope, paramwise_cfg, constructor='mmmetaformer.LayerDecayOptimWrapperConstructor',
          **backbone):
    registry = pytest.importorskip(f'{scope}.registry')
    cfg = dict(MODELS[scope])
    cfg['backbone'] = dict(cfg['backbone'], **backbone)
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.MODELS.build(cfg)
        wrapper = build_optim_wrapper(model, dict(
            constructor=constructor, paramwise_cfg=paramwise_cfg,
            optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05)))
    return model, wrapper


def group_of(wrapper):
    return {id(p): g for g in wrapper.optimizer.param_groups for p in g['params']}


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg', 'mmpretrain'])
def test_layer_wise_decay(scope):
    model, wrapper = build(scope, dict(decay_rate=0.5, decay_type='layer_wise'))
    groups = group_of(wrapper)
    depths = (1, 2, 3, 1)
    num_layers = sum(depths) + 2
    backbone = model.backbone

    def lr(p):
        return groups[id(p)]['lr']

    assert lr(backbone.stem.conv.weight) == pytest.approx(1e-3 * 0.5**(num_layers - 1))
    block = 0
    for i, stage in enumerate(backbone.stages):
        for j, blk in enumerate(stage.blocks):
            block += 1
            expected = 1e-3 * 0.5**(num_layers - 1 - block)
            assert lr(blk.mlp.fc1.weight) == pytest.approx(expected), (i, j)
            if j == 0 and i > 0:
                assert lr(stage.downsample.conv.weight) == pytest.approx(expected)
    others = [p for n, p in model.named_parameters() if not n.startswith('backbone.stages')
              and not n.startswith('backbone.stem')]
    assert others and all(lr(p) == pytest.approx(1e-3) for p in others)
    for name, p in model.named_parameters():
        no_decay = p.ndim == 1 or name.endswith('bias')
        assert groups[id(p)]['weight_decay'] == (0. if no_decay else 0.05), name
    scalars = [backbone.stages[0].blocks[0].mlp.act.scale, backbone.stages[2].blocks[0].res_scale1.scale,
               backbone.stages[1].blocks[0].norm1.weight, backbone.stem.conv.bias]
    assert all(groups[id(p)]['weight_decay'] == 0. for p in scalars)


def test_layer_ids_spread_evenly_over_num_layers():
    backbone = CAFormer(arch='s36')  # depths [3, 12, 18, 3]
    ids = [backbone.get_layer_depth(f'stages.{i}.blocks.{j}.mlp.fc1.weight', num_layers=12)[0]
           for i, d in enumerate(backbone.depths) for j in range(d)]
    assert ids == sorted(ids) and ids[0] == 1 and ids[-1] == 10
    counts = [ids.count(k) for k in range(1, 11)]
    assert max(counts) - min(counts) <= 1  # 36 blocks over 10 ids
    assert backbone.get_layer_depth('stem.conv.weight', num_layers=12) == (0, 12)
    assert backbone.get_layer_depth('norm3.weight', num_layers=12) == (11, 12)


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_stage_wise_decay(scope):
    model, wrapper = build(scope, dict(decay_rate=0.8, decay_type='stage_wise'))
    groups = group_of(wrapper)
    for i, stage in enumerate(model.backbone.stages):
        for p in stage.parameters():
            assert groups[id(p)]['lr'] == pytest.approx(1e-3 * 0.8**(6 - 1 - (i + 1)))


def test_frozen_parameters_left_out():
    model, wrapper = build('mmdet', dict(decay_rate=0.9), frozen_stages=1)
    optimized = {id(p) for g in wrapper.optimizer.param_groups for p in g['params']}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert optimized == trainable
    assert not any(id(p) in optimized for p in model.backbone.stages[0].parameters())


def test_bad_paramwise_cfg():
    with pytest.raises(ValueError, match='unknown paramwise_cfg keys'):
        build('mmdet', dict(decay_rate=0.9, layer_decay_rate=0.9))
    with pytest.raises(ValueError, match='decay_type'):
        build('mmdet', dict(decay_type='block_wise'))


def test_mmpretrain_constructor_uses_get_layer_depth():
    model, wrapper = build(
        'mmpretrain', dict(layer_decay_rate=0.5),
        constructor='LearningRateDecayOptimWrapperConstructor')
    groups = group_of(wrapper)
    num_layers = sum((1, 2, 3, 1)) + 2
    assert groups[id(model.backbone.stem.conv.weight)]['lr'] == pytest.approx(
        1e-3 * 0.5**(num_layers - 1))
    assert groups[id(model.head.fc.weight)]['lr'] == pytest.approx(1e-3)
