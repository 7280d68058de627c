"""Token mixers of the MetaFormer family, on channels-last (B, H, W, C) tensors."""
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import DepthwiseConv2d, PointwiseLinear, StarReLU, activate


class Pooling(nn.Module):
    """PoolFormer's mixer: ``avgpool3x3(x) - x`` (padding not counted in the average).

    The window sums run as a depthwise convolution, which oneDNN computes several times faster
    than ``avg_pool2d`` in training, and are then divided by the window sizes. Like
    ``avg_pool2d``, it runs in the input's dtype under autocast. The convolution weight is
    ``2**-k`` (the smallest power of two <= 1 / window size) instead of 1: a float16 window sum
    of 9 values near 65504 would overflow, the scaled sum cannot; in float32 the result is
    unchanged, since a power-of-two scale (of the sums and of the counts) is exact.
    """

    def __init__(self, dim: int, pool_size: int = 3):
        super().__init__()
        self.padding = pool_size // 2
        weight = 2.0**-math.ceil(math.log2(pool_size * pool_size))
        self.register_buffer('window', torch.full((dim, 1, pool_size, pool_size), weight),
                             persistent=False)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2)
        window = self.window.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            counts = F.conv2d(x.new_ones(1, 1, *x.shape[2:]), window[:1], padding=self.padding)
            sums = F.conv2d(x, window, padding=self.padding, groups=x.shape[1])
        return sums.div_(counts).sub_(x).permute(0, 2, 3, 1)


class SepConv(nn.Module):
    """Inverted separable conv (MobileNetV2): pw Linear, StarReLU, depthwise conv, pw Linear."""

    def __init__(self, dim: int, expansion_ratio: float = 2, kernel_size: int = 7):
        super().__init__()
        hidden = int(expansion_ratio * dim)
        self.pwconv1 = PointwiseLinear(dim, hidden, bias=False)
        self.act1 = StarReLU(inplace=True)
        self.dwconv = DepthwiseConv2d(hidden, kernel_size)
        self.pwconv2 = PointwiseLinear(hidden, dim, bias=False)

    def forward(self, x):
        # float16: the StarReLU hidden is scaled down (see layers.activate); the depthwise conv
        # (no bias) is linear, so pwconv2 undoes the scale on its output.
        hidden, unscale = activate(self.act1, self.pwconv1(x))
        hidden = self.dwconv(hidden.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if unscale is None:
            return self.pwconv2(hidden)
        return self.pwconv2(hidden, unscale).to(x.dtype)


class Attention(nn.Module):
    """Global multi-head self-attention (no position embedding) via SDPA; under jit tracing
    (FLOP counters, see :mod:`.layers`) as ``softmax(q k^T / sqrt(d)) v`` in matmuls."""

    def __init__(self, dim: int, head_dim: int = 32):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = max(dim // head_dim, 1)
        inner = self.num_heads * head_dim
        self.qkv = PointwiseLinear(dim, 3 * inner, bias=False)
        self.proj = PointwiseLinear(inner, dim, bias=False)

    def forward(self, x):
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if torch.jit.is_tracing():
            x = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, H, W, -1))


def resample_mixing_matrix(matrix: torch.Tensor, size) -> torch.Tensor:
    """Resample a token-mixing matrix from its native square grid to ``size=(H, W)``.

    ``matrix[m, n]`` is read as a function of (query position m, key position n) on the native
    grid; both position axes are resized bilinearly, then each row is renormalised to sum to 1.
    """
    native = math.isqrt(matrix.shape[0])
    H, W = size
    m = matrix.reshape(native * native, 1, native, native)
    m = F.interpolate(m, size=size, mode='bilinear', align_corners=False)  # keys resized
    m = m.reshape(native, native, H * W).permute(2, 0, 1).unsqueeze(1)
    m = F.interpolate(m, size=size, mode='bilinear', align_corners=False)  # queries resized
    m = m.reshape(H * W, H * W).t()
    return m / m.sum(dim=-1, keepdim=True)


class RandomMixing(nn.Module):
    """RandFormer's mixer: tokens mixed by a frozen random row-stochastic matrix.

    The matrix is defined on the native token grid of a 224x224 input; other grids use it
    resampled by :func:`resample_mixing_matrix`. The resampled matrices of all modules share
    one least-recently-used cache of at most ``cache_bytes`` (a larger matrix is resampled at
    every call). Under ``torch.compile`` the graph resamples at every call: the cache is Python
    state that a graph cannot keep, and resampling costs a small part of the mixing's matmul.
    """

    cache_bytes = 512 * 2**20
    _cache = OrderedDict()  # (module token, grid, device, dtype, version, inference) -> matrix

    def __init__(self, num_tokens: int):
        super().__init__()
        self.random_matrix = nn.Parameter(
            torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1), requires_grad=False)
        self.native_size = math.isqrt(num_tokens)
        self._cache_token = object()  # identifies this module's entries (a copy gets its own)

    def mixing_matrix(self, H: int, W: int) -> torch.Tensor:
        matrix = self.random_matrix
        if (H, W) == (self.native_size, self.native_size):
            return matrix
        if torch.compiler.is_compiling():
            with torch.no_grad():
                return resample_mixing_matrix(matrix, (H, W))
        # Tensors made under inference_mode cannot enter autograd: cache them apart.
        key = (self._cache_token, H, W, matrix.device, matrix.dtype, matrix._version,
               torch.is_inference_mode_enabled())
        cache = RandomMixing._cache
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        with torch.no_grad():
            resampled = resample_mixing_matrix(matrix, (H, W))
        if resampled.nbytes <= self.cache_bytes:
            cache[key] = resampled
            while sum(m.nbytes for m in cache.values()) > self.cache_bytes:
                cache.popitem(last=False)
        return resampled

    def forward(self, x):
        B, H, W, C = x.shape
        mixed = self.mixing_matrix(H, W).to(x.dtype) @ x.reshape(B, H * W, C)
        return mixed.reshape(B, H, W, C)


# Token mixer builders by name: (stage width, native token count at 224x224) -> module.
MIXERS = {
    'identity': lambda dim, tokens: nn.Identity(),
    'pooling': lambda dim, tokens: Pooling(dim),
    'random': lambda dim, tokens: RandomMixing(tokens),
    'sepconv': lambda dim, tokens: SepConv(dim),
    'attention': lambda dim, tokens: Attention(dim),
}
