"""Small layers shared by the MetaFormer blocks and heads.

Inside the stages tensors are channels-last (B, H, W, C), as in the official code: Linear
layers act on the last dim (on CPU as 1x1 convs, see :class:`PointwiseLinear`) and 2-D ops run
on a permuted view, which PyTorch treats as a channels_last NCHW tensor without copying.

Custom autograd functions save memory or time in training. Under ``torch.jit`` tracing
(mmengine's FLOP counter, which the ``get_flops`` tools of mmdet and mmseg call, and the
TorchScript ONNX exporter) the same computation runs in plain ops that such tools know: a
traced custom function is an opaque ``prim::PythonOp``.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import MODELS


class PointwiseLinear(nn.Linear):
    """``nn.Linear`` over the channels of a channels-last (B, H, W, C) tensor.

    On CPU it runs as a 1x1 convolution of the channels_last NCHW view of ``x``: oneDNN
    computes that faster than the BLAS GEMM behind ``F.linear`` on AVX-512 CPUs and as fast on
    AVX2, forward and backward (see the benchmark docs). Same parameters (2-D weight), same
    result up to float rounding.

    ``forward(x, unscale)`` takes an input scaled down by ``unscale`` (see
    :meth:`StarReLU.forward_scaled`) and returns the output of the true input in float32:
    the layer is linear, so the scale is applied to its (smaller) output, before the bias.
    """

    def forward(self, x, unscale: Optional[torch.Tensor] = None):
        if unscale is None:
            return pointwise_linear(x, self.weight, self.bias)
        out = pointwise_linear(x, self.weight, None).float() * unscale
        return out if self.bias is None else out + self.bias


def pointwise_linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)`` on a channels-last tensor, as :class:`PointwiseLinear`."""
    if x.device.type != 'cpu' or x.dim() != 4:
        return F.linear(x, weight, bias)
    out = F.conv2d(x.permute(0, 3, 1, 2), weight[:, :, None, None], bias)
    return out.permute(0, 2, 3, 1)


def _depthwise_weight_grad(x, grad, padding: int):
    """The weight gradient of a stride-1 depthwise convolution of ``x`` (B, C, H, W) whose
    output gradient is ``grad``: per channel, the correlation of the padded input with the
    gradient, summed over the batch, as one depthwise convolution of the B*C padded input
    planes by the B*C gradient planes (the kernel is the gradient, the output the weight)."""
    B, C, H, W = grad.shape
    p = padding
    planes = x.new_zeros(C, B, H + 2 * p, W + 2 * p)
    planes[:, :, p:p + H, p:p + W] = x.transpose(0, 1)
    kernels = grad.transpose(0, 1).reshape(C * B, 1, H, W).contiguous()
    out = F.conv2d(planes.view(1, C * B, H + 2 * p, W + 2 * p), kernels, groups=C * B)
    return out.reshape(C, B, *out.shape[-2:]).sum(1, keepdim=True)


class _DepthwiseConvFunction(torch.autograd.Function):
    """A stride-1 depthwise convolution without bias whose weight gradient is
    :func:`_depthwise_weight_grad`; the forward pass and the input gradient are PyTorch's."""

    @staticmethod
    def forward(ctx, x, weight, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, padding=padding, groups=weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        p = ctx.padding
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [p, p], [1, 1], False, [0, 0], weight.shape[0],
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_weight = _depthwise_weight_grad(x, grad, p)
        return grad_x, grad_weight, None


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False)``.

    In float32 training on CPU the weight gradient is computed as one depthwise convolution
    (:func:`_depthwise_weight_grad`): oneDNN's own weight-gradient kernel for a 7x7 depthwise
    convolution is the slowest step of a ConvFormer block's backward pass, and the convolution
    form takes 0.4-0.7x its time at the shapes of ConvFormer and CAFormer (README,
    "Benchmark"). Same result up to float rounding.
    """

    def __init__(self, dim: int, kernel_size: int):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False)

    def forward(self, x):
        if (x.device.type != 'cpu' or x.dtype != torch.float32 or not torch.is_grad_enabled()
                or not self.weight.requires_grad or torch.is_autocast_enabled('cpu')
                or torch.jit.is_tracing()):
            return super().forward(x)
        return _DepthwiseConvFunction.apply(x, self.weight, self.padding[0])


def activate(act: nn.Module, x: torch.Tensor):
    """``(act(x), None)``, or for StarReLU on a float16 ``x`` the overflow-safe
    ``(act(x) / unscale, unscale)`` of :meth:`StarReLU.forward_scaled`, for a linear layer
    (:class:`PointwiseLinear`) to undo."""
    if x.dtype == torch.float16 and isinstance(act, StarReLU):
        return act.forward_scaled(x)
    return act(x), None


class Mlp(nn.Module):
    """The block's channel MLP: ``fc2(act(fc1(x)))`` on a channels-last tensor.

    A StarReLU's scale and bias are applied through ``fc2``'s weights
    (:func:`folded_star_relu_params`): the hidden, four times the block's width, then takes two
    elementwise passes instead of four forward and three instead of seven backward. In float16
    (autocast) ``relu(x) ** 2`` passes 65504 once x > 256 while ``fc2``'s output can be small,
    so there the hidden is scaled down instead (:func:`activate`); the output is returned in the
    input's dtype.
    """

    def __init__(self, dim: int, hidden: int, act_layer, bias: bool = True):
        super().__init__()
        self.fc1 = PointwiseLinear(dim, hidden, bias=bias)
        self.act = act_layer()
        self.fc2 = PointwiseLinear(hidden, dim, bias=bias)

    def forward(self, x):
        hidden = self.fc1(x)
        if isinstance(self.act, StarReLU) and hidden.dtype != torch.float16:
            return pointwise_linear(squared_relu(hidden, inplace=True),
                                    *folded_star_relu_params(self.act, self.fc2))
        hidden, unscale = activate(self.act, hidden)
        if unscale is None:
            return self.fc2(hidden)
        return self.fc2(hidden, unscale).to(x.dtype)


def folded_star_relu_params(act: 'StarReLU', fc: nn.Linear):
    """``(W', c')`` such that ``fc(act(x)) = F.linear(relu(x) ** 2, W', c')``: with StarReLU's
    ``s * relu(x) ** 2 + b``, W' = s W and c' = c + b W 1 (differentiable in s, b, W, c)."""
    bias = fc.weight.sum(1) * act.bias
    return fc.weight * act.scale, bias if fc.bias is None else bias + fc.bias


def _scaled_square_(relu, scale, bias):
    """``scale * relu ** 2 + bias`` written into ``relu`` (scale and bias cast to its dtype:
    in-place ops on mixed dtypes, as under autocast, would copy)."""
    return relu.square_().mul_(scale.to(relu.dtype)).add_(bias.to(relu.dtype))


#: The largest StarReLU output that :meth:`StarReLU.forward_scaled` hands on in float16: small
#: enough that a pointwise layer summing a few thousand such values (times weights <= 1) stays
#: below 65504, large enough that ordinary activations (< 32 before the square) are not scaled.
FP16_HIDDEN_LIMIT = 2.0**10


class _StarReLUFunction(torch.autograd.Function):
    """StarReLU computed in one new tensor, saving only ``x`` for the backward pass (which
    recomputes ``relu(x)``); the output is divided by ``unscale`` if given.

    A float16 ``x`` is computed in float32, forward and backward, and rounded once: in float16
    ``relu(x) ** 2`` overflows once x > 256, and so do the products and sums of the gradient.
    This costs float32 temporaries of the hidden size in float16 runs only.
    """

    @staticmethod
    def forward(ctx, x, scale, bias, unscale=None):
        ctx.save_for_backward(x, scale, unscale)
        if x.dtype != torch.float16:
            return _scaled_square_(F.relu(x), scale, bias)
        if unscale is not None:
            scale, bias = scale / unscale, bias / unscale
        return _scaled_square_(F.relu(x).float(), scale, bias).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, scale, unscale = ctx.saved_tensors
        relu = F.relu(x)
        if x.dtype == torch.float16:
            relu, grad = relu.float(), grad.float()
            if unscale is not None:
                grad = grad / unscale
        grad_scale = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * relu).mul_(relu).sum().reshape(1).to(scale.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum().reshape(1).to(scale.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = relu.mul_(grad).mul_(2 * scale.to(relu.dtype)).to(x.dtype)
        return grad_x, grad_scale, grad_bias, None


def star_relu(x, scale, bias, unscale: Optional[torch.Tensor] = None):
    """:class:`_StarReLUFunction`, or under jit tracing the same computation in plain ops."""
    if not torch.jit.is_tracing():
        return _StarReLUFunction.apply(x, scale, bias, unscale)
    relu = F.relu(x.float() if x.dtype == torch.float16 else x)
    if unscale is not None:
        scale, bias = scale / unscale, bias / unscale
    return (relu.square() * scale.to(relu.dtype) + bias.to(relu.dtype)).to(x.dtype)


class StarReLU(nn.Module):
    """StarReLU: ``s * relu(x) ** 2 + b`` with learnable scalars s (init 1) and b (init 0).

    ``inplace=True`` overwrites ``x`` when no gradients are recorded (inference), as the
    blocks do with the fresh output of their pointwise layer; not in float16, which is
    computed in float32 (see :class:`_StarReLUFunction`).
    """

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self.scale = nn.Parameter(torch.full((1,), scale_value))
        self.bias = nn.Parameter(torch.full((1,), bias_value))

    def forward(self, x):
        if self.inplace and not torch.is_grad_enabled() and x.dtype != torch.float16:
            return _scaled_square_(x.relu_(), self.scale, self.bias)
        return star_relu(x, self.scale, self.bias)

    def forward_scaled(self, x):
        """``(self(x) / unscale, unscale)`` for a float16 ``x``, with ``unscale`` the smallest
        power of two >= 1 that bounds the result by :data:`FP16_HIDDEN_LIMIT`.

        ``unscale`` is a float32 tensor (no host sync) from the largest element of ``x``: one
        reduction over the hidden tensor. Powers of two scale exactly; gradients do not flow
        through ``unscale`` (piecewise constant).
        """
        with torch.no_grad():
            peak = x.amax().float().clamp_(min=0)
            top = peak.square() * self.scale.abs() + self.bias.abs()
            unscale = torch.exp2(torch.ceil(torch.log2(top / FP16_HIDDEN_LIMIT))).clamp_(min=1)
        return star_relu(x, self.scale, self.bias, unscale), unscale


class _SquaredReLUFunction(torch.autograd.Function):
    """``relu(x) ** 2`` in one new tensor, saving only ``x`` (the backward pass recomputes
    ``relu(x)``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.relu(x).square_()

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return F.relu(x).mul_(grad).mul_(2)


def squared_relu(x, inplace: bool = False):
    """``relu(x) ** 2``; with ``inplace``, written into ``x`` when no gradients are recorded."""
    if not torch.is_grad_enabled():
        return x.relu_().square_() if inplace else F.relu(x).square_()
    if torch.jit.is_tracing():
        return F.relu(x).square()
    return _SquaredReLUFunction.apply(x)


class SquaredReLU(nn.Module):
    """Squared ReLU: ``relu(x) ** 2``."""

    def forward(self, x):
        return squared_relu(x)


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
