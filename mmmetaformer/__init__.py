"""MetaFormer backbones for OpenMMLab detection, segmentation and classification."""
from . import compat, requirements

requirements.check()
compat.apply()
requirements.register_config_scope()  # _base_ = 'mmmetaformer::coco/...'

from .registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS  # noqa: E402
from . import engine, models  # noqa: F401,E402  (registers the modules)
from . import dense_checkpoints  # noqa: E402
dense_checkpoints.apply()  # load_from / tools/test.py take the published dense files

__version__ = '0.1.0'
__all__ = ['MODELS', 'OPTIM_WRAPPER_CONSTRUCTORS', '__version__']
