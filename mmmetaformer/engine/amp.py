"""Mixed precision for ``tools/train.py --amp``: the optimizer wrapper config per device, and
an optimizer wrapper that autocasts without loss scaling (bfloat16, also on CPU)."""
from contextlib import ExitStack, contextmanager
from typing import Optional, Sequence

import torch
import torch.nn as nn
from mmengine.optim import OptimWrapper
from torch.utils._pytree import tree_map

from ..registry import OPTIM_WRAPPERS

#: The submodules that ``--amp`` autocasts on CPU: where the compute is. mmcv's detection ops
#: (RoIAlign, NMS) have no bfloat16 kernels, so the heads stay in float32.
CPU_AUTOCAST_MODULES = ('backbone', 'neck')


def _float_outputs(forward, device_type: str, dtype: torch.dtype):
    """``forward`` run under autocast, its floating-point tensor outputs cast to float32."""
    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            outputs = forward(*args, **kwargs)
        return tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and
                        t.is_floating_point() else t, outputs)
    return autocast_forward


@OPTIM_WRAPPERS.register_module()
class AutocastOptimWrapper(OptimWrapper):
    """``OptimWrapper`` that runs the forward pass under ``torch.autocast(dtype)`` without loss
    scaling: bfloat16 has float32's exponent range, so its gradients need none. Works on CPU,
    where mmengine's ``AmpOptimWrapper`` refuses to run (it asserts a GPU).

    Args:
        dtype (str | torch.dtype): the autocast dtype (default ``'bfloat16'``).
        modules (Sequence[str], optional): autocast only these submodules of the model (e.g.
            ``('backbone', 'neck')``; those it lacks are skipped), their outputs cast back to
            float32; ``None``: the whole forward pass.
        **kwargs: the arguments of ``OptimWrapper``.
    """

    def __init__(self, dtype='bfloat16', modules: Optional[Sequence[str]] = None, **kwargs):
        super().__init__(**kwargs)
        self.cast_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.modules = None if modules is None else tuple(modules)

    @contextmanager
    def optim_context(self, model: nn.Module):
        device_type = next(model.parameters()).device.type
        with super().optim_context(model), ExitStack() as stack:
            if self.modules is None:
                stack.enter_context(torch.autocast(device_type, dtype=self.cast_dtype))
            else:
                inner = getattr(model, 'module', model)  # DDP / MMDistributedDataParallel
                for name in self.modules:
                    module = getattr(inner, name, None)
                    if isinstance(module, nn.Module):
                        module.forward = _float_outputs(module.forward, device_type,
                                                        self.cast_dtype)
                        stack.callback(delattr, module, 'forward')
            yield


def amp_optim_wrapper(optim_wrapper: dict, device: str):
    """``optim_wrapper`` (a config dict) turned to mixed precision on ``device``, and a line
    saying what was chosen.

    - CUDA: mmengine's ``AmpOptimWrapper``, float16 with dynamic loss scaling over the whole
      model (the backbones are float16-safe, README "Mixed precision"). Not bfloat16: mmcv's
      RoIAlign and NMS have no bfloat16 kernels. A config's own ``AmpOptimWrapper`` settings
      are kept.
    - Other devices: :class:`AutocastOptimWrapper`, bfloat16 over
      :data:`CPU_AUTOCAST_MODULES` (float16 has no fast CPU kernels, and mmcv's CPU ops no
      bfloat16 ones), no loss scaling.
    """
    cfg = dict(optim_wrapper)
    if device == 'cuda':
        if cfg.get('type') != 'AmpOptimWrapper':
            cfg.update(type='AmpOptimWrapper', loss_scale='dynamic')
        cfg.setdefault('dtype', 'float16')
        return cfg, (f'--amp: {cfg["dtype"]} autocast on cuda, AmpOptimWrapper '
                     f'(loss scale {cfg.get("loss_scale", "dynamic")})')
    cfg.pop('loss_scale', None)
    cfg.update(type='mmmetaformer.AutocastOptimWrapper', dtype='bfloat16',
               modules=list(CPU_AUTOCAST_MODULES))
    line = (f'--amp: bfloat16 autocast on {device} of the model\'s '
            f'{" and ".join(CPU_AUTOCAST_MODULES)}, no loss scaling (AutocastOptimWrapper)')
    if device == 'cpu' and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        line += ('; warning: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so bfloat16 '
                 'runs emulated and slower than float32: leave out --amp here')
    return cfg, line
