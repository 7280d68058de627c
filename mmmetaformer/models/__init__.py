import importlib.util

from ..archs import ARCHS
from .metaformer import (CAFormer, ConvFormer, IdentityFormer, MetaFormer, PoolFormer,
                         PoolFormerV2, RandFormer)

if importlib.util.find_spec('mmpretrain'):  # the classifier head needs the "cls" extra
    from .heads import MetaFormerClsHead  # noqa: F401

__all__ = ['ARCHS', 'MetaFormer', 'PoolFormer', 'PoolFormerV2', 'IdentityFormer', 'RandFormer',
           'ConvFormer', 'CAFormer']
