# Segmentation on the demo data: configs/ade20k/upernet_caformer-s18_8xb2-160k_ade20k-512x512.py
# trained from scratch (no pretrained download) on the demo ADE20K set that tools/demo.py
# writes to data/demo/ade20k (64 train and 16 val images of 320x256; labels wall, building,
# sky, floor) on the CPU.
_base_ = '../ade20k/upernet_caformer-s18_8xb2-160k_ade20k-512x512.py'

data_root = 'data/demo/ade20k'
metainfo = dict(classes=('wall', 'building', 'sky', 'floor'))
image_scale = (320, 256)
crop_size = (256, 256)
max_iters = 200
norm_cfg = dict(type='BN', requires_grad=True)  # the base's SyncBN needs GPUs under DDP

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(drop_path_rate=0.0, init_cfg=dict(
        _delete_=True, type='TruncNormal', layer=['Conv2d', 'Linear'], std=.02, bias=0.)),
    decode_head=dict(num_classes=4, norm_cfg=norm_cfg),
    auxiliary_head=dict(num_classes=4, norm_cfg=norm_cfg),
    test_cfg=dict(_delete_=True, mode='whole'))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=image_scale, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=4e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=20, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(logger=dict(interval=10),
                     checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
