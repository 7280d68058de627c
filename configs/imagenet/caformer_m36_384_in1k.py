# caformer_m36 fine-tuned at 384x384 from its 224 weights (paper: 86.2 top-1).
_base_ = ['./_base_/caformer_384_in1k.py']

model = dict(
    backbone=dict(type='mmmetaformer.CAFormer', arch='m36', drop_path_rate=0.7),
    head=dict(in_channels=576, head_dropout=0.4))
# the 224 model: this run of caformer_m36_in1k.py, or its official weights converted
# by tools/convert_checkpoint.py
load_from = 'work_dirs/caformer_m36_in1k/epoch_300.pth'
