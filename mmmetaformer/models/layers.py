"""Small layers shared by the MetaFormer blocks and heads.

Inside the stages tensors are channels-last (B, H, W, C), as in the official code: Linear
layers act on the last dim (on CPU as 1x1 convs, see :class:`PointwiseLinear`) and 2-D ops run
on a permuted view, which PyTorch treats as a channels_last NCHW tensor without copying.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import MODELS


class PointwiseLinear(nn.Linear):
    """``nn.Linear`` over the channels of a channels-last (B, H, W, C) tensor.

    On CPU it runs as a 1x1 convolution of the channels_last NCHW view of ``x``: oneDNN computes
    that 2-3x faster than the BLAS GEMM behind ``F.linear``, forward and backward (README,
    "Benchmark"). Same parameters (2-D weight), same result up to float rounding.
    """

    def forward(self, x):
        if x.device.type != 'cpu' or x.dim() != 4:
            return super().forward(x)
        weight = self.weight[:, :, None, None]
        return F.conv2d(x.permute(0, 3, 1, 2), weight, self.bias).permute(0, 2, 3, 1)


class Mlp(nn.Module):
    """The block's channel MLP: ``fc2(act(fc1(x)))`` on a channels-last tensor."""

    def __init__(self, dim: int, hidden: int, act_layer, bias: bool = True):
        super().__init__()
        self.fc1 = PointwiseLinear(dim, hidden, bias=bias)
        self.act = act_layer()
        self.fc2 = PointwiseLinear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _scaled_square_(relu, scale, bias):
    """``scale * relu ** 2 + bias`` written into ``relu`` (scale and bias cast to its dtype:
    in-place ops on mixed dtypes, as under autocast, would copy)."""
    return relu.square_().mul_(scale.to(relu.dtype)).add_(bias.to(relu.dtype))


class _StarReLUFunction(torch.autograd.Function):
    """StarReLU computed in one new tensor, saving only ``x`` for the backward pass (which
    recomputes ``relu(x)``)."""

    @staticmethod
    def forward(ctx, x, scale, bias):
        ctx.save_for_backward(x, scale)
        return _scaled_square_(F.relu(x), scale, bias)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        relu = F.relu(x)
        grad_scale = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * relu).mul_(relu).sum().reshape(1).to(scale.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum().reshape(1).to(scale.dtype)
        grad_x = relu.mul_(grad).mul_(2 * scale.to(x.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, grad_scale, grad_bias


class StarReLU(nn.Module):
    """StarReLU: ``s * relu(x) ** 2 + b`` with learnable scalars s (init 1) and b (init 0).

    ``inplace=True`` overwrites ``x`` when no gradients are recorded (inference), as the
    blocks do with the fresh output of their pointwise layer.
    """

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self.scale = nn.Parameter(torch.full((1,), scale_value))
        self.bias = nn.Parameter(torch.full((1,), bias_value))

    def forward(self, x):
        if self.inplace and not torch.is_grad_enabled():
            return _scaled_square_(x.relu_(), self.scale, self.bias)
        return _StarReLUFunction.apply(x, self.scale, self.bias)


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
