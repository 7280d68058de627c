"""Fidelity to the reference implementations: same features for the same weights, and the
papers' parameter counts and MACs.

timm's MetaFormer (which equals the official code) is the reference: a timm-format file written
from a timm model with random weights is loaded through the backbone's ``init_cfg``, and the raw
stage outputs are compared with timm's ``features_only`` model loading the same file.
"""
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models.metaformer import GroupNorm1NoBias
from timm.models.metaformer import MetaFormer as TimmMetaFormer

import mmmetaformer  # noqa: F401
from mmmetaformer.macs import count_macs
from mmmetaformer.checkpoints import convert_to_canonical
from mmmetaformer.models import ARCHS, MetaFormer

ROOT = Path(__file__).resolve().parents[1]
TIMM_MODELS = [name for name in ARCHS if not name.startswith(('identityformer', 'randformer'))]
SIZES = [(224, 224), (160, 96)]

# ImageNet-1K Params (with the 1000-class head) from the official checkpoints and MACs (G) at
# 224x224 from the papers' tables.
REFERENCE = {
    'poolformer_s12': (11915176, 1.8), 'poolformer_s24': (21388968, 3.4),
    'poolformer_s36': (30862760, 5.0), 'poolformer_m36': (56172520, 8.8),
    'poolformer_m48': (73473448, 11.6),
    'poolformerv2_s12': (11891712, 1.8), 'poolformerv2_s24': (21341464, 3.4),
    'poolformerv2_s36': (30791216, 5.0), 'poolformerv2_m36': (56077168, 8.8),
    'poolformerv2_m48': (73346056, 11.5),
    'identityformer_s12': (11891712, 1.8), 'identityformer_s24': (21341464, 3.4),
    'identityformer_s36': (30791216, 5.0), 'identityformer_m36': (56077168, 8.8),
    'identityformer_m48': (73346056, 11.5),
    'randformer_s12': (12127010, 1.9), 'randformer_s24': (21812060, 3.5),
    'randformer_s36': (31497110, 5.2), 'randformer_m36': (56783062, 9.0),
    'randformer_m48': (74287248, 11.9),
    'convformer_s18': (26774448, 3.9), 'convformer_s36': (40012152, 7.6),
    'convformer_m36': (57051640, 12.8), 'convformer_b36': (99882616, 22.6),
    'caformer_s18': (26341656, 4.1), 'caformer_s36': (39297102, 8.0),
    'caformer_m36': (56204878, 13.2), 'caformer_b36': (98753614, 23.2),
}


def randomize(model: nn.Module, seed: int = 0):
    """timm's random init, with the 1-D tensors (norms, scales, biases, StarReLU) moved off
    their init values (+-0.1) so that every parameter matters, and PoolFormer's layer scales
    raised from 1e-5 to 0.02-0.04 so that its blocks do not reduce to the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.2 * (torch.rand(p.shape, generator=gen) - 0.5)
            if 'layer_scale' in name:
                p.copy_(0.03 + 0.1 * noise)
            elif p.ndim == 1:
                p.add_(noise)
    return model


def load_ours(name: str, path) -> MetaFormer:
    model = MetaFormer(arch=name, out_norm=None,
                       init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    return model.eval()


def compare(ours, reference, sizes, fp64=False):
    """Same raw stage outputs for the same weights.

    fp32: max abs difference <= 1e-5 x max(1, the stage's largest activation). Deep stages
    reach activations of ~5-10, where timm's own fp32 rounding error (against its fp64 output)
    is up to 6e-6 of the largest activation, and ours is the same. ``fp64``: also the same
    computation to 1e-9 in float64 (at the last size; fp64 convolutions are slow on CPU, so only
    for the smallest model of each family).
    """
    torch.manual_seed(1)
    for size in sizes:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected, actual = reference(x), ours(x)
        assert len(expected) == len(actual) == 4
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert e.shape == a.shape, (size, i)
            bound = 1e-5 * max(1., e.abs().max().item())
            diff = (e - a).abs().max().item()
            assert diff <= bound, f'stage {i} at {size}: max abs diff {diff:.2e} > {bound:.2e}'
    if fp64:
        with torch.no_grad():
            expected, actual = reference.double()(x.double()), ours.double()(x.double())
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert (e - a).abs().max() <= 1e-9, f'stage {i} at {size} differs in fp64'


def smallest(name):
    return name.endswith(('_s12', '_s18'))


def sizes_of(name):
    """The input sizes a model is compared at: both for the smallest model of a family, the
    non-square one for the larger models (the same modules, more of them)."""
    return SIZES if smallest(name) else SIZES[1:]


def quick_smallest(names):
    """``names`` as parameters, all but the smallest size of each family marked slow."""
    return [pytest.param(n, marks=() if smallest(n) else pytest.mark.slow) for n in names]


@pytest.mark.parametrize('name', quick_smallest(TIMM_MODELS))
def test_matches_timm_features(name, tmp_path):
    path = tmp_path / 'model.safetensors'
    save_file(randomize(timm.create_model(name)).state_dict(), str(path))
    reference = timm.create_model(name, features_only=True, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path))).eval()
    compare(load_ours(name, path), reference, sizes_of(name), fp64=smallest(name))


class RandomMixingReference(nn.Module):
    """RandFormer's token mixer from the paper, on NCHW tensors: out[m] = sum_n W[m, n] x[n]
    with a frozen W = softmax(rand(N, N))."""
    num_tokens = None

    def __init__(self, dim, **kwargs):
        super().__init__()
        self.random_matrix = nn.Parameter(
            torch.softmax(torch.rand(self.num_tokens, self.num_tokens), dim=-1),
            requires_grad=False)

    def forward(self, x):
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        return (self.random_matrix @ tokens).transpose(1, 2).reshape(B, C, H, W)


RandomMixing196 = type('RandomMixing196', (RandomMixingReference, ), dict(num_tokens=196))
RandomMixing49 = type('RandomMixing49', (RandomMixingReference, ), dict(num_tokens=49))


class Intermediates(nn.Module):
    """The four stage outputs of a timm MetaFormer."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_intermediates(x, intermediates_only=True)


def timm_generic_reference(name):
    """IdentityFormer / RandFormer built from timm's generic MetaFormer class."""
    arch = ARCHS[name]
    token_mixers = [nn.Identity, nn.Identity] + (
        [RandomMixing196, RandomMixing49] if name.startswith('randformer') else [nn.Identity] * 2)
    return TimmMetaFormer(depths=arch['depths'], dims=arch['dims'], token_mixers=token_mixers,
                          norm_layers=GroupNorm1NoBias, use_mlp_head=False)


@pytest.mark.parametrize('name', quick_smallest(
    [n for n in ARCHS if n.startswith(('identityformer', 'randformer'))]))
def test_matches_timm_generic_metaformer(name, tmp_path):
    torch.manual_seed(0)
    model = randomize(timm_generic_reference(name))
    path = tmp_path / 'model.safetensors'
    save_file(model.state_dict(), str(path))
    # RandFormer's matrices are defined on the 224x224 token grid only.
    sizes = SIZES[:1] if name.startswith('randformer') else sizes_of(name)
    compare(load_ours(name, path), Intermediates(model).eval(), sizes, fp64=smallest(name))


@pytest.mark.parametrize('name', quick_smallest(list(ARCHS)))
def test_params_and_macs(name):
    """Parameters with the 1000-class classifier equal the official checkpoint's; MACs at
    224x224 (attention matmuls counted) are within 2% of the papers' tables."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(f'{ROOT}/configs/imagenet/{name}_in1k.py').model
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        classifier = MODELS.build(cfg).eval()
    params, macs = REFERENCE[name]
    assert sum(p.numel() for p in classifier.parameters()) == params
    measured = count_macs(classifier, torch.zeros(1, 3, 224, 224), mode='tensor') / 1e9
    assert abs(measured / macs - 1) <= 0.02, f'{measured:.3f}G vs {macs}G'


def timm_reference(name):
    """timm's model of ``name`` with its four stage outputs, or the generic one (IdentityFormer,
    RandFormer)."""
    if name.startswith(('identityformer', 'randformer')):
        return Intermediates(timm_generic_reference(name))
    return Intermediates(timm.create_model(name))


@pytest.mark.parametrize('name', [n for n in ARCHS if smallest(n)])
def test_training_gradients_match_timm(name, tmp_path):
    """Training (fp64): every parameter gradient equals the reference's to 1e-6 of its largest
    value, which checks the backward passes of the fused ops (StarReLU, pooling, scaled residual
    adds); a wrong term shows as an O(1) difference. (PyTorch's GroupNorm kernel for
    channels-last input alone differs from the NCHW one by ~1e-8 relative in fp64.)"""
    torch.manual_seed(0)
    reference = timm_reference(name)
    randomize(reference.model)
    path = tmp_path / 'model.safetensors'
    save_file(reference.model.state_dict(), str(path))
    ours = load_ours(name, path)
    size = 224 if name.startswith('randformer') else 96  # its matrices: 224x224 grid only
    x = torch.randn(1, 3, size, size, dtype=torch.double)
    for model in (reference, ours):
        outs = model.double().train()(x)
        weights = [torch.randn(out.shape, dtype=out.dtype,
                               generator=torch.Generator().manual_seed(i))
                   for i, out in enumerate(outs)]
        sum((out * w).sum() for out, w in zip(outs, weights)).backward()
    grads = {'backbone.' + k: p.grad for k, p in reference.model.named_parameters()
             if p.grad is not None}
    expected, _ = convert_to_canonical(grads)
    actual = {'backbone.' + k: p.grad for k, p in ours.named_parameters()
              if p.grad is not None}
    assert sorted(actual) == sorted(expected)
    for key, grad in expected.items():
        bound = 1e-6 * max(1., grad.abs().max().item())
        assert (actual[key] - grad).abs().max() <= bound, key


def test_pooling_is_not_counted():
    """As in the papers' figures, pooling adds no MACs: PoolFormer (v1, v2) and IdentityFormer
    of the same size count the same."""
    x = torch.zeros(1, 3, 224, 224)
    macs = {family: count_macs(MetaFormer(arch=f'{family}_s12', out_norm=None, init_cfg=None), x)
            for family in ('poolformer', 'poolformerv2', 'identityformer')}
    assert len(set(macs.values())) == 1, macs
