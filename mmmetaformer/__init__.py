"""MetaFormer backbones for OpenMMLab detection, segmentation and classification."""
from . import patches, requirements

requirements.check()
patches.apply()  # the listed changes to mmengine/mmcv/mmpretrain (mmmetaformer.patches)

from .registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS  # noqa: E402
from . import engine, models  # noqa: F401,E402  (registers the modules)

__version__ = '0.1.0'
__all__ = ['MODELS', 'OPTIM_WRAPPER_CONSTRUCTORS', '__version__']
