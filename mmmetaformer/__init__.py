"""MetaFormer backbones for OpenMMLab detection, segmentation and classification.

Importing the package only registers (:mod:`mmmetaformer.registry`): the models, the run
components its configs name, the checkpoint schemes, a file backend and the config scope.
"""
from . import requirements

requirements.check()

from .registry import MODELS, register_extensions  # noqa: E402
from . import engine, models  # noqa: F401,E402  (registers the modules)

register_extensions()

__version__ = '0.1.0'
__all__ = ['MODELS', '__version__']
