# convformer_m36 on ImageNet-1K, 300 epochs at batch 4096 (paper: 84.5 top-1);
# GPUs x batch x accumulative_counts: see _base_/schedule_300e.py.
_base_ = ['./_base_/convformer_in1k.py']

model = dict(
    backbone=dict(type='mmmetaformer.ConvFormer', arch='m36', drop_path_rate=0.4),
    head=dict(in_channels=576))
