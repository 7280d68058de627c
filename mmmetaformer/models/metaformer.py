"""The MetaFormer backbone family for dense prediction.

One block and one backbone class; the six families (PoolFormer, PoolFormerV2, IdentityFormer,
RandFormer, ConvFormer, CAFormer) differ only in the settings of :data:`ARCHS`.
Module names follow timm's ``metaformer.py`` (``stem``, ``stages.i.downsample``,
``stages.i.blocks.j``); Linear weights are 2-D as in the official code.
"""
import copy
import warnings
from functools import partial
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks import DropPath
from mmengine.model import BaseModule
from torch.utils.checkpoint import checkpoint

from .. import checkpoints
from ..registry import MODELS
from ..archs import ARCH_KEYS, ARCHS, FAMILIES
from .layers import GroupNorm1, Mlp, Scale, StarReLU
from .mixers import MIXERS


def _norm_layer(kind: str, eps: float, bias: bool):
    if kind == 'groupnorm':
        return partial(GroupNorm1, eps=eps, bias=bias)
    if kind == 'layernorm':
        return partial(nn.LayerNorm, eps=eps, bias=bias)
    raise ValueError(f"arch norm must be 'groupnorm' or 'layernorm', got {kind!r}")


class Downsample(nn.Module):
    """Strided conv on a channels-last tensor with an optional LayerNorm over channels,
    before the conv (between stages) or after it (stem)."""

    def __init__(self, in_chs, out_chs, kernel_size, stride, padding, norm=False,
                 norm_first=True):
        super().__init__()
        self.norm_first = norm_first
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding)
        norm_chs = in_chs if norm_first else out_chs
        self.norm = nn.LayerNorm(norm_chs, eps=1e-6, bias=False) if norm else nn.Identity()

    def forward(self, x):
        if self.norm_first:
            x = self.norm(x)
        x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x if self.norm_first else self.norm(x)


class MetaFormerBlock(nn.Module):
    """``x = r1*x + s1*DropPath(mixer(norm1(x)))``; ``x = r2*x + s2*DropPath(mlp(norm2(x)))``."""

    def __init__(self, dim, token_mixer, norm_layer, mlp_act, mlp_bias, drop_path=0.,
                 layer_scale_init=None, res_scale_init=None):
        super().__init__()

        def scale(init):
            return Scale(dim, init) if init is not None else nn.Identity()

        self.norm1 = norm_layer(dim)
        self.token_mixer = token_mixer
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale1 = scale(layer_scale_init)
        self.res_scale1 = scale(res_scale_init)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, 4 * dim, mlp_act, bias=mlp_bias)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale2 = scale(layer_scale_init)
        self.res_scale2 = scale(res_scale_init)

    @staticmethod
    def _residual(x, branch, res_scale, layer_scale):
        """``res_scale(x) + layer_scale(branch)`` in one elementwise op (a block has one scale
        or none)."""
        if isinstance(layer_scale, Scale):
            return torch.addcmul(res_scale(x), branch, layer_scale.scale)
        if isinstance(res_scale, Scale):
            return torch.addcmul(branch, x, res_scale.scale)
        return branch + x

    def forward(self, x):
        x = self._residual(x, self.drop_path1(self.token_mixer(self.norm1(x))),
                           self.res_scale1, self.layer_scale1)
        return self._residual(x, self.drop_path2(self.mlp(self.norm2(x))),
                              self.res_scale2, self.layer_scale2)


class MetaFormerStage(nn.Module):
    """A downsampling layer followed by a sequence of blocks (activation checkpointing
    per block when ``with_cp``)."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.with_cp = False

    def forward(self, x):
        x = self.downsample(x)
        for block in self.blocks:
            if self.with_cp and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


@MODELS.register_module()
class MetaFormer(BaseModule):
    """MetaFormer backbone returning NCHW features of strides 4/8/16/32.

    Args:
        arch (str | dict): a name of :data:`ARCHS` (for a family subclass: its size, e.g.
            ``'s18'``; default its smallest), or a dict of settings (for a family subclass,
            overrides of the family's settings, with ``depths`` and ``dims`` required).
        in_channels (int): input channels.
        out_indices (Sequence[int]): stages whose outputs are returned.
        out_norm (dict | None | str): norm config applied to each returned feature;
            ``'default'`` uses the arch's ``out_norm`` (see :data:`FAMILIES`), ``None`` returns
            the raw stage outputs.
        drop_path_rate (float): stochastic depth, growing linearly from 0 over all blocks.
        frozen_stages (int): -1 freezes nothing, 0 the stem, k >= 1 the stem and the first k
            stages (with their downsampling layers). Output norms stay trainable.
        norm_eval (bool): keep the norm layers in eval mode during training.
        with_cp (bool): activation checkpointing per block.
        pretrained (str, optional): the deprecated OpenMMLab shorthand for
            ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)``, which mmseg's
            ``EncoderDecoder`` passes on from the model-level ``pretrained`` of its configs;
            ignored, with a warning, when ``init_cfg`` already names a checkpoint.
        init_cfg (dict | list[dict], optional): initialisation; ``dict(type='Pretrained',
            checkpoint=..., prefix=None, use_ema=False)`` loads any supported checkpoint format.
    """
    family: Optional[str] = None

    def __init__(self,
                 arch: Union[str, dict, None] = None,
                 in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 out_norm: Union[dict, None, str] = 'default',
                 drop_path_rate: float = 0.,
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 pretrained: Optional[str] = None,
                 init_cfg=dict(type='TruncNormal', layer=['Conv2d', 'Linear'], std=.02, bias=0.)):
        super().__init__(init_cfg=self._merge_pretrained(pretrained, copy.deepcopy(init_cfg)))
        self.arch_settings = self.resolve_arch(arch)
        a = self.arch_settings
        self.depths, self.dims = tuple(a['depths']), tuple(a['dims'])
        for key in ('depths', 'dims'):
            if not all(isinstance(n, int) and n > 0 for n in a[key]):
                raise ValueError(f'{type(self).__name__}: {key} must be positive integers, '
                                 f'got {a[key]}')
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f'drop_path_rate must be in [0, 1), got {drop_path_rate}')
        self.num_stages = len(self.depths)
        self.out_indices = self._check_out_indices(out_indices)
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'frozen_stages must be in [-1, {self.num_stages}], '
                             f'got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        norm_layer = _norm_layer(a['norm'], a['norm_eps'], a['norm_bias'])
        mlp_act = {'starrelu': partial(StarReLU, inplace=True), 'gelu': nn.GELU}[a['mlp_act']]
        self.stem = Downsample(in_channels, self.dims[0], 7, 4, 2, norm=a['downsample_norm'],
                               norm_first=False)
        total = sum(self.depths)
        drop_rates = [drop_path_rate * k / max(total - 1, 1) for k in range(total)]
        stages = []
        for i, (depth, dim, mixer) in enumerate(zip(self.depths, self.dims, a['mixers'])):
            downsample = (nn.Identity() if i == 0 else
                          Downsample(self.dims[i - 1], dim, 3, 2, 1, norm=a['downsample_norm']))
            native_tokens = (224 // (4 * 2**i))**2
            rates = drop_rates[sum(self.depths[:i]):sum(self.depths[:i + 1])]
            blocks = [MetaFormerBlock(
                dim, MIXERS[mixer](dim, native_tokens), norm_layer, mlp_act, a['mlp_bias'],
                drop_path=rate, layer_scale_init=a['layer_scale_init'],
                res_scale_init=1.0 if i in a['res_scale_stages'] else None) for rate in rates]
            stages.append(MetaFormerStage(downsample, blocks))
        self.stages = nn.ModuleList(stages)
        for stage in self.stages:
            stage.with_cp = with_cp

        out_norm = a['out_norm'] if out_norm == 'default' else out_norm
        for i in self.out_indices:
            norm = build_norm_layer(out_norm, self.dims[i])[1] if out_norm else nn.Identity()
            self.add_module(f'norm{i}', norm)
        self._freeze_stages()
        self._unchecked_load = None
        self._register_load_state_dict_pre_hook(self._convert_and_check)

    def _convert_and_check(self, state_dict, prefix, local_metadata, strict, missing_keys,
                           unexpected_keys, error_msgs):
        """Before a state dict is copied in: its backbone tensors converted from any supported
        layout (:data:`~mmmetaformer.checkpoints.FORMATS`), every one of them present with its
        shape, and valid; else :class:`~mmmetaformer.trust.CheckpointError`, nothing copied.

        This is how a checkpoint reaches the backbone through mmengine's own
        ``load_checkpoint`` (``init_detector``, ``init_model``, a plain ``Runner``), which checks
        the rest of the model only with warnings: the outcome of such a load of a checkpoint
        file is kept, and the model refuses to be evaluated (:meth:`train` with ``False``)
        right after one that did not fit whole."""
        if checkpoints.checked_load():
            return
        keys = [k for k in state_dict if k.startswith(prefix)]
        if not keys:
            return
        weights, source = checkpoints.check_backbone_state(
            self, {k[len(prefix):]: state_dict.pop(k) for k in keys})
        state_dict.update((prefix + k, v) for k, v in weights.items())
        if source is not None:
            self._unchecked_load = (source, missing_keys, unexpected_keys, error_msgs)

    def _refuse_unfit_load(self):
        """Raise, until the next load or ``train()``, if the last load of a checkpoint file
        through mmengine left tensors of the model missing, unknown or of another shape."""
        source, missing, unexpected, errors = self._unchecked_load
        missing = [k for k in missing if not k.endswith('.num_batches_tracked')]
        mismatch = [e.split(':')[0].replace('size mismatch for ', '') for e in errors
                    if e.startswith('size mismatch for ')]
        lines = [f'  {label} {len(keys)} tensors: {checkpoints.first(keys)}' for label, keys in
                 (('missing', missing), ('unexpected', unexpected),
                  ('wrong shape', mismatch)) if keys]
        if lines:
            raise checkpoints.CheckpointError('\n'.join([
                f'checkpoint {source} did not fit the model it was loaded into (mmengine\'s '
                'load_checkpoint loads what fits and warns):', *lines,
                'The model is not evaluated with parts of it left at their initialisation: '
                'load a checkpoint of this model and config.']))
        self._unchecked_load = None

    @staticmethod
    def _loads_checkpoint(init_cfg) -> bool:
        return isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained'

    @classmethod
    def _merge_pretrained(cls, pretrained, init_cfg):
        if pretrained is None:
            return init_cfg
        if cls._loads_checkpoint(init_cfg):
            warnings.warn(f'pretrained={pretrained!r} is ignored: init_cfg already loads '
                          f'{init_cfg.get("checkpoint")!r}')
            return init_cfg
        return dict(type='Pretrained', checkpoint=pretrained)

    @classmethod
    def resolve_arch(cls, arch: Union[str, dict]) -> dict:
        """The full settings for ``arch``; a clear error lists the valid choices."""
        prefix = f'{cls.family}_' if cls.family else ''
        names = [n[len(prefix):] for n in ARCHS if n.startswith(prefix)]
        if arch is None and cls.family:
            arch = names[0]
        if isinstance(arch, str):
            if prefix + arch not in ARCHS:
                raise ValueError(f'{cls.__name__}: unknown arch {arch!r}; '
                                 f'valid choices: {names}, or a dict of settings')
            return copy.deepcopy(ARCHS[prefix + arch])
        if not isinstance(arch, dict):
            raise TypeError(f'{cls.__name__}: arch must be one of {names} or a dict of '
                            f'settings, got {arch!r}')
        unknown = set(arch) - set(ARCH_KEYS)
        if unknown:
            raise ValueError(f'{cls.__name__}: unknown arch keys {sorted(unknown)}; '
                             f'valid keys: {list(ARCH_KEYS)}')
        settings = dict(FAMILIES.get(cls.family, {}), **copy.deepcopy(arch))
        missing = [k for k in ARCH_KEYS if k not in settings]
        if missing:
            raise ValueError(f'{cls.__name__}: arch dict is missing {missing} '
                             f'(named archs: {names})')
        lengths = {len(settings[k]) for k in ('depths', 'dims', 'mixers')}
        if len(lengths) != 1:
            raise ValueError(f'{cls.__name__}: arch depths, dims and mixers must have the same '
                             f'length, got {settings["depths"]}, {settings["dims"]}, '
                             f'{settings["mixers"]}')
        bad = [m for m in settings['mixers'] if m not in MIXERS]
        if bad:
            raise ValueError(f'{cls.__name__}: unknown mixers {bad}; valid: {list(MIXERS)}')
        return settings

    def _check_out_indices(self, out_indices):
        n = self.num_stages
        if not out_indices or any(not -n <= i < n for i in out_indices):
            raise ValueError(f'out_indices must be non-empty indices of the {n} stages '
                             f'(-{n} to {n - 1}), got {tuple(out_indices)}')
        stages = tuple(i % n for i in out_indices)
        if list(stages) != sorted(set(stages)):  # forward returns stages in order, once each
            raise ValueError(f'out_indices must name distinct stages in ascending order, got '
                             f'{tuple(out_indices)}; use {tuple(sorted(set(stages)))}')
        return stages

    def init_weights(self):
        if self._loads_checkpoint(self.init_cfg):
            checkpoints.load_backbone_checkpoint(
                self, self.init_cfg['checkpoint'], self.init_cfg.get('prefix'),
                use_ema=self.init_cfg.get('use_ema', False))
            self._is_init = True
        else:
            super().init_weights()

    def forward(self, x):
        x = self.stem(x.permute(0, 2, 3, 1))
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f'norm{i}')(x.permute(0, 3, 1, 2)).contiguous())
        return tuple(outs)

    def _frozen_modules(self):
        if self.frozen_stages >= 0:
            yield self.stem
        yield from self.stages[:max(self.frozen_stages, 0)]

    def _freeze_stages(self):
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        if self._unchecked_load is not None and not mode:
            self._refuse_unfit_load()
        self._unchecked_load = None  # training after such a load: a fine-tune
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, (nn.LayerNorm, nn.GroupNorm, GroupNorm1,
                                       nn.modules.batchnorm._BatchNorm)):
                    module.eval()
        return self

    def get_layer_depth(self, param_name: str, prefix: str = '', num_layers=None,
                        decay_type: str = 'layer_wise'):
        """Layer id of a parameter for layer-wise lr decay, and the number of layer ids.

        ``layer_wise``: the stem is 0, the blocks are spread evenly over ids
        ``1 .. num_layers - 2`` (each block its own id by default, ``num_layers =
        sum(depths) + 2``), a downsampling layer shares the id of the first block of its stage,
        and everything else (output norms, neck, heads) gets ``num_layers - 1``.
        ``stage_wise``: the stem is 0, stage i (with its downsampling) is ``i + 1``.
        """
        if decay_type == 'stage_wise':
            num_layers = self.num_stages + 2
        elif decay_type == 'layer_wise':
            num_layers = num_layers or sum(self.depths) + 2
        else:
            raise ValueError(f"decay_type must be 'layer_wise' or 'stage_wise', got {decay_type!r}")
        if not param_name.startswith(prefix):
            return num_layers - 1, num_layers
        name = param_name[len(prefix):]
        if name.startswith('stem.'):
            return 0, num_layers
        if not name.startswith('stages.'):
            return num_layers - 1, num_layers
        parts = name.split('.')
        stage = int(parts[1])
        if decay_type == 'stage_wise':
            return stage + 1, num_layers
        block = int(parts[3]) if parts[2] == 'blocks' else 0
        index = sum(self.depths[:stage]) + block
        return 1 + index * (num_layers - 2) // sum(self.depths), num_layers


@MODELS.register_module()
class PoolFormer(MetaFormer):
    """PoolFormer (v1), "MetaFormer Is Actually What You Need for Vision"; arch
    s12/s24/s36/m36/m48."""
    family = 'poolformer'


@MODELS.register_module()
class PoolFormerV2(MetaFormer):
    """PoolFormerV2, "MetaFormer Baselines for Vision"; arch s12/s24/s36/m36/m48."""
    family = 'poolformerv2'


@MODELS.register_module()
class IdentityFormer(MetaFormer):
    """IdentityFormer (identity token mixer); arch s12/s24/s36/m36/m48."""
    family = 'identityformer'


@MODELS.register_module()
class RandFormer(MetaFormer):
    """RandFormer (frozen random token mixing in stages 3-4, any input size); arch
    s12/s24/s36/m36/m48."""
    family = 'randformer'


@MODELS.register_module()
class ConvFormer(MetaFormer):
    """ConvFormer (separable-conv mixer); arch s18/s36/m36/b36."""
    family = 'convformer'


@MODELS.register_module()
class CAFormer(MetaFormer):
    """CAFormer (separable conv in stages 1-2, attention in stages 3-4); arch s18/s36/m36/b36."""
    family = 'caformer'
