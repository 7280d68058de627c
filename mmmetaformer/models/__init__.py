from .metaformer import (ARCHS, CAFormer, ConvFormer, IdentityFormer, MetaFormer, PoolFormer,
                         PoolFormerV2, RandFormer)

__all__ = ['ARCHS', 'MetaFormer', 'PoolFormer', 'PoolFormerV2', 'IdentityFormer', 'RandFormer',
           'ConvFormer', 'CAFormer']
