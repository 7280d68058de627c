# Semantic FPN on ADE20K, 512x512 crops, 40k iterations: the PoolFormer paper's protocol as in
# mmseg's PoolFormer config (AdamW lr 2e-4, weight decay 1e-4, 32 images per batch = 8 GPUs
# x 4, poly lr decay with power 0.9). Per-model configs set the backbone and the FPN's
# in_channels.
_base_ = 'mmseg::poolformer/fpn_poolformer_s12_8xb4-40k_ade20k-512x512.py'
custom_imports = dict(imports=['mmmetaformer'], allow_failed_imports=False)
# the run components (docs/safety.md): checked loads and resume, crash-safe checkpoints
runner_type = 'mmmetaformer.SafeRunner'
default_hooks = dict(checkpoint=dict(type='mmmetaformer.SafeCheckpointHook'))
checkpoint_file = None  # the inherited mmpretrain weight; ours is model.backbone.init_cfg

model = dict(backbone=dict(_delete_=True, out_indices=(0, 1, 2, 3)))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4))
auto_scale_lr = dict(enable=False, base_batch_size=32)
