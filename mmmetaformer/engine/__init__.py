from .amp import AutocastOptimWrapper, amp_optim_wrapper
from .hooks import SafeCheckpointHook
from .optimizers import LayerDecayOptimWrapperConstructor
from .runner import SafeRunner

__all__ = ['AutocastOptimWrapper', 'LayerDecayOptimWrapperConstructor', 'SafeCheckpointHook',
           'SafeRunner', 'amp_optim_wrapper']
