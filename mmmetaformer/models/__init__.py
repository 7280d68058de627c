from ..archs import ARCHS
from ..registry import MODELS
from .metaformer import (CAFormer, ConvFormer, IdentityFormer, MetaFormer, PoolFormer,
                         PoolFormerV2, RandFormer)


@MODELS.register_module(name='MetaFormerClsHead')
def build_cls_head(**kwargs):
    """``type='mmmetaformer.MetaFormerClsHead'``: :class:`.heads.MetaFormerClsHead`. Its module
    imports mmpretrain's models (seconds, and the "cls" extra), which only a classifier needs."""
    from .heads import MetaFormerClsHead
    return MetaFormerClsHead(**kwargs)


__all__ = ['ARCHS', 'MetaFormer', 'PoolFormer', 'PoolFormerV2', 'IdentityFormer', 'RandFormer',
           'ConvFormer', 'CAFormer']
