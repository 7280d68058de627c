"""The FLOP counters OpenMMLab users run agree with ``count_macs`` (``torch.utils.flop_counter``)
within 2%: mmengine's jit-based counter per family, and ``get_model_complexity_info`` called as
mmdet's and mmseg's ``tools/analysis_tools/get_flops.py`` call it, on a detector and a segmentor
of the project's configs. No op of the backbone goes uncounted: no custom autograd function
(``prim::PythonOp``) and no ``scaled_dot_product_attention`` among the unsupported operators.

mmengine's counter also counts norms (5 per element) and PoolFormer's pooling (a depthwise
convolution), which ``count_macs`` leaves out as the papers do: about 1.4% at most.
"""
import inspect
import logging
import os
from functools import partial

import pytest
import torch
from mmengine.analysis import FlopAnalyzer, get_model_complexity_info
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import DefaultScope, init_default_scope

from mmmetaformer.macs import count_macs
from mmmetaformer.models import MetaFormer, layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY_MODELS = ('poolformer_s12', 'poolformerv2_s12', 'identityformer_s12', 'randformer_s12',
                 'convformer_s18', 'caformer_s18')
TOLERANCE = 0.02
#: The custom autograd functions of the layers, as a jit trace names them.
OUR_PYTHON_OPS = {f'prim::PythonOp.{name}' for name, obj in vars(layers).items()
                  if inspect.isclass(obj) and issubclass(obj, torch.autograd.Function)}


def uncounted_backbone_ops(ops) -> set:
    return {op for op in ops if op in OUR_PYTHON_OPS or 'scaled_dot_product' in op}


def test_the_layers_have_custom_functions():
    """The check below would pass vacuously without them."""
    assert {'prim::PythonOp._StarReLUFunction', 'prim::PythonOp._SquaredReLUFunction',
            'prim::PythonOp._DepthwiseConvFunction'} <= OUR_PYTHON_OPS


@pytest.mark.parametrize('arch', FAMILY_MODELS)
def test_mmengine_counter_per_family(arch, one_thread):
    """At 224x224 CAFormer's attention is 5% of its MACs, ConvFormer's depthwise convolutions
    3%: either one left out shows."""
    model = MetaFormer(arch=arch, init_cfg=None).eval()
    x = torch.rand(1, 3, 224, 224)
    analyzer = FlopAnalyzer(model, (x,))
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert analyzer.total() == pytest.approx(count_macs(model, x), rel=TOLERANCE)
    assert not uncounted_backbone_ops(analyzer.unsupported_ops())


def test_traced_model_computes_the_same(one_thread):
    """What the counters and the TorchScript exporter trace (plain ops, explicit attention)
    is the model: a jit trace with gradients on (as the counters run it) gives its outputs.
    CAFormer has every traced form: StarReLU, squared ReLU, depthwise conv, attention."""
    torch.manual_seed(0)
    model = MetaFormer(arch='caformer_s18').eval()
    model.init_weights()
    for name, param in model.named_parameters():  # StarReLU's scale and bias off 1 and 0
        if param.numel() == 1:
            param.data.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 96, 128)
    traced = torch.jit.trace(model, x, check_trace=False)
    with torch.no_grad():
        expected = model(x)
    for out, ref in zip(traced(x), expected):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


class WarnedOps(logging.Handler):
    """The operators of mmengine's "Unsupported operator OP encountered N time(s)" lines."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def emit(self, record):
        words = record.getMessage().split()
        if words[:2] == ['Unsupported', 'operator']:
            self.ops.add(words[2])


def complexity_info(model, inputs) -> tuple:
    """``get_model_complexity_info`` as the get_flops tools call it: (MACs, warned ops)."""
    logger = MMLogger.get_current_instance()
    handler = WarnedOps()
    logger.addHandler(handler)
    try:
        flops = get_model_complexity_info(model, inputs=inputs, show_table=False,
                                          show_arch=False)['flops']
    finally:
        logger.removeHandler(handler)
    return flops, handler.ops


def build(config: str):
    from mmengine.registry import MODELS
    cfg = Config.fromfile(os.path.join(ROOT, config))
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    return revert_sync_batchnorm(MODELS.build(cfg.model))


def test_mmdet_get_flops(one_thread):
    """As mmdet's tool does: the data preprocessor's batch, ``forward`` bound to its data
    samples, the inputs to ``get_model_complexity_info``. RetinaNet: a two-stage detector's
    box and mask heads, which cost per proposal, would outweigh the backbone at this size."""
    from mmdet.structures import DetDataSample
    with DefaultScope.overwrite_default_scope('mmdet'):
        init_default_scope('mmdet')
        model = build('configs/coco/retinanet_caformer-s18_fpn_1x_coco.py').eval()
        shape = (120, 160)
        batch = dict(inputs=[torch.randint(0, 256, (3, *shape), dtype=torch.uint8)],
                     data_samples=[DetDataSample(metainfo=dict(
                         img_shape=shape, ori_shape=shape, scale_factor=(1.0, 1.0)))])
        data = model.data_preprocessor(batch)
        expected = count_macs(model, data['inputs'], data['data_samples'], mode='tensor')
        model.forward = partial(model.forward, data_samples=data['data_samples'])
        flops, warned = complexity_info(model, data['inputs'])
    assert data['inputs'].shape[-2:] == (128, 160)  # padded to 32, as mmdet counts
    assert flops == pytest.approx(expected, rel=TOLERANCE)
    assert warned and not uncounted_backbone_ops(warned)


def test_mmseg_get_flops(one_thread):
    """As mmseg's tool does: no auxiliary head, a random image through the data preprocessor.
    (mmseg 1.2.2's tool passes ``input_shape`` with ``inputs``, which mmengine refuses,
    open-mmlab/mmsegmentation#3241; the call here is the tool's without ``input_shape``.)"""
    from mmseg.structures import SegDataSample
    with DefaultScope.overwrite_default_scope('mmseg'):
        init_default_scope('mmseg')
        model = build('configs/ade20k/upernet_caformer-s18_8xb2-160k_ade20k-512x512.py')
        model.auxiliary_head = None
        shape = (96, 96)
        data = model.data_preprocessor(dict(
            inputs=[torch.rand(3, *shape)],
            data_samples=[SegDataSample(metainfo=dict(ori_shape=shape, pad_shape=shape))]))
        model.eval()
        expected = count_macs(model, data['inputs'], mode='tensor')
        flops, warned = complexity_info(model, data['inputs'])
    assert flops == pytest.approx(expected, rel=TOLERANCE)
    assert warned and not uncounted_backbone_ops(warned)
