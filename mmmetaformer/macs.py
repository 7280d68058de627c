"""Multiply-add counting that includes attention matmuls on every device."""
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .models.mixers import Pooling

aten = torch.ops.aten

# FlopCounterMode counts the CUDA SDPA kernels but not the CPU one.
_SDPA_CPU = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda query, key, value, *args, out_shape=None, **kwargs:
            sdpa_flop_count(query, key, value),
}


@torch.no_grad()
def count_macs(model: torch.nn.Module, *inputs, **kwargs) -> int:
    """Multiply-adds of one forward of ``model(*inputs, **kwargs)``: convolutions, linear
    layers and matmuls, attention included (norms, activations and pooling are not counted,
    as in the papers' fvcore figures; PoolFormer's pooling, which runs as a depthwise
    convolution, is left out by module). mmengine's jit-based counter
    (``get_model_complexity_info``) agrees within 2%: it also counts norms and pooling."""
    with FlopCounterMode(display=False, custom_mapping=_SDPA_CPU) as counter:
        model(*inputs, **kwargs)
    per_module = counter.get_flop_counts()  # keyed '<root class>.<module name>'
    root = type(model).__name__
    pooling = sum(sum(per_module.get(f'{root}.{name}', {}).values())
                  for name, module in model.named_modules() if isinstance(module, Pooling))
    return (counter.get_total_flops() - pooling) // 2
