# randformer_s24 on ImageNet-1K, 300 epochs at batch 4096 (paper: 78.2 top-1);
# GPUs x batch x accumulative_counts: see _base_/schedule_300e.py.
_base_ = ['./_base_/metaformer_in1k.py']

model = dict(
    backbone=dict(type='mmmetaformer.RandFormer', arch='s24', drop_path_rate=0.1),
    head=dict(in_channels=512))
