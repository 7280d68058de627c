# Cascade Mask R-CNN + FPN (4conv1fc box heads with SyncBN and GIoU loss), 3x multi-scale
# schedule on COCO: the protocol of mmdet's ConvNeXt config (DETR-style multi-scale resize +
# crop, AdamW lr 2e-4, weight decay 0.05, 16 images per batch = 8 GPUs x 2, 36 epochs with lr
# steps at epochs 27 and 33, 1000 warmup iterations, layer-wise lr decay 0.7 over 6 layer
# ids). Train with --amp on GPUs as the ConvNeXt config does. Per-model configs set the
# backbone and the FPN's in_channels.
_base_ = ('mmdet::convnext/'
          'cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py')
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
    paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise', num_layers=6),
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05))
auto_scale_lr = dict(base_batch_size=16)
