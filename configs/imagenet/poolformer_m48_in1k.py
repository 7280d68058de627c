# poolformer_m48 on ImageNet-1K, 300 epochs at batch 4096 (paper: 82.5 top-1);
# GPUs x batch x accumulative_counts: see _base_/schedule_300e.py.
# The m36 recipe, test crop_pct 0.95 included, with the m48 backbone.
_base_ = ['./poolformer_m36_in1k.py']

model = dict(backbone=dict(arch='m48', drop_path_rate=0.4))
