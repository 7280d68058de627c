# The README demo: configs/caformer_s18_maskrcnn.py trained from scratch (no pretrained
# download) on the demo COCO set that tools/demo.py writes to data/demo/coco (128 train and
# 32 val PNG images of 256x192: upright circles, squares and triangles, tilted by up to 15
# degrees, one range of areas, classes drawn evenly): 3 epochs of 64 iterations at batch 2 on
# the CPU. From scratch at batch 2: lr 4e-4 (the recipe's is 2e-4 at batch 16), a short warmup,
# cosine decay and gradient clipping.
_base_ = '../caformer_s18_maskrcnn.py'

data_root = 'data/demo/coco/'
metainfo = dict(classes=('circle', 'square', 'triangle'))
image_scale = (256, 192)
max_epochs = 3
max_iters = max_epochs * 64  # 128 training images, batch 2

model = dict(
    backbone=dict(drop_path_rate=0.0, init_cfg=dict(
        _delete_=True, type='TruncNormal', layer=['Conv2d', 'Linear'], std=.02, bias=0.)),
    roi_head=dict(bbox_head=dict(num_classes=3), mask_head=dict(num_classes=3)),
    # fewer proposals and samples than COCO needs: a few objects per image
    train_cfg=dict(rpn_proposal=dict(nms_pre=1000, max_per_img=300),
                   rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=300), rcnn=dict(max_per_img=20)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json',
                     classwise=True)  # per-class AP in the log and the results
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(lr=4e-4, fused=True), clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=50, end=max_iters, eta_min=4e-6),
]
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
default_hooks = dict(logger=dict(interval=8),
                     checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
log_processor = dict(window_size=8)
randomness = dict(seed=0)
