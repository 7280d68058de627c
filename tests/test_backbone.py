"""The backbone checklist of mmdet/mmpretrain's backbone tests, plus RandFormer resampling."""
import re

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath

import mmmetaformer  # noqa: F401
from mmmetaformer.models import (ARCHS, CAFormer, ConvFormer, IdentityFormer, MetaFormer,
                                 PoolFormer, PoolFormerV2, RandFormer)
from mmmetaformer.models.layers import (DepthwiseConv2d, PointwiseLinear, StarReLU,
                                        _DepthwiseConvFunction)
from mmmetaformer.models.mixers import (Attention, Pooling, RandomMixing,
                                        resample_mixing_matrix)

FAMILIES = [(PoolFormer, 's12'), (PoolFormerV2, 's12'), (IdentityFormer, 's12'),
            (RandFormer, 's12'), (ConvFormer, 's18'), (CAFormer, 's18')]
TINY = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 96))


def feature_sizes(size):
    """(H, W) of the 4 outputs by conv arithmetic: stem k7/s4/p2, then k3/s2/p1."""
    sizes = [tuple((n - 3) // 4 + 1 for n in size)]
    for _ in range(3):
        sizes.append(tuple((n - 1) // 2 + 1 for n in sizes[-1]))
    return sizes


@pytest.mark.parametrize('cls,arch', FAMILIES)
@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (3, ), (1, 2)])
def test_output_shapes(cls, arch, out_indices):
    model = cls(arch=arch, out_indices=out_indices).eval()
    dims = ARCHS[f'{cls.family}_{arch}']['dims']
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 95, 127))
    assert len(outs) == len(out_indices)
    for out, i in zip(outs, out_indices):
        assert out.shape == (1, dims[i], *feature_sizes((95, 127))[i]) and out.is_contiguous()



@pytest.mark.parametrize('out_indices,order', [((3, 1), '(1, 3)'), ((2, 2), '(2,)'),
                                               ((1, -3), '(1,)'), ((-1, 0), '(0, 3)')])
def test_out_indices_out_of_stage_order_refused(out_indices, order):
    """The outputs come once per stage in stage order, and the export names follow
    ``out_indices``: an order or a repeat the outputs cannot follow is refused, naming the
    order that works."""
    with pytest.raises(ValueError, match=r'distinct stages in ascending order.*'
                       + re.escape(f'{out_indices}; use {order}')):
        CAFormer(arch=TINY, out_indices=out_indices)


@pytest.mark.parametrize('size', [(224, 224), (512, 512), (800, 1333), (511, 383)])
def test_any_input_size(size):
    model = CAFormer(arch=TINY).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert [o.shape[-2:] for o in outs] == feature_sizes(size)


@pytest.mark.parametrize('registry', ['mmdet', 'mmseg', 'mmpretrain'])
@pytest.mark.parametrize('name', ['PoolFormer', 'PoolFormerV2', 'IdentityFormer', 'RandFormer',
                                  'ConvFormer', 'CAFormer'])
def test_build_from_toolbox_scopes(registry, name):
    models = pytest.importorskip(f'{registry}.registry').MODELS
    model = models.build(dict(type=f'mmmetaformer.{name}', arch=TINY))
    assert type(model).__name__ == name


def test_out_norm_defaults_and_none():
    assert isinstance(PoolFormer().norm0, torch.nn.GroupNorm)
    assert PoolFormer().norm0.eps == 1e-5 and PoolFormer().norm0.bias is not None
    assert type(CAFormer().norm0).__name__ == 'LayerNorm2d'
    assert isinstance(PoolFormerV2().norm0, torch.nn.GroupNorm)
    raw = CAFormer(arch=TINY, out_norm=None).eval()
    assert isinstance(raw.norm3, torch.nn.Identity)
    # The LN2d output norm normalises each pixel over channels.
    model = CAFormer(arch=TINY).eval()
    raw.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = F.layer_norm(raw(x)[3].permute(0, 2, 3, 1), (96, ), eps=1e-6)
        assert torch.allclose(model(x)[3], expected.permute(0, 3, 1, 2), atol=1e-5)


def _trainable(module):
    return all(p.requires_grad for p in module.parameters())


def _frozen(module):
    return not module.training and not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2, 4])
def test_frozen_stages(frozen_stages):
    model = ConvFormer(arch=TINY, frozen_stages=frozen_stages)
    for phase in ('constructed', 'after train()'):
        if phase == 'after train()':
            model.train()
        stem_frozen = frozen_stages >= 0
        assert _frozen(model.stem) == stem_frozen, phase
        assert _trainable(model.stem) != stem_frozen, phase
        for i, stage in enumerate(model.stages):
            if i < frozen_stages:
                assert _frozen(stage), (phase, i)
            else:
                assert stage.training and _trainable(stage), (phase, i)
        assert all(_trainable(getattr(model, f'norm{i}')) for i in range(4))


def test_frozen_stages_out_of_range():
    with pytest.raises(ValueError, match='frozen_stages'):
        ConvFormer(arch=TINY, frozen_stages=5)


def test_norm_eval():
    model = PoolFormer(arch=TINY, norm_eval=True).train()
    norms = [m for m in model.modules() if 'Norm' in type(m).__name__]
    assert norms and not any(m.training for m in norms)
    assert model.stages[0].blocks[0].mlp.training
    model = PoolFormer(arch=TINY, norm_eval=False).train()
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize('cls', [ConvFormer, CAFormer, PoolFormer])
def test_with_cp_matches_plain(cls):
    torch.manual_seed(0)
    plain = cls(arch=TINY, drop_path_rate=0.).train()
    ckpt = cls(arch=TINY, with_cp=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    outs = [model(x) for model in (plain, ckpt)]
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-6)
    for model, out in zip((plain, ckpt), outs):
        sum(o.square().mean() for o in out).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_star_relu_formula_and_gradients():
    """StarReLU (own backward pass) against the paper's ``s * relu(x) ** 2 + b``."""
    act = StarReLU(scale_value=0.8, bias_value=-0.3).double()
    x = torch.randn(2, 5, 6, 7, dtype=torch.double, requires_grad=True)
    torch.testing.assert_close(act(x), act.scale * F.relu(x) ** 2 + act.bias, rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(
        lambda x, s, b: torch.func.functional_call(act, {'scale': s, 'bias': b}, (x, )),
        (x, act.scale, act.bias))
    act.inplace = True  # the same result, written into x, when no gradients are recorded
    expected = act.scale.detach() * F.relu(x.detach()) ** 2 + act.bias.detach()
    with torch.no_grad():
        y = x.detach().clone()
        assert act(y) is y
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-15)
    assert act(x).grad_fn is not None and x.requires_grad  # with gradients: not in place


@pytest.mark.parametrize('size', [(7, 9), (1, 1), (2, 5)])
def test_pooling_is_average_pooling_minus_input(size):
    """PoolFormer's mixer against ``AvgPool2d(3, 1, 1, count_include_pad=False)(x) - x``."""
    x = torch.randn(2, *size, 6, dtype=torch.double, requires_grad=True)
    nchw = x.permute(0, 3, 1, 2)
    expected = (F.avg_pool2d(nchw, 3, 1, 1, count_include_pad=False) - nchw).permute(0, 2, 3, 1)
    pool = Pooling(6).double()
    torch.testing.assert_close(pool(x), expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(pool, (x, ))


def test_pointwise_linear_is_linear():
    layer = PointwiseLinear(6, 10)
    x = torch.randn(2, 5, 7, 6)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    x64 = x.double().requires_grad_()
    assert torch.autograd.gradcheck(layer.double(), (x64, ))


@pytest.mark.parametrize('shape', [(1, 8, 13, 9), (3, 5, 1, 1), (2, 6, 4, 17)])
def test_depthwise_conv_gradients(shape):
    """The depthwise conv's own weight gradient against PyTorch's convolution backward, in
    float32 on a channels-last input as in SepConv, and gradcheck in float64."""
    torch.manual_seed(0)
    conv = DepthwiseConv2d(shape[1], 7)
    x = torch.randn(shape).to(memory_format=torch.channels_last).requires_grad_()
    out = conv(x)
    assert type(out.grad_fn).__name__ == '_DepthwiseConvFunctionBackward'
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, conv.weight), grad)
    x_ref = x.detach().clone().requires_grad_()
    weight = conv.weight.detach().clone().requires_grad_()
    expected_out = F.conv2d(x_ref, weight, padding=3, groups=shape[1])
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for g, e in zip(got, torch.autograd.grad(expected_out, (x_ref, weight), grad)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    x64 = torch.randn(shape, dtype=torch.double, requires_grad=True)
    w64 = conv.weight.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _DepthwiseConvFunction.apply(a, b, 3),
                                    (x64, w64))


@pytest.mark.parametrize('cls', [cls for cls, _ in FAMILIES])
def test_bf16_autocast(cls):
    """Under bf16 autocast the features stay within bf16 rounding of fp32's, and the backward
    pass gives fp32 gradients for every parameter."""
    torch.manual_seed(0)
    model = cls(arch=TINY).train()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(x)
    for e, o in zip(expected, outs):
        assert (o.float() - e).abs().max() <= 0.05 * e.abs().max()
    sum(o.float().square().mean() for o in outs).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32, name


def test_drop_path_schedule():
    model = IdentityFormer(arch='s12', drop_path_rate=0.3)
    rates = [b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.
             for s in model.stages for b in s.blocks]
    total = sum(ARCHS['identityformer_s12']['depths'])
    assert rates == pytest.approx([0.3 * k / (total - 1) for k in range(total)])


def test_bad_arch_messages():
    with pytest.raises(ValueError, match=r"unknown arch 's18'.*'s12', 's24', 's36'"):
        PoolFormer(arch='s18')
    with pytest.raises(ValueError, match=r"valid keys.*depths"):
        CAFormer(arch=dict(depths=(1, 1, 1, 1), dim=(8, 8, 8, 8)))
    with pytest.raises(ValueError, match='missing'):
        MetaFormer(arch=dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8)))
    with pytest.raises(ValueError, match="unknown mixers.*'attention'"):
        CAFormer(arch=dict(TINY, mixers=('conv', ) * 4))
    with pytest.raises(ValueError, match='same length'):
        CAFormer(arch=dict(depths=(1, 1, 1), dims=(8, 8, 8, 8)))
    with pytest.raises(ValueError, match='caformer_s18'):
        MetaFormer(arch='s18')


def test_generic_metaformer_by_full_name():
    model = MetaFormer(arch='randformer_s12')
    assert isinstance(model.stages[2].blocks[0].token_mixer, RandomMixing)


def test_attention_is_softmax_attention():
    torch.manual_seed(0)
    attn = Attention(64)
    x = torch.randn(2, 5, 7, 64)
    qkv = attn.qkv(x).reshape(2, 35, 3, 2, 32).permute(2, 0, 3, 1, 4)
    q, k, v = qkv
    weights = (q @ k.transpose(-2, -1) * 32**-0.5).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 7, 64))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_random_mixing_native_grid_uses_stored_matrix():
    torch.manual_seed(0)
    mixer = RandomMixing(196)
    x = torch.randn(2, 14, 14, 8)
    expected = torch.einsum('mn,bnc->bmc', mixer.random_matrix, x.reshape(2, 196, 8))
    assert mixer.mixing_matrix(14, 14) is mixer.random_matrix
    assert torch.allclose(mixer(x), expected.reshape(2, 14, 14, 8), atol=1e-6)


@pytest.mark.parametrize('grid', [(32, 32), (50, 84), (7, 5)])
def test_random_mixing_resampled(grid):
    torch.manual_seed(0)
    mixer = RandomMixing(196)
    matrix = mixer.mixing_matrix(*grid)
    n = grid[0] * grid[1]
    assert matrix.shape == (n, n) and (matrix >= 0).all()
    assert torch.allclose(matrix.sum(-1), torch.ones(n), atol=1e-5)
    assert mixer.mixing_matrix(*grid) is matrix  # cached
    const = torch.full((1, *grid, 3), 2.5)
    assert torch.allclose(mixer(const), const, atol=1e-4)


def test_resampling_follows_positions():
    # A matrix that maps every query to the key at the same position stays local on a new grid.
    m = resample_mixing_matrix(torch.eye(196), (28, 20))
    ys, xs = torch.meshgrid(torch.arange(28.), torch.arange(20.), indexing='ij')
    coords = torch.stack([ys.flatten(), xs.flatten()], -1)
    centroids = m @ coords  # mean key position of each query
    assert (centroids - coords).abs().max() < 1.0


def test_resampled_matrix_from_inference_mode_not_reused_in_training():
    model = RandFormer(arch=dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)))
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        model.eval()(x)
    sum(o.mean() for o in model.train()(x)).backward()
    assert model.stem.conv.weight.grad is not None


def test_resample_cache_follows_weight_updates():
    mixer = RandomMixing(49)
    before = mixer.mixing_matrix(10, 10)
    with torch.no_grad():
        mixer.random_matrix.copy_(torch.softmax(torch.randn(49, 49), -1))
    after = mixer.mixing_matrix(10, 10)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, resample_mixing_matrix(mixer.random_matrix, (10, 10)))


@pytest.mark.parametrize('size', [(512, 512), (800, 1333)])
def test_randformer_dense_sizes(size):
    model = RandFormer(arch=dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert outs[3].shape[-2:] == feature_sizes(size)[3]
    assert all(torch.isfinite(o).all() for o in outs)


def test_pretrained_shorthand():
    """mmseg's EncoderDecoder hands the config's model-level ``pretrained`` to the backbone."""
    model = ConvFormer(arch=TINY, pretrained='ckpt.pth')
    assert model.init_cfg == dict(type='Pretrained', checkpoint='ckpt.pth')
    own = dict(type='Pretrained', checkpoint='convformer.pth')
    with pytest.warns(UserWarning, match="pretrained='resnet50.pth' is ignored"):
        model = ConvFormer(arch=TINY, pretrained='resnet50.pth', init_cfg=own)
    assert model.init_cfg == own
