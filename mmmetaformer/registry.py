"""The ``mmmetaformer`` registry scope.

Each registry is a child of mmengine's root registry, so configs of mmdet, mmseg and
mmpretrain can name ``type='mmmetaformer.CAFormer'`` once ``mmmetaformer`` is imported
(``custom_imports=dict(imports=['mmmetaformer'], allow_failed_imports=False)``).
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import \
    OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmmetaformer',
                  locations=['mmmetaformer.models'])
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor', parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS,
    scope='mmmetaformer', locations=['mmmetaformer.engine'])
OPTIM_WRAPPERS = Registry('optim wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='mmmetaformer',
                          locations=['mmmetaformer.engine'])
