"""Multiply-add counting that includes attention matmuls on every device."""
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

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
    as in the papers' fvcore figures)."""
    with FlopCounterMode(display=False, custom_mapping=_SDPA_CPU) as counter:
        model(*inputs, **kwargs)
    return counter.get_total_flops() // 2
