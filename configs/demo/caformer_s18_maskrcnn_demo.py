# The README demo: configs/caformer_s18_maskrcnn.py trained from scratch (no pretrained
# download) on the demo COCO set that tools/demo.py writes to data/demo/coco (128 train and
# 32 val PNG images of 256x192: upright circles, squares and triangles, one range of areas,
# classes drawn evenly), resized to 192x144: 3 epochs of 64 iterations at batch 2 on the CPU.
# From scratch at batch 2: lr 4e-4 (the recipe's is 2e-4 at batch 16), a short warmup, cosine
# decay and gradient clipping.
#
# Cut to run in minutes on 2 CPU cores, each cut one that keeps every class's bbox AP: no
# stride-4 FPN level (the shapes are at least 19 px wide at 192x144 and the anchors start at
# 32 px), 2 mask-head convs instead of 4, 192x144 instead of 256x192, and 32 sampled RoIs per
# image instead of 512.
_base_ = '../caformer_s18_maskrcnn.py'

data_root = 'data/demo/coco/'
metainfo = dict(classes=('circle', 'square', 'triangle'))
image_scale = (192, 144)  # the images are written at 256x192
max_epochs = 3
max_iters = max_epochs * 64  # 128 training images, batch 2

model = dict(
    backbone=dict(out_indices=(1, 2, 3), drop_path_rate=0.0, init_cfg=dict(
        _delete_=True, type='TruncNormal', layer=['Conv2d', 'Linear'], std=.02, bias=0.)),
    # P3-P7 instead of P2-P6: strides 8-32 of the backbone, two extra levels on the last
    neck=dict(in_channels=[128, 320, 512], add_extra_convs='on_output'),
    rpn_head=dict(anchor_generator=dict(scales=[4], strides=[8, 16, 32, 64, 128])),
    roi_head=dict(
        bbox_roi_extractor=dict(featmap_strides=[8, 16, 32, 64]),
        mask_roi_extractor=dict(featmap_strides=[8, 16, 32, 64]),
        bbox_head=dict(num_classes=3), mask_head=dict(num_convs=2, num_classes=3)),
    # fewer proposals and samples than COCO needs: a few objects per image
    train_cfg=dict(rpn_proposal=dict(nms_pre=1000, max_per_img=300),
                   rcnn=dict(sampler=dict(num=32))),
    # the demo's shapes never overlap, so boxes of one class overlapping by IoU > 0.3 are
    # duplicates (the COCO configs keep 0.5: real objects do overlap)
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=100),
                  rcnn=dict(nms=dict(iou_threshold=0.3), max_per_img=20)))

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
# a checkpoint every epoch, the last one kept: a killed run resumes (--resume) where it was
default_hooks = dict(logger=dict(interval=8), checkpoint=dict(interval=1, max_keep_ckpts=1))
log_processor = dict(window_size=8)
randomness = dict(seed=0)
