# caformer_s18 on ImageNet-1K, 300 epochs at batch 4096 (paper: 83.6 top-1);
# GPUs x batch x accumulative_counts: see _base_/schedule_300e.py.
_base_ = ['./_base_/caformer_in1k.py']

model = dict(
    backbone=dict(type='mmmetaformer.CAFormer', arch='s18', drop_path_rate=0.15),
    head=dict(in_channels=512))
