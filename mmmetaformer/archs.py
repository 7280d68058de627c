"""The MetaFormer architectures as data: family settings, sizes and every published model."""

S_DIMS = (64, 128, 320, 512)
M_DIMS = (96, 192, 384, 768)

_V2_FAMILY = dict(norm='groupnorm', norm_bias=False, norm_eps=1e-6, downsample_norm=True,
                  mlp_act='starrelu', mlp_bias=False, layer_scale_init=None,
                  res_scale_stages=(2, 3),
                  out_norm=dict(type='GN', num_groups=1, eps=1e-6))
_CONV_FAMILY = dict(_V2_FAMILY, norm='layernorm', out_norm=dict(type='mmmetaformer.LN2d', eps=1e-6))

#: Family-wide settings. ``out_norm`` is the default norm on each returned feature:
#: the official PoolFormer dense variant (GroupNorm, 1 group, with bias) for PoolFormer, and
#: the family's block norm with a bias for the others (channel LayerNorm for ConvFormer and
#: CAFormer, GroupNorm with 1 group for PoolFormerV2, IdentityFormer and RandFormer).
FAMILIES = {
    'poolformer': dict(mixers=('pooling',) * 4, norm='groupnorm', norm_bias=True, norm_eps=1e-5,
                       downsample_norm=False, mlp_act='gelu', mlp_bias=True,
                       layer_scale_init=1e-5, res_scale_stages=(),
                       out_norm=dict(type='GN', num_groups=1, eps=1e-5)),
    'poolformerv2': dict(_V2_FAMILY, mixers=('pooling',) * 4),
    'identityformer': dict(_V2_FAMILY, mixers=('identity',) * 4),
    'randformer': dict(_V2_FAMILY, mixers=('identity', 'identity', 'random', 'random')),
    'convformer': dict(_CONV_FAMILY, mixers=('sepconv',) * 4),
    'caformer': dict(_CONV_FAMILY, mixers=('sepconv', 'sepconv', 'attention', 'attention')),
}

_POOL_SIZES = {
    's12': dict(depths=(2, 2, 6, 2), dims=S_DIMS),
    's24': dict(depths=(4, 4, 12, 4), dims=S_DIMS),
    's36': dict(depths=(6, 6, 18, 6), dims=S_DIMS),
    'm36': dict(depths=(6, 6, 18, 6), dims=M_DIMS),
    'm48': dict(depths=(8, 8, 24, 8), dims=M_DIMS),
}
_CONV_SIZES = {
    's18': dict(depths=(3, 3, 9, 3), dims=S_DIMS),
    's36': dict(depths=(3, 12, 18, 3), dims=S_DIMS),
    'm36': dict(depths=(3, 12, 18, 3), dims=(96, 192, 384, 576)),
    'b36': dict(depths=(3, 12, 18, 3), dims=(128, 256, 512, 768)),
}
SIZES = {
    # PoolFormer v1 uses layer scale 1e-5 for s12/s24 and 1e-6 for the deeper models.
    'poolformer': {name: dict(size, layer_scale_init=1e-5 if name in ('s12', 's24') else 1e-6)
                   for name, size in _POOL_SIZES.items()},
    'poolformerv2': _POOL_SIZES,
    'identityformer': _POOL_SIZES,
    'randformer': _POOL_SIZES,
    'convformer': _CONV_SIZES,
    'caformer': _CONV_SIZES,
}

#: Every published model, e.g. ``ARCHS['caformer_s18']``: the full settings of the network.
ARCHS = {f'{family}_{size}': dict(FAMILIES[family], **settings)
         for family, sizes in SIZES.items() for size, settings in sizes.items()}
ARCH_KEYS = tuple(ARCHS['caformer_s18'])
