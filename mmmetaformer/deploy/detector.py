"""Whole mmdet detectors as one graph of standard ONNX ops: one preprocessed image (1 x 3 x H x
W) to mmdeploy's outputs ``dets`` (1 x N x 5: x1, y1, x2, y2, score in input pixels),
``labels`` (1 x N, int64) and, with a mask head, ``masks`` (1 x N x H x W, probabilities).

The post-processing of mmdet's ``predict(rescale=False)`` is written again here with shapes
taken from the input inside the graph: per-level ``TopK`` (``nms_pre``), box decoding clipped
to the input, ``NonMaxSuppression`` (``score_thr``, ``iou_threshold``, ``max_per_img``;
class-wise, and level-wise for the RPN, by mmcv's coordinate offsets), ``RoiAlign``
(``half_pixel`` for ``aligned=True``) on every level with the RoIs of each level selected
afterwards (valid when a level has none), and masks pasted by ``GridSample`` as mmdet's
``_do_paste_mask``. The detector's own modules compute everything else.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms, roi_align


class ExportError(ValueError):
    """A config, part or option that cannot be exported."""


#: opset of RoiAlign's half_pixel mode and of GridSample
DETECTOR_MIN_OPSET = 16


class _NMS(torch.autograd.Function):
    """Indices of the boxes NMS keeps among those scoring above ``score_thr`` (``None``: all),
    at most ``max_num``, best first: one ONNX ``NonMaxSuppression``."""

    @staticmethod
    def forward(ctx, boxes, scores, iou_thr: float, score_thr, max_num: int):
        candidates = torch.arange(len(scores)) if score_thr is None else \
            torch.nonzero(scores > score_thr).squeeze(1)
        keep = nms(boxes[candidates], scores[candidates], iou_thr)
        return candidates[keep][:max_num]

    @staticmethod
    def symbolic(g, boxes, scores, iou_thr: float, score_thr, max_num: int):
        def const(value, dtype):
            return g.op('Constant', value_t=torch.tensor(value, dtype=dtype).reshape(-1))

        inputs = [g.op('Unsqueeze', boxes, const(0, torch.int64)),
                  g.op('Unsqueeze', scores, const([0, 1], torch.int64)),
                  const(max_num, torch.int64), const(iou_thr, torch.float32)]
        if score_thr is not None:
            inputs.append(const(score_thr, torch.float32))
        selected = g.op('NonMaxSuppression', *inputs)  # rows (batch, class, box)
        index = g.op('Gather', selected, const(2, torch.int64), axis_i=1)
        return g.op('Squeeze', index, const(1, torch.int64))


def _input_size(x):
    """(height, width) of the input as a float tensor, from the graph's input shape."""
    return torch._shape_as_tensor(x)[2:].to(torch.float32)


def _batched_nms(boxes, scores, groups, image_hw, iou_thr, score_thr, max_num):
    """NMS within each group (class or level): boxes of different groups are moved apart by
    ``group * (max(H, W) + 1)``, as mmcv's ``batched_nms`` does with the largest coordinate
    (the boxes are clipped to the input, and the bound holds with no box at all)."""
    offsets = groups.to(boxes) * (image_hw.max() + 1)
    return _NMS.apply(boxes + offsets[:, None], scores, iou_thr, score_thr, max_num)


def _topk(scores, k: int):
    """The ``k`` best of 1-D ``scores`` (all of them if fewer; the count is taken in the graph)
    and their indices."""
    k = torch.clamp(torch._shape_as_tensor(scores)[0], max=k)
    return scores.topk(k)


def _decode(coder, priors, deltas, image_hw):
    """mmdet's ``delta2bbox`` with the clipping to the input done from the graph's shape."""
    from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder
    from mmdet.models.task_modules.coders.delta_xywh_bbox_coder import delta2bbox
    if type(coder) is not DeltaXYWHBBoxCoder:
        raise ExportError(f'box coder {type(coder).__name__}: only DeltaXYWHBBoxCoder exports')
    boxes = delta2bbox(priors, deltas, coder.means, coder.stds, None, 16 / 1000, False,
                       coder.add_ctr_clamp, coder.ctr_clamp)
    if not coder.clip_border:
        return boxes
    limits = image_hw[[1, 0]].repeat(boxes.shape[1] // 2)  # W, H, W, H, ...
    return torch.minimum(boxes.clamp(min=0), limits)


def _keep_large(boxes, *others, min_size=-1):
    """Drop boxes not wider and taller than ``min_size`` (mmdet: when ``min_size >= 0``)."""
    if min_size < 0:
        return (boxes, *others)
    valid = ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)
    return tuple(t[valid] for t in (boxes, *others))


def _nms_iou(cfg) -> float:
    if cfg.nms.get('type', 'nms') != 'nms':
        raise ExportError(f"NMS type {cfg.nms['type']!r}: only plain 'nms' exports")
    return cfg.nms.iou_threshold


def _priors(head, cls_scores):
    return head.prior_generator.grid_priors([s.shape[-2:] for s in cls_scores],
                                            dtype=cls_scores[0].dtype,
                                            device=cls_scores[0].device)


def _rpn_proposals(rpn_head, feats, image_hw):
    """mmdet's ``RPNHead.predict``: the top ``nms_pre`` anchors per level, decoded, small boxes
    dropped, NMS per level, at most ``max_per_img``."""
    cfg = rpn_head.test_cfg
    if not rpn_head.use_sigmoid_cls:
        raise ExportError('RPN with softmax scores: only sigmoid RPN heads export')
    cls_scores, bbox_preds = rpn_head(feats)
    boxes, scores, levels = [], [], []
    for level, (cls, reg, priors) in enumerate(zip(cls_scores, bbox_preds,
                                                    _priors(rpn_head, cls_scores))):
        score, keep = _topk(cls[0].permute(1, 2, 0).reshape(-1).sigmoid(), cfg.nms_pre)
        deltas = reg[0].permute(1, 2, 0).reshape(-1, 4)[keep]
        boxes.append(_decode(rpn_head.bbox_coder, priors[keep], deltas, image_hw))
        scores.append(score)
        levels.append(torch.full_like(keep, level))
    boxes, scores, levels = _keep_large(torch.cat(boxes), torch.cat(scores), torch.cat(levels),
                                        min_size=cfg.get('min_bbox_size', -1))
    keep = _batched_nms(boxes, scores, levels, image_hw, _nms_iou(cfg), None, cfg.max_per_img)
    return boxes[keep]


def _roi_features(extractor, feats, rois):
    """mmdet's ``SingleRoIExtractor``: each RoI pooled from its level (``map_roi_levels``), as
    RoIAlign of all RoIs on every level, then a per-RoI selection of its level."""
    feats = feats[:extractor.num_inputs]
    levels = extractor.map_roi_levels(rois, len(feats))
    out = 0
    for level, (feat, layer) in enumerate(zip(feats, extractor.roi_layers)):
        if getattr(layer, 'pool_mode', 'avg') != 'avg':
            raise ExportError('RoIAlign pool_mode max: only avg exports')
        pooled = roi_align(feat, rois, layer.output_size, layer.spatial_scale,
                           layer.sampling_ratio, layer.aligned)
        out = out + pooled * (levels == level).to(pooled)[:, None, None, None]
    return out


def _rcnn_detections(bbox_head, rois, cls_score, bbox_pred, image_hw, cfg):
    """mmdet's ``BBoxHead.predict_by_feat`` and ``multiclass_nms``: softmax scores, boxes
    decoded per class, class-wise NMS above ``score_thr``, at most ``max_per_img``."""
    if bbox_head.custom_cls_channels:
        raise ExportError(f'{type(bbox_head.loss_cls).__name__}: only softmax box heads export')
    scores = F.softmax(cls_score, dim=-1)[:, :-1]
    boxes = _decode(bbox_head.bbox_coder, rois[:, 1:], bbox_pred, image_hw)
    if bbox_head.reg_class_agnostic:
        boxes = boxes.repeat(1, scores.shape[1])
    labels = torch.arange(scores.shape[1]).expand_as(scores).reshape(-1)
    boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
    keep = _batched_nms(boxes, scores, labels, image_hw, _nms_iou(cfg), cfg.score_thr,
                        cfg.max_per_img)
    return boxes[keep], scores[keep], labels[keep]


def _to_rois(boxes):
    return torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1)


def _class_masks(mask_head, mask_feats, labels):
    """Each RoI's mask probabilities (N x h x w) of its class."""
    probs = mask_head(mask_feats).sigmoid()
    if mask_head.class_agnostic:
        return probs[:, 0]
    index = labels[:, None, None, None].expand(-1, 1, probs.shape[2], probs.shape[3])
    return probs.gather(1, index)[:, 0]


def _paste_masks(masks, boxes, image_hw):
    """mmdet's ``_do_paste_mask``: each N x h x w mask sampled bilinearly into its box on the
    H x W input (zero outside)."""
    x0, y0, x1, y1 = boxes.split(1, dim=1)
    ys = torch.arange(image_hw[0].to(torch.int64)).to(boxes) + 0.5
    xs = torch.arange(image_hw[1].to(torch.int64)).to(boxes) + 0.5
    ys = (ys - y0) / (y1 - y0) * 2 - 1
    xs = (xs - x0) / (x1 - x0) * 2 - 1
    ys = torch.where(torch.isinf(ys), torch.zeros_like(ys), ys)
    xs = torch.where(torch.isinf(xs), torch.zeros_like(xs), xs)
    size = (xs.shape[0], ys.shape[1], xs.shape[1])
    grid = torch.stack([xs[:, None, :].expand(size), ys[:, :, None].expand(size)], dim=3)
    return F.grid_sample(masks[:, None], grid, align_corners=False)[:, 0]


class DetectorGraph(nn.Module):
    """An mmdet two-stage detector (RPN + ``StandardRoIHead`` or ``CascadeRoIHead``, with or
    without masks) or single-stage anchor-head detector (RetinaNet) as one image ->
    ``(dets, labels[, masks])``, as ``predict(rescale=False)`` with the image's size as its
    ``img_shape``."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        from mmdet.models.dense_heads import AnchorHead
        from mmdet.models.detectors import SingleStageDetector, TwoStageDetector
        from mmdet.models.roi_heads import CascadeRoIHead, StandardRoIHead
        self.detector = detector
        if isinstance(detector, TwoStageDetector):
            head = detector.roi_head
            if type(head) not in (StandardRoIHead, CascadeRoIHead):
                raise ExportError(f'{type(head).__name__}: only StandardRoIHead and '
                                  'CascadeRoIHead export whole')
            self.with_mask = head.with_mask
        elif isinstance(detector, SingleStageDetector):
            if not isinstance(detector.bbox_head, AnchorHead) or \
                    not detector.bbox_head.use_sigmoid_cls:
                raise ExportError(f'{type(detector.bbox_head).__name__}: only anchor heads '
                                  'with sigmoid scores (RetinaNet) export whole')
            self.with_mask = False
        else:
            raise ExportError(f'{type(detector).__name__}: not a two-stage or single-stage '
                              'detector')

    def output_names(self):
        return ['dets', 'labels'] + (['masks'] if self.with_mask else [])

    def forward(self, x):
        image_hw = _input_size(x)
        feats = self.detector.extract_feat(x)
        if hasattr(self.detector, 'roi_head'):
            outputs = self._two_stage(feats, image_hw)
        else:
            outputs = self._single_stage(feats, image_hw)
        boxes, scores, labels = outputs[:3]
        dets = torch.cat([boxes, scores[:, None]], dim=1)
        return (dets[None], labels[None]) + tuple(t[None] for t in outputs[3:])

    def _single_stage(self, feats, image_hw):
        """mmdet's ``BaseDenseHead.predict_by_feat``: per level the top ``nms_pre`` (anchor,
        class) scores, decoded; class-wise NMS above ``score_thr``."""
        head = self.detector.bbox_head
        cfg = head.test_cfg
        cls_scores, bbox_preds = head(feats)
        boxes, scores, labels = [], [], []
        for cls, reg, priors in zip(cls_scores, bbox_preds, _priors(head, cls_scores)):
            score, index = _topk(cls[0].permute(1, 2, 0).reshape(-1).sigmoid(),
                                 cfg.get('nms_pre', -1) if cfg.get('nms_pre', -1) > 0
                                 else torch.iinfo(torch.int64).max)
            anchor = torch.div(index, head.cls_out_channels, rounding_mode='floor')
            deltas = reg[0].permute(1, 2, 0).reshape(-1, 4)[anchor]
            boxes.append(_decode(head.bbox_coder, priors[anchor], deltas, image_hw))
            scores.append(score)
            labels.append(index % head.cls_out_channels)
        boxes, scores, labels = _keep_large(torch.cat(boxes), torch.cat(scores),
                                            torch.cat(labels),
                                            min_size=cfg.get('min_bbox_size', -1))
        keep = _batched_nms(boxes, scores, labels, image_hw, _nms_iou(cfg), cfg.score_thr,
                            cfg.max_per_img)
        return boxes[keep], scores[keep], labels[keep]

    def _two_stage(self, feats, image_hw):
        """mmdet's ``StandardRoIHead.predict`` / ``CascadeRoIHead.predict``: cascade stages
        refine the RoIs by the class each stage scores best and average the stages' class
        scores; the masks of all stages are averaged."""
        head = self.detector.roi_head
        rois = _to_rois(_rpn_proposals(self.detector.rpn_head, feats, image_hw))
        cascade = hasattr(head, 'num_stages')
        stages = range(head.num_stages) if cascade else [None]

        def part(module, stage):
            return module if stage is None else module[stage]

        cls_scores = []
        for stage in stages:
            bbox_head = part(head.bbox_head, stage)
            roi_feats = _roi_features(part(head.bbox_roi_extractor, stage), feats, rois)
            cls_score, bbox_pred = bbox_head(roi_feats)
            cls_scores.append(cls_score)
            if cascade and stage < head.num_stages - 1:
                label = cls_score[:, :-1].argmax(dim=1)
                if not bbox_head.reg_class_agnostic:
                    index = (label * 4)[:, None] + torch.arange(4)
                    bbox_pred = bbox_pred.gather(1, index)
                rois = _to_rois(_decode(bbox_head.bbox_coder, rois[:, 1:], bbox_pred,
                                        image_hw))
        cls_score = sum(cls_scores) / len(cls_scores)
        boxes, scores, labels = _rcnn_detections(bbox_head, rois, cls_score, bbox_pred,
                                                 image_hw, head.test_cfg)
        if not self.with_mask:
            return boxes, scores, labels
        masks = 0
        for stage in stages:
            mask_feats = _roi_features(part(head.mask_roi_extractor, stage), feats,
                                       _to_rois(boxes))
            masks = masks + _class_masks(part(head.mask_head, stage), mask_feats, labels)
        masks = _paste_masks(masks / len(stages), boxes, image_hw)
        return boxes, scores, labels, masks


# --- parity with mmdet ---------------------------------------------------------------------

#: ``--check`` criteria: every PyTorch detection scoring at least ``REF_SCORE`` has an ONNX twin
#: of its label with box IoU >= ``BOX_IOU``, score within ``SCORE_DIFF`` and mask IoU >=
#: ``MASK_IOU``; no ONNX detection scoring at least ``EXTRA_SCORE`` lacks a PyTorch one.
REF_SCORE, BOX_IOU, SCORE_DIFF, MASK_IOU, EXTRA_SCORE = 0.3, 0.9, 0.05, 0.85, 0.5


def preprocess_images(detector, cfg, paths, shape=None):
    """``(path, 1 x 3 x H x W tensor, metainfo)`` per image: the config's test pipeline
    (without annotations) and the detector's data preprocessor, then, with ``shape``, zeros
    (mmdet's padding after normalisation) to the bottom and right up to that size."""
    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg
    pipeline = Compose([step for step in get_test_pipeline_cfg(cfg)
                        if step['type'].split('.')[-1] != 'LoadAnnotations'])
    for path in paths:
        data = pipeline(dict(img_path=path, img_id=0))
        sample = data['data_samples']
        x = detector.data_preprocessor(dict(inputs=[data['inputs']],
                                            data_samples=[sample]))['inputs']
        if shape is not None:
            h, w = x.shape[2:]
            if h > shape[0] or w > shape[1]:
                raise ExportError(f'{path}: preprocessed to {h} x {w}, larger than the '
                                  f'exported input {shape[0]} x {shape[1]} (export with '
                                  '--dynamic, or a --shape that holds it)')
            x = F.pad(x, (0, shape[1] - w, 0, shape[0] - h))
        yield path, x, sample.metainfo


@torch.no_grad()
def mmdet_predict(detector, x) -> dict:
    """mmdet's ``predict(rescale=False)`` of one preprocessed image whose ``img_shape`` is its
    whole size, as numpy ``boxes``, ``scores``, ``labels`` and binary ``masks``."""
    from mmdet.structures import DetDataSample
    size = tuple(x.shape[2:])
    sample = DetDataSample(metainfo=dict(img_shape=size, ori_shape=size, pad_shape=size,
                                         batch_input_shape=size, scale_factor=(1.0, 1.0)))
    pred = detector.predict(x, [sample], rescale=False)[0].pred_instances
    out = dict(boxes=pred.bboxes.numpy(), scores=pred.scores.numpy(),
               labels=pred.labels.numpy())
    if 'masks' in pred:
        out['masks'] = pred.masks.numpy().astype(bool)
    return out


def onnx_detections(outputs, mask_thr: float = 0.5) -> dict:
    """The graph's ``dets``, ``labels`` (and ``masks``, binarised at ``mask_thr`` as mmdet
    does) as numpy ``boxes``, ``scores``, ``labels`` and ``masks``."""
    dets, labels = outputs[0][0], outputs[1][0]
    out = dict(boxes=dets[:, :4], scores=dets[:, 4], labels=labels)
    if len(outputs) > 2:
        out['masks'] = outputs[2][0] >= mask_thr
    return out


def box_iou(a, b):
    """IoU matrix of boxes ``a`` (N x 4) and ``b`` (M x 4), x1 y1 x2 y2."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a, area_b = np.prod(a[:, 2:] - a[:, :2], 1), np.prod(b[:, 2:] - b[:, :2], 1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-9)


def compare_detections(ref: dict, got: dict) -> dict:
    """Match ``got`` (ONNX) to ``ref`` (PyTorch) by :data:`REF_SCORE` ... :data:`EXTRA_SCORE`:
    ``reference`` (PyTorch detections to match), ``matched``, the worst ``box_iou``,
    ``score_diff`` and ``mask_iou`` over the pairs of best IoU, ``extra`` and ``ok``."""
    ious = box_iou(ref['boxes'], got['boxes'])
    ious[ref['labels'][:, None] != got['labels'][None]] = 0
    worst = dict(box_iou=1.0, score_diff=0.0, mask_iou=1.0)
    used, matched = set(), 0
    wanted = [i for i in np.argsort(-ref['scores']) if ref['scores'][i] >= REF_SCORE]
    for i in wanted:
        free = [j for j in np.argsort(-ious[i]) if j not in used and ious[i, j] > 0]
        if not free:
            worst['box_iou'] = 0.0
            continue
        j = free[0]
        pair = dict(box_iou=ious[i, j], score_diff=abs(ref['scores'][i] - got['scores'][j]))
        if 'masks' in ref:
            a, b = ref['masks'][i], got['masks'][j]
            union = (a | b).sum()  # two empty masks agree
            pair['mask_iou'] = (a & b).sum() / union if union else 1.0
        for key, value in pair.items():
            worst[key] = float(max(worst[key], value) if key == 'score_diff'
                               else min(worst[key], value))
        if (pair['box_iou'] >= BOX_IOU and pair['score_diff'] <= SCORE_DIFF
                and pair.get('mask_iou', 1.0) >= MASK_IOU):
            used.add(j)
            matched += 1
    extra = int(sum(got['scores'][j] >= EXTRA_SCORE and not (ious[:, j] >= BOX_IOU).any()
                    for j in range(len(got['scores']))))
    return dict(reference=len(wanted), matched=matched, extra=extra,
                ok=matched == len(wanted) and extra == 0, **worst)
