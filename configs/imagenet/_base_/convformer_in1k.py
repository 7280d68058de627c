# ConvFormer: MLP head (Linear 4D, SquaredReLU, LayerNorm eps 1e-5, dropout, Linear), AdamW
# lr 4e-3 with 20 warmup epochs.
_base_ = ['./metaformer_in1k.py']

model = dict(head=dict(mlp_head=True))
warmup_epochs = 20
param_scheduler = [
    dict(type='LinearLR', start_factor=2.5e-4, by_epoch=True, begin=0, end=warmup_epochs,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=warmup_epochs,
         end=300, convert_to_iter_based=True),
]
