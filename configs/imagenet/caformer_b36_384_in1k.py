# caformer_b36 fine-tuned at 384x384 from its 224 weights (paper: 86.4 top-1).
_base_ = ['./_base_/caformer_384_in1k.py']

model = dict(
    backbone=dict(type='mmmetaformer.CAFormer', arch='b36', drop_path_rate=0.8),
    head=dict(in_channels=768, head_dropout=0.5))
# the 224 model: this run of caformer_b36_in1k.py, or its official weights converted
# by tools/convert_checkpoint.py
load_from = 'work_dirs/caformer_b36_in1k/epoch_300.pth'
