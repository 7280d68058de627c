# ConvFormer pretrained on ImageNet-21K (21841 classes, the Fall 2011 release) in mmpretrain's
# ImageNet21k layout: data/imagenet21k/train/<wnid>/*.JPEG and meta/train.txt
# ("<wnid>/<file> <label>" lines; without it the folders are scanned, which is slow).
# Recipe: the ImageNet-1K one (optimizer, lr at batch 4096, augmentation, mixup/cutmix, label
# smoothing, drop path) over 90 epochs with 5 warmup epochs; no validation set.
_base_ = ['./convformer_in1k.py']

data_preprocessor = dict(num_classes=21841)
model = dict(head=dict(num_classes=21841))
train_dataloader = dict(dataset=dict(type='ImageNet21k', data_root='data/imagenet21k'))
val_dataloader = val_cfg = val_evaluator = None
test_dataloader = test_cfg = test_evaluator = None
warmup_epochs = 5
max_epochs = 90
param_scheduler = [
    dict(type='LinearLR', start_factor=2.5e-4, by_epoch=True, begin=0, end=warmup_epochs,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=warmup_epochs,
         end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=max_epochs)
