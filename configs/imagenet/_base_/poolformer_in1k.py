# PoolFormer v1: the official classifier (GroupNorm, 1 group, on the last map, then mean, then
# Linear) and the official test crop_pct 0.9 (224 / 0.9 -> short edge 248). The paper trains
# with batch 1024 and lr 1e-3, the same lr per sample as 4e-3 at 4096.
_base_ = ['./metaformer_in1k.py']

model = dict(head=dict(norm='GN'))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=248, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
