# caformer_m36 pretrained on ImageNet-21K (21841 classes), 90 epochs at batch 4096.
_base_ = ['./_base_/caformer_in21k.py']

model = dict(
    backbone=dict(type='mmmetaformer.CAFormer', arch='m36', drop_path_rate=0.4),
    head=dict(in_channels=576, head_dropout=0.4))
