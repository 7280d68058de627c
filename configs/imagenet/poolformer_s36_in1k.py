# poolformer_s36 on ImageNet-1K, 300 epochs at batch 4096 (paper: 81.4 top-1);
# GPUs x batch x accumulative_counts: see _base_/schedule_300e.py.
_base_ = ['./_base_/poolformer_in1k.py']

model = dict(
    backbone=dict(type='mmmetaformer.PoolFormer', arch='s36', drop_path_rate=0.2),
    head=dict(in_channels=512))
