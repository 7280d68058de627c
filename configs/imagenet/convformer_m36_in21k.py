# convformer_m36 pretrained on ImageNet-21K (21841 classes), 90 epochs at batch 4096.
_base_ = ['./_base_/convformer_in21k.py']

model = dict(
    backbone=dict(type='mmmetaformer.ConvFormer', arch='m36', drop_path_rate=0.4),
    head=dict(in_channels=576))
