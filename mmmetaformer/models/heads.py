"""The official MetaFormer classifiers as an mmpretrain head (``ImageClassifier`` without a neck).

Parameter names equal timm's (``norm``, ``fc``, ``fc.fc1``/``fc.norm``/``fc.fc2``), so official
and timm checkpoints map onto ``head.*`` by renaming only (see :mod:`mmmetaformer.checkpoints`).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from mmpretrain.models.heads import ClsHead

from .layers import SquaredReLU


class MlpHead(nn.Module):
    """ConvFormer/CAFormer classifier: Linear(D, 4D), SquaredReLU, LayerNorm(eps 1e-5),
    dropout, Linear(4D, classes)."""

    def __init__(self, in_channels: int, num_classes: int, mlp_ratio: int = 4,
                 dropout: float = 0.):
        super().__init__()
        hidden = mlp_ratio * in_channels
        self.fc1 = nn.Linear(in_channels, hidden)
        self.act = SquaredReLU()
        self.norm = nn.LayerNorm(hidden, eps=1e-5)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(self.drop(self.norm(self.act(self.fc1(x)))))


class MetaFormerClsHead(ClsHead):
    """The official MetaFormer classifier on the last backbone feature map (NCHW).

    Args:
        num_classes (int): number of classes.
        in_channels (int): channels of the last feature map.
        norm (str): ``'LN'``: mean over H, W, then LayerNorm (eps 1e-6, with bias), as in
            PoolFormerV2, IdentityFormer, RandFormer, ConvFormer and CAFormer. ``'GN'``:
            GroupNorm with 1 group (eps 1e-5, with bias) on the map, then mean over H, W, as
            in PoolFormer v1.
        mlp_head (bool): the ConvFormer/CAFormer :class:`MlpHead` instead of a Linear.
        head_dropout (float): dropout before the last Linear.
        **kwargs: :class:`mmpretrain.models.ClsHead` arguments (``loss``, ``topk``, ...).
    """

    def __init__(self,
                 num_classes: int,
                 in_channels: int,
                 norm: str = 'LN',
                 mlp_head: bool = False,
                 head_dropout: float = 0.,
                 init_cfg: Optional[dict] = dict(type='TruncNormal', layer='Linear', std=.02,
                                                 bias=0.),
                 **kwargs):
        super().__init__(init_cfg=init_cfg, **kwargs)
        if norm not in ('LN', 'GN'):
            raise ValueError(f"norm must be 'LN' or 'GN', got {norm!r}")
        if num_classes <= 0:
            raise ValueError(f'num_classes must be positive, got {num_classes}')
        self.num_classes, self.in_channels = num_classes, in_channels
        self.pool_first = norm == 'LN'
        self.norm = (nn.LayerNorm(in_channels, eps=1e-6) if self.pool_first else
                     nn.GroupNorm(1, in_channels, eps=1e-5))
        if mlp_head:
            self.drop = nn.Identity()
            self.fc = MlpHead(in_channels, num_classes, dropout=head_dropout)
        else:
            self.drop = nn.Dropout(head_dropout)
            self.fc = nn.Linear(in_channels, num_classes)

    def pre_logits(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        """The pooled, normalised feature of the last map: (N, in_channels)."""
        x = feats[-1]
        if self.pool_first:
            return self.norm(x.mean((2, 3)))
        return self.norm(x).mean((2, 3))

    def forward(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        return self.fc(self.drop(self.pre_logits(feats)))
