# CAFormer fine-tuned at 384x384: as ConvFormer (convformer_384_in1k.py) with LAMB lr 1e-4.
_base_ = ['./convformer_384_in1k.py']

optim_wrapper = dict(optimizer=dict(type='Lamb', lr=1e-4))
