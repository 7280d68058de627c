# CAFormer pretrained on ImageNet-21K: as ConvFormer (convformer_in21k.py) with LAMB lr 8e-3.
_base_ = ['./convformer_in21k.py']

optim_wrapper = dict(optimizer=dict(type='Lamb', lr=8e-3))
