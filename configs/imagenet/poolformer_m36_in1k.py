# poolformer_m36 on ImageNet-1K, 300 epochs at batch 4096 (paper: 82.1 top-1);
# GPUs x batch x accumulative_counts: see _base_/schedule_300e.py.
_base_ = ['./_base_/poolformer_in1k.py']

model = dict(
    backbone=dict(type='mmmetaformer.PoolFormer', arch='m36', drop_path_rate=0.3),
    head=dict(in_channels=768))
# official test crop_pct 0.95: short edge 224 / 0.95 -> 235
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=235, edge='short', backend='pillow',
         interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
