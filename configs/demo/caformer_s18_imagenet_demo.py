# Classification on the demo data: configs/imagenet/caformer_s18_in1k.py (the paper's recipe,
# LAMB) trained from scratch on the demo ImageNet set that
# tools/make_demo_data.py writes to data/demo/imagenet (4 shape classes, 64 train and 16 val
# images of 64x64) on the CPU: 64x64 inputs, batch 16, 10 epochs, light augmentation (no
# RandAugment, erasing, mixup or cutmix), top-1 accuracy (4 classes: no top-5).
_base_ = '../imagenet/caformer_s18_in1k.py'

data_root = 'data/demo/imagenet'
metainfo = dict(classes=('circle', 'square', 'triangle', 'cross'))
image_size = 64
max_epochs = 10

data_preprocessor = dict(num_classes=4)
model = dict(backbone=dict(drop_path_rate=0.0), head=dict(num_classes=4), train_cfg=None)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=image_size, crop_ratio_range=(0.5, 1.0),
         backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=image_size, edge='short', backend='pillow',
         interpolation='bicubic'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=16, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=16, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(lr=2e-3), accumulative_counts=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=2,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=2, end=max_epochs,
         convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
default_hooks = dict(logger=dict(interval=4),
                     checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
randomness = dict(seed=0)
