# UperNet on ADE20K, 512x512 crops, 160k iterations: the protocol of mmseg's ConvNeXt config
# (AdamW lr 1e-4, weight decay 0.05, 16 images per batch = 8 GPUs x 2, 1500 warmup iterations
# then poly decay, stage-wise lr decay 0.9, sliding-window test). Train with --amp on GPUs as
# the ConvNeXt config does. Per-model configs set the backbone, decode_head.in_channels (the
# four stage widths) and auxiliary_head.in_channels (the third).
_base_ = 'mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py'
custom_imports = dict(imports=['mmmetaformer'], allow_failed_imports=False)
# the run components (docs/safety.md): checked loads and resume, crash-safe checkpoints
runner_type = 'mmmetaformer.SafeRunner'
default_hooks = dict(checkpoint=dict(type='mmmetaformer.SafeCheckpointHook'))
checkpoint_file = None  # the inherited ConvNeXt weight; ours is model.backbone.init_cfg

model = dict(backbone=dict(_delete_=True, out_indices=(0, 1, 2, 3)))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='mmmetaformer.LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise'),
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))
auto_scale_lr = dict(enable=False, base_batch_size=16)
