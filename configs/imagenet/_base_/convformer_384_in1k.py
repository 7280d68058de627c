# ConvFormer fine-tuned at 384x384 from its 224 weights (`load_from` in the per-model config),
# as the official scripts: 30 epochs, total batch 1024 (8 GPUs x 32 x accumulative_counts 4),
# AdamW lr 5e-5 constant, no mixup/cutmix, RandAugment/erasing/label smoothing as in
# pretraining, and an EMA of the weights (decay 0.9999 per optimizer step).
_base_ = ['./convformer_in1k.py']

model = dict(train_cfg=None)  # no mixup / cutmix
bgr_mean, bgr_std = [103.53, 116.28, 123.675], [57.375, 57.12, 58.395]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=384, backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='RandAugment', policies='timm_increasing', num_policies=2, total_level=10,
         magnitude_level=9, magnitude_std=0.5,
         hparams=dict(pad_val=[round(x) for x in bgr_mean], interpolation='bicubic')),
    dict(type='RandomErasing', erase_prob=0.25, mode='rand', min_area_ratio=0.02,
         max_area_ratio=1 / 3, fill_color=bgr_mean, fill_std=bgr_std),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=384, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=384),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=32, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=32, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=5e-5), accumulative_counts=4)
param_scheduler = []  # constant lr
train_cfg = dict(max_epochs=30)
# EMAHook updates every iteration: 1e-4 / accumulative_counts per iteration is a decay of
# 0.9999 per optimizer step.
custom_hooks = [dict(type='EMAHook', momentum=2.5e-5, priority='ABOVE_NORMAL')]
auto_scale_lr = dict(base_batch_size=1024)
