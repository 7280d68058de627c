"""Small layers shared by the MetaFormer blocks and heads.

Inside the stages tensors are channels-last (B, H, W, C), as in the official code: Linear
layers act on the last dim and 2-D ops (convs, pooling) run on a permuted view, which PyTorch
treats as a channels_last NCHW tensor without copying.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import MODELS


class StarReLU(nn.Module):
    """StarReLU: ``s * relu(x) ** 2 + b`` with learnable scalars s (init 1) and b (init 0)."""

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), scale_value))
        self.bias = nn.Parameter(torch.full((1,), bias_value))

    def forward(self, x):
        return torch.addcmul(self.bias, self.scale, F.relu(x).square())


class SquaredReLU(nn.Module):
    """Squared ReLU: ``relu(x) ** 2``."""

    def forward(self, x):
        return F.relu(x).square()


class Scale(nn.Module):
    """Learnable per-channel scale of a channels-last tensor (layer scale / res scale)."""

    def __init__(self, dim: int, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x):
        return x * self.scale


class GroupNorm1(nn.Module):
    """The "modified LayerNorm" of the MetaFormer papers on a channels-last tensor.

    Normalises each sample over (H, W, C) jointly (GroupNorm with one group), then applies a
    per-channel weight and, optionally, bias.
    """

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        x = F.group_norm(x.permute(0, 3, 1, 2), 1, self.weight, self.bias, self.eps)
        return x.permute(0, 2, 3, 1)


@MODELS.register_module('LN2d')
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (``type='mmmetaformer.LN2d'``)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
