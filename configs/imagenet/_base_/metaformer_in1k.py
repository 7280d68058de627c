# A MetaFormer classifier trained from scratch on ImageNet-1K (the papers' recipe).
# The backbone returns its raw last stage (out_indices=(3,), out_norm=None); the head applies
# the official final norm and classifier. Per-model configs set the backbone type, arch, drop
# path rate and the head's in_channels / dropout.
# _scope_='mmpretrain' on the mmpretrain types a Runner builds from this file: they stay
# mmpretrain's where the file is inherited as 'mmmetaformer::imagenet/...', which mmengine
# reads under the scope mmmetaformer (docs/get_started.md, configs by scope).
_base_ = ['./default_runtime.py', './imagenet_bs128_224.py', './schedule_300e.py']

model = dict(
    type='ImageClassifier',
    _scope_='mmpretrain',
    backbone=dict(out_indices=(3, ), out_norm=None),
    head=dict(
        type='mmmetaformer.MetaFormerClsHead',
        num_classes=1000,
        norm='LN',
        mlp_head=False,
        head_dropout=0.,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
    ),
    # mixup 0.8 / cutmix 1.0, one of them per batch (timm's switch prob 0.5)
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]),
)
