# The papers' ImageNet-1K schedule: 300 epochs, total batch 4096, AdamW lr 4e-3 (CAFormer:
# LAMB 8e-3), weight decay 0.05 except for 1-D parameters (norm weights and biases, res/layer
# scales, StarReLU scalars) and biases, linear warmup from 1e-6 (5 epochs; ConvFormer and
# CAFormer 20), then cosine to 1e-5.
#
# Batch 4096 = GPUs x train_dataloader.batch_size x optim_wrapper.accumulative_counts; the
# default is 8 GPUs x 128 x 4. With other hardware keep the product at 4096 (e.g. 16 GPUs x 128
# x 2, 32 x 128 x 1, 8 x 64 x 8). `tools/train.py --auto-scale-lr` scales the lr by
# GPUs x batch_size / 4096 and does not count accumulative_counts: use it only to train at
# another total batch without accumulation.
# _scope_='mmpretrain' on the mmpretrain types a Runner builds from this file: they stay
# mmpretrain's where the file is inherited as 'mmmetaformer::imagenet/...', which mmengine
# reads under the scope mmmetaformer (docs/get_started.md, configs by scope).
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=4e-3, weight_decay=0.05, _scope_='mmpretrain'),
    accumulative_counts=4,
    paramwise_cfg=dict(norm_decay_mult=0., bias_decay_mult=0., flat_decay_mult=0.),
)
warmup_epochs = 5
max_epochs = 300
param_scheduler = [
    dict(type='LinearLR', start_factor=2.5e-4, by_epoch=True, begin=0, end=warmup_epochs,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=warmup_epochs,
         end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=4096)
