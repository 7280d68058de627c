# Mask R-CNN + FPN, 1x schedule on COCO: the PoolFormer paper's protocol (AdamW lr 2e-4,
# weight decay 1e-4, 16 images per batch = 8 GPUs x 2, 1333x800, 12 epochs with lr steps at
# epochs 8 and 11, 500 warmup iterations). Per-model configs set the backbone's type, arch,
# drop_path_rate and pretrained init_cfg, and the FPN's in_channels.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmmetaformer'], allow_failed_imports=False)
# the run components (docs/safety.md): checked loads and resume, crash-safe checkpoints
runner_type = 'mmmetaformer.SafeRunner'
default_hooks = dict(checkpoint=dict(type='mmmetaformer.SafeCheckpointHook'))

model = dict(backbone=dict(_delete_=True, out_indices=(0, 1, 2, 3)))
optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=2e-4, weight_decay=1e-4))
auto_scale_lr = dict(base_batch_size=16)
