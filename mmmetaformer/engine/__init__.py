from .amp import AutocastOptimWrapper, amp_optim_wrapper
from .optimizers import LayerDecayOptimWrapperConstructor

__all__ = ['AutocastOptimWrapper', 'LayerDecayOptimWrapperConstructor', 'amp_optim_wrapper']
