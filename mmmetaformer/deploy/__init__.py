"""ONNX export of MetaFormer backbones, classifiers, segmentors and whole detectors.

:func:`build_exportable` turns a backbone name (``caformer_s18``) or an mmpretrain / mmseg /
mmdet config, with an optional checkpoint, into a module that maps one preprocessed image batch
to a tuple of named tensors; :func:`export_onnx` writes it with the TorchScript-based exporter
after :func:`export_forms` (on a copy) has swapped in the forms backends handle best, and
replaces the file only once it is complete; :func:`check_onnx` runs the file in onnxruntime
against PyTorch. Detectors: :mod:`mmmetaformer.deploy.detector`.
"""
import copy
import io
import json
import os
import statistics
import sys
import time
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ..checkpoints import load_backbone_checkpoint, load_model_checkpoint
from .detector import DETECTOR_MIN_OPSET, DetectorGraph, ExportError
from ..fileio import write_bytes
from ..models import ARCHS, MetaFormer
from ..models.layers import (GroupNorm1, Mlp, PointwiseLinear, SquaredReLU, StarReLU,
                            folded_star_relu_params)
from ..models.mixers import RandomMixing, SepConv, resample_mixing_matrix

#: Input size of a static export and of ``--check`` per kind of model (H, W).
DEFAULT_SHAPES = {'mmdet': (800, 1344), 'mmseg': (512, 512), 'mmpretrain': (224, 224),
                  None: (224, 224)}
#: GroupNorm(1) forms: one ONNX LayerNormalization over (C, H, W), ReduceMean arithmetic, or
#: PyTorch's own export (Reshape + InstanceNormalization).
GROUPNORM_FORMS = ('layernorm', 'reducemean', 'instancenorm')
MIN_OPSET = 14  # scaled_dot_product_attention
#: Bounds of each side of the traced input: the coarsest map (stride 32) at least 1 x 1, and
#: a side no larger than large detector inputs need.
MIN_SIDE, MAX_SIDE = 32, 4096
#: The test pipeline's geometric steps a runtime repeats, and their settings.
RESIZE_STEPS = ('Resize', 'ResizeEdge', 'CenterCrop')
RESIZE_KEYS = ('type', 'scale', 'keep_ratio', 'edge', 'crop_size')


# --- export forms --------------------------------------------------------------------------

class _LayerNormOverCHW(torch.autograd.Function):
    """Normalisation of each sample over all its elements (GroupNorm with one group), exported
    as one ONNX ``LayerNormalization(axis=1)`` whose unit scale takes the input's shape."""

    @staticmethod
    def forward(ctx, x, eps: float):
        return F.layer_norm(x, x.shape[1:], eps=eps)

    @staticmethod
    def symbolic(g, x, eps: float):
        ones = g.op('ConstantOfShape', g.op('Shape', x, start_i=1),
                    value_t=torch.ones(1, dtype=torch.float32))
        return g.op('LayerNormalization', x, g.op('CastLike', ones, x), axis_i=1,
                    epsilon_f=eps)


def _normalize_reducemean(x, eps: float):
    dims = tuple(range(1, x.dim()))
    centered = x - x.mean(dims, keepdim=True)
    return centered * torch.rsqrt(centered.square().mean(dims, keepdim=True) + eps)


class ExportGroupNorm1(nn.Module):
    """GroupNorm with one group (channels-last :class:`GroupNorm1` or NCHW ``nn.GroupNorm``)
    in an export form: a normalisation over all non-batch elements, then the per-channel
    affine."""

    def __init__(self, norm: nn.Module, form: str, channels_last: bool):
        super().__init__()
        self.form, self.eps = form, norm.eps
        shape = (-1,) if channels_last else (-1, 1, 1)
        self.weight = nn.Parameter(norm.weight.detach().reshape(shape))
        self.bias = None if norm.bias is None else nn.Parameter(norm.bias.detach().reshape(shape))

    def forward(self, x):
        if self.form == 'layernorm':
            x = _LayerNormOverCHW.apply(x, self.eps)
        else:
            x = _normalize_reducemean(x, self.eps)
        x = x * self.weight
        return x if self.bias is None else x + self.bias


class ExportRandomMixing(nn.Module):
    """:class:`RandomMixing` with the matrix resampled inside the graph for the input's token
    grid (a static export would freeze the matrix of the traced size)."""

    def __init__(self, mixer: RandomMixing):
        super().__init__()
        self.random_matrix = mixer.random_matrix

    def forward(self, x):
        B, H, W, C = x.shape
        matrix = resample_mixing_matrix(self.random_matrix, (H, W))
        return (matrix @ x.reshape(B, H * W, C)).reshape(B, H, W, C)


class ShiftedSquaredReLU(nn.Module):
    """``relu(x) ** 2 + bias``: a StarReLU whose scale was folded into the next layer."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x):
        return F.relu(x).square() + self.bias


def _adaptive_pool_matrix(size, bins: int, like: torch.Tensor) -> torch.Tensor:
    """The (bins, size) matrix of adaptive average pooling: bin i averages positions
    ``floor(i * size / bins)`` to ``ceil((i + 1) * size / bins)`` (exclusive)."""
    i = torch.arange(bins, device=like.device)
    start = i * size // bins
    end = ((i + 1) * size + bins - 1) // bins
    pos = torch.arange(size, device=like.device)[None]
    inside = (pos >= start[:, None]) & (pos < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


class ExportAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as two matmuls with averaging matrices built from the input's
    size, so that the graph takes any size (ONNX has no adaptive pooling to k > 1 bins)."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = _pair(output_size)

    def forward(self, x):
        rows = _adaptive_pool_matrix(x.shape[-2], self.output_size[0], x)
        cols = _adaptive_pool_matrix(x.shape[-1], self.output_size[1], x)
        return rows @ x @ cols.t()


class ExportUpsample(nn.Module):
    """mmseg's ``Upsample`` by an integer factor without its ``int(size * factor)``, which a
    trace freezes to the traced size (same output sizes and coordinates)."""

    def __init__(self, upsample: nn.Module):
        super().__init__()
        self.scale_factor, self.mode = upsample.scale_factor, upsample.mode
        self.align_corners = upsample.align_corners

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode,
                             align_corners=self.align_corners)


def _fold_into_linear(act: StarReLU, fc: nn.Linear) -> PointwiseLinear:
    """``fc(s * relu(x)**2 + b)`` as ``fc'(relu(x)**2)`` (:func:`folded_star_relu_params`)."""
    folded = PointwiseLinear(fc.in_features, fc.out_features, bias=True).to(fc.weight)
    with torch.no_grad():
        weight, bias = folded_star_relu_params(act, fc)
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
    return folded


@torch.no_grad()
def fold_star_relu(model: nn.Module) -> nn.Module:
    """Fold every StarReLU's scale and bias into the layer after it, in place (exact up to float
    rounding): in an MLP both go into ``fc2`` (which gains a bias) and the activation becomes a
    SquaredReLU; in a SepConv the scale goes into the depthwise conv, whose zero padding makes
    the bias position-dependent, so ``bias / scale`` stays as an add."""
    for module in model.modules():
        if isinstance(module, Mlp) and isinstance(module.act, StarReLU):
            module.fc2 = _fold_into_linear(module.act, module.fc2)
            module.act = SquaredReLU()
        elif (isinstance(module, SepConv) and isinstance(module.act1, StarReLU)
              and module.act1.scale.item() != 0):
            scale, bias = module.act1.scale.detach(), module.act1.bias.detach()
            module.dwconv.weight.mul_(scale)
            module.act1 = ShiftedSquaredReLU(bias / scale)
    return model


def export_forms(model: nn.Module, groupnorm: str = 'layernorm',
                 fold: bool = True) -> nn.Module:
    """A copy of ``model`` (in eval mode) in export forms: RandFormer's matrix resampling,
    adaptive pooling and mmseg's upsampling computed from the input size in the graph, SyncBN
    as BN, GroupNorm(1) in the ``groupnorm`` form (see
    :data:`GROUPNORM_FORMS`) and, with ``fold``, StarReLU folded (:func:`fold_star_relu`)."""
    from mmengine.model import revert_sync_batchnorm
    if groupnorm not in GROUPNORM_FORMS:
        raise ExportError(f'groupnorm form must be one of {GROUPNORM_FORMS}, got {groupnorm!r}')
    model = revert_sync_batchnorm(copy.deepcopy(model)).eval()
    # a model holding mmseg's Upsample has loaded its module: no mmseg import (seconds) for
    # the other models
    seg_utils = sys.modules.get('mmseg.models.utils')
    SegUpsample = seg_utils.Upsample if seg_utils is not None else ()

    def swap(parent: nn.Module):
        for name, child in parent.named_children():
            new = None
            if isinstance(child, RandomMixing):
                new = ExportRandomMixing(child)
            elif isinstance(child, nn.AdaptiveAvgPool2d):
                new = ExportAdaptiveAvgPool2d(child.output_size)
            elif (isinstance(child, SegUpsample) and not child.size
                  and float(child.scale_factor).is_integer()):
                new = ExportUpsample(child)
            elif groupnorm != 'instancenorm' and isinstance(child, GroupNorm1):
                new = ExportGroupNorm1(child, groupnorm, channels_last=True)
            elif (groupnorm != 'instancenorm' and isinstance(child, nn.GroupNorm)
                  and child.num_groups == 1 and child.affine):
                new = ExportGroupNorm1(child, groupnorm, channels_last=False)
            if new is None:
                swap(child)
            else:
                setattr(parent, name, new)

    swap(model)
    return fold_star_relu(model) if fold else model


# --- what is exported ----------------------------------------------------------------------

class Exportable(nn.Module):
    """One preprocessed image batch -> a tuple of tensors, for each ``part``:

    - ``backbone``: the MetaFormer's feature maps;
    - ``features``: a detector's or segmentor's backbone + neck (``extract_feat``);
    - ``classifier``: an mmpretrain classifier's logits (``mode='tensor'``);
    - ``segmentor``: an mmseg EncoderDecoder's logits (``mode='tensor'``), resized to the
      input size as its whole-image inference does;
    - ``dense_head``: a single-stage detector's raw head maps (``mode='tensor'``: class scores
      of every level, then box deltas of every level), before anchor decoding and NMS;
    - ``detector``: a whole detector, ``model`` being its
      :class:`~mmmetaformer.deploy.detector.DetectorGraph` (boxes, labels and masks).
    """
    PARTS = ('backbone', 'features', 'classifier', 'segmentor', 'dense_head', 'detector')

    def __init__(self, model: nn.Module, part: str):
        super().__init__()
        self.model, self.part = model, part

    def forward(self, inputs):
        if self.part == 'backbone':
            return tuple(self.model(inputs))
        if self.part == 'features':
            return tuple(self.model.extract_feat(inputs))
        if self.part == 'classifier':
            return (self.model(inputs, mode='tensor'),)
        if self.part == 'detector':
            return self.model(inputs)
        if self.part == 'segmentor':
            logits = self.model(inputs, mode='tensor')
            return (F.interpolate(logits, size=inputs.shape[2:], mode='bilinear',
                                  align_corners=self.model.decode_head.align_corners),)
        scores, deltas = self.model(inputs, mode='tensor')
        return (*scores, *deltas)

    def output_names(self, inputs: torch.Tensor):
        """``feat{i}`` (backbone stage i, stride 4 * 2**i), ``fpn{i}`` (neck level i),
        ``logits``, ``seg_logits``, ``cls_score{i}`` then ``bbox_pred{i}`` (head level i), or
        ``dets``, ``labels`` and ``masks`` (mmdeploy's names). A neck's and a dense head's
        levels are counted on a forward of ``inputs``."""
        if self.part == 'detector':
            return self.model.output_names()
        if self.part == 'classifier':
            return ['logits']
        if self.part == 'segmentor':
            return ['seg_logits']
        if self.part == 'backbone':
            return [f'feat{i}' for i in self.model.out_indices]
        with torch.no_grad():
            num_outputs = len(self(inputs))
        if self.part == 'dense_head':
            levels = range(num_outputs // 2)
            return [f'cls_score{i}' for i in levels] + [f'bbox_pred{i}' for i in levels]
        return [f'fpn{i}' for i in range(num_outputs)]


def _build_from_config(config: str):
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope, init_default_scope
    if not os.path.isfile(config):
        raise ExportError(f'config not found: {config} (give a config file or a backbone '
                          f'name such as caformer_s18; names: {", ".join(ARCHS)})')
    try:
        cfg = Config.fromfile(config)
        scope = cfg.get('default_scope')
        init_default_scope(scope or 'mmengine')
        with DefaultScope.overwrite_default_scope(scope):
            model = MODELS.build(cfg.model)
    except Exception as err:
        first = (str(err).strip().splitlines() or [''])[0]
        raise ExportError(f'cannot build the model of {config}: {type(err).__name__}: '
                          f'{first}') from None
    return cfg, model


def _parts(model: nn.Module, scope: Optional[str]) -> tuple:
    """The parts of ``model`` that export, the default first."""
    if scope == 'mmpretrain':
        return ('classifier', 'backbone')
    if scope == 'mmseg':
        return ('segmentor', 'features', 'backbone')
    if scope == 'mmdet':
        from mmdet.models.detectors import SingleStageDetector
        dense = ('dense_head',) if isinstance(model, SingleStageDetector) else ()
        return ('detector', *dense, 'features', 'backbone')
    raise ExportError(f'default_scope {scope!r}: expected an mmpretrain, mmseg or mmdet config')


def _runtime_metadata(cfg, part: str) -> dict:
    """What a runtime needs beside the graph: the input normalisation (mmpretrain configs keep
    the data preprocessor at the top level, mmdet and mmseg in the model), the test resize,
    class names and colours, and the detector's mask threshold."""
    from mmengine.registry import DATASETS
    preprocessor = cfg.model.get('data_preprocessor') or cfg.get('data_preprocessor') or {}
    meta = {k: preprocessor[k] for k in ('mean', 'std', 'bgr_to_rgb', 'to_rgb',
                                          'pad_size_divisor') if k in preprocessor}
    pipeline = (cfg.get('test_dataloader') or {}).get('dataset', {}).get('pipeline', [])
    meta['resize'] = [{k: v for k, v in step.items() if k in RESIZE_KEYS}
                      for step in pipeline if step['type'].split('.')[-1] in RESIZE_STEPS]
    dataset = (cfg.get('test_dataloader') or {}).get('dataset', {})
    with DATASETS.switch_scope_and_registry(cfg.get('default_scope')) as registry:
        dataset_class = registry.get(dataset.get('type', ''))
    metainfo = dict(getattr(dataset_class, 'METAINFO', {}), **(dataset.get('metainfo') or {}))
    classes = metainfo.get('classes')
    if classes:  # the palette of a dataset's classes, cut to the config's classes
        meta['classes'] = list(classes)
        meta.update(palette=[list(c) for c in metainfo.get('palette', [])[:len(classes)]])
    if part == 'detector':
        rcnn = cfg.model.get('test_cfg', {}).get('rcnn', {})
        if 'mask_thr_binary' in rcnn:
            meta['mask_thr_binary'] = rcnn['mask_thr_binary']
    return meta


def build_exportable(config: str, checkpoint: Optional[str] = None,
                     part: Optional[str] = None):
    """``(Exportable, info)`` for a backbone name of :data:`ARCHS` (raw stage outputs, any
    checkpoint format) or a config file (``part`` defaults to the whole model); ``info`` holds
    the scope, the part, the model's config, the metadata a runtime needs
    (:func:`_runtime_metadata`) and notes for the user."""
    notes = []
    if config in ARCHS:
        if part not in (None, 'backbone'):
            raise ExportError(f'{config} is a backbone name: only --part backbone applies')
        model = MetaFormer(arch=config, out_norm=None)
        if checkpoint:
            load_backbone_checkpoint(model, checkpoint)
        info = dict(scope=None, part='backbone', cfg=None, notes=notes, metadata={})
        return Exportable(model.eval(), 'backbone'), info

    cfg, model = _build_from_config(config)
    scope = cfg.get('default_scope')
    allowed = _parts(model, scope)
    part = part or allowed[0]
    if part not in Exportable.PARTS:
        raise ExportError(f'unknown part {part!r}; choose one of {Exportable.PARTS}')
    if part not in allowed:
        raise ExportError(f'{config}: --part {part} does not apply to {type(model).__name__}; '
                          f'choose one of {allowed}')
    if checkpoint:
        if part == 'backbone':
            load_backbone_checkpoint(model.backbone, checkpoint)
        else:
            load_model_checkpoint(model, checkpoint)
    else:
        notes.append('no checkpoint: random weights')
    if part == 'segmentor' and cfg.model.get('test_cfg', {}).get('mode') == 'slide':
        notes.append("the config tests with sliding windows (test_cfg.mode='slide'); the "
                     'exported graph is whole-image inference')
    model.cfg = cfg  # as mmdet's init_detector sets it
    if part == 'detector':
        module = DetectorGraph(model.eval())
    else:
        module = model.backbone if part == 'backbone' else model
    info = dict(scope=scope, part=part, cfg=cfg, notes=notes,
                metadata=_runtime_metadata(cfg, part))
    return Exportable(module.eval(), part), info


# --- export and check ----------------------------------------------------------------------

def _dynamic_axes(names: list, part: str) -> dict:
    """Free batch size, height and width (a detector: batch 1, and N detections)."""
    if part == 'detector':
        axes = {'input': {2: 'height', 3: 'width'}, 'dets': {1: 'num_dets'},
                'labels': {1: 'num_dets'}, 'masks': {1: 'num_dets', 2: 'height', 3: 'width'}}
        return {name: axes[name] for name in ['input', *names]}
    axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
    axes.update({n: {0: 'batch'} if n == 'logits' else
                 {0: 'batch', 2: f'{n}_height', 3: f'{n}_width'} for n in names})
    return axes


def export_onnx(exportable: Exportable, out: str, shape=(224, 224), dynamic: bool = False,
                opset: int = 17, groupnorm: str = 'layernorm', fold: bool = True,
                metadata: Optional[dict] = None) -> list:
    """Write ``exportable`` in export forms to ``out`` (input ``input``: N x 3 x H x W; with
    ``dynamic`` N, H and W are free, a detector's N stays 1) with ``metadata`` (values other
    than strings as JSON), and return the output names."""
    import onnx
    if opset < MIN_OPSET:
        raise ExportError(f'opset {opset} < {MIN_OPSET}: scaled_dot_product_attention and '
                          'the other ops need opset >= 14 (17 or more recommended)')
    if exportable.part == 'detector' and opset < DETECTOR_MIN_OPSET:
        raise ExportError(f'opset {opset} < {DETECTOR_MIN_OPSET}: whole detectors need '
                          "RoiAlign's half_pixel mode and GridSample")
    if opset < 17 and groupnorm == 'layernorm':
        groupnorm = 'reducemean'  # LayerNormalization is an opset-17 op
    model = export_forms(exportable, groupnorm, fold)
    x = torch.randn(1, 3, *shape)
    names = model.output_names(x)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=opset,
                          input_names=['input'], output_names=names,
                          dynamic_axes=_dynamic_axes(names, exportable.part) if dynamic
                          else None)
    onnx_model = onnx.load_from_string(buffer.getvalue())
    props = dict(producer='mmmetaformer', part=exportable.part, groupnorm=groupnorm,
                 starrelu_folded=str(fold), **(metadata or {}))
    onnx.helper.set_model_props(onnx_model, {k: v if isinstance(v, str) else json.dumps(v)
                                             for k, v in props.items()})
    try:
        write_bytes(out, onnx_model.SerializeToString())
    except OSError as err:
        raise ExportError(str(err)) from None
    return names


def check_onnx(path: str, exportable: Exportable, shape=(224, 224), runs: int = 0,
               seed: int = 0) -> dict:
    """Run ``path`` in onnxruntime (CPU) and ``exportable`` in PyTorch on one random input of
    ``shape``: ``outputs`` maps each name to ``(max abs difference, max abs PyTorch value)``;
    with ``runs`` > 0 also the median latencies ``onnxruntime_ms`` and ``pytorch_ms`` (runs
    interleaved, both with PyTorch's number of threads)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as PyTorch
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')  # no busy waits
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    x = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(seed))
    feed = {'input': x.numpy()}
    got = session.run(None, feed)
    names = [o.name for o in session.get_outputs()]
    with torch.inference_mode():
        ref = exportable(x)
    outputs = {}
    for name, a, b in zip(names, got, ref):
        if a.shape != tuple(b.shape):
            raise AssertionError(f'{name}: onnxruntime shape {a.shape} != PyTorch '
                                 f'{tuple(b.shape)}')
        outputs[name] = (float(abs(torch.from_numpy(a) - b).max()), float(b.abs().max()))
    result = dict(outputs=outputs)
    if runs:  # interleaved, after one warm-up round
        timed = dict(onnxruntime_ms=lambda: session.run(None, feed),
                     pytorch_ms=lambda: exportable(x))
        times = {key: [] for key in timed}
        with torch.inference_mode():
            for _ in range(runs + 1):
                for key, run in timed.items():
                    start = time.perf_counter()
                    run()
                    times[key].append(1000 * (time.perf_counter() - start))
        result.update({key: statistics.median(t[1:]) for key, t in times.items()})
    return result
