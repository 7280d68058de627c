"""Layer-wise learning-rate decay for MetaFormer backbones in mmdet, mmseg and mmpretrain."""
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import DefaultOptimWrapperConstructor

from ..registry import OPTIM_WRAPPER_CONSTRUCTORS


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Optimizer wrapper constructor with layer-wise lr decay over a MetaFormer backbone.

    ``paramwise_cfg`` keys:

    - ``decay_rate`` (float): lr multiplier per layer id below the top one (default 1.0).
    - ``decay_type``: ``'layer_wise'`` (the stem, then the blocks spread evenly over the layer
      ids) or ``'stage_wise'`` (the stem, then one id per stage); see
      :meth:`MetaFormer.get_layer_depth`. Modules outside the backbone get the top id (lr x1).
    - ``num_layers`` (int, layer_wise only): number of layer ids; default ``sum(depths) + 2``.

    Parameter ``p`` gets ``lr = base_lr * decay_rate ** (num_layers - 1 - layer_id)``. 1-D
    parameters (norm weights and biases, layer/res scales, StarReLU scalars) and biases get no
    weight decay; frozen parameters are left out.

    Example::

        optim_wrapper = dict(
            constructor='mmmetaformer.LayerDecayOptimWrapperConstructor',
            optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
            paramwise_cfg=dict(decay_rate=0.9, decay_type='layer_wise'))
    """

    def add_params(self, params, module, **kwargs):
        model = module.module if is_model_wrapper(module) else module
        backbone = getattr(model, 'backbone', None)
        if not hasattr(backbone, 'get_layer_depth'):
            raise TypeError('LayerDecayOptimWrapperConstructor needs a model whose `backbone` '
                            f'has get_layer_depth (a MetaFormer), got {type(backbone).__name__}')
        decay_rate = self.paramwise_cfg.get('decay_rate', 1.0)
        decay_type = self.paramwise_cfg.get('decay_type', 'layer_wise')
        num_layers = self.paramwise_cfg.get('num_layers')
        if num_layers is not None and decay_type != 'layer_wise':
            raise ValueError('paramwise_cfg num_layers only applies to decay_type=layer_wise')
        unknown = set(self.paramwise_cfg) - {'decay_rate', 'decay_type', 'num_layers'}
        if unknown:
            raise ValueError(f'unknown paramwise_cfg keys {sorted(unknown)}; valid: '
                             "['decay_rate', 'decay_type', 'num_layers']")

        groups = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            layer_id, total = backbone.get_layer_depth(
                name, 'backbone.', num_layers=num_layers, decay_type=decay_type)
            no_decay = param.ndim == 1 or name.endswith('.bias')
            key = (layer_id, no_decay)
            if key not in groups:
                scale = decay_rate**(total - 1 - layer_id)
                groups[key] = dict(params=[], lr=self.base_lr * scale,
                                   weight_decay=0. if no_decay else self.base_wd)
            groups[key]['params'].append(param)
        for (layer_id, no_decay), group in sorted(groups.items()):
            print_log(f'layer {layer_id} {"no_decay" if no_decay else "decay"}: '
                      f'lr={group["lr"]:.3g} weight_decay={group["weight_decay"]} '
                      f'params={len(group["params"])}', logger='current')
        params.extend(groups.values())
