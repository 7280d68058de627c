# CAFormer: as ConvFormer (MLP head, 20 warmup epochs) with LAMB lr 8e-3.
_base_ = ['./convformer_in1k.py']

optim_wrapper = dict(optimizer=dict(type='Lamb', lr=8e-3))
