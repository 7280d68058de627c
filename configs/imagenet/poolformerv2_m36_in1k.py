# poolformerv2_m36 on ImageNet-1K, 300 epochs at batch 4096 (paper: 82.2 top-1);
# GPUs x batch x accumulative_counts: see _base_/schedule_300e.py.
_base_ = ['./_base_/metaformer_in1k.py']

model = dict(
    backbone=dict(type='mmmetaformer.PoolFormerV2', arch='m36', drop_path_rate=0.3),
    head=dict(in_channels=768))
