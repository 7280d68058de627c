"""ONNX export (mmmetaformer.deploy, tools/export_onnx.py) against onnxruntime: every family's
backbone exported once with dynamic axes and run at two sizes, a classifier, Semantic FPN and
UperNet segmentors (checked against mmseg's own whole-image inference), detector features and
RetinaNet's head maps, StarReLU folding in float64, the GroupNorm(1) forms, the preprocessing
in the metadata, the errors, and writes that fail (whole detectors: test_deploy_detector.py)."""
import copy
import json
import os
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

from mmmetaformer.deploy import (Exportable, build_exportable, check_onnx,  # noqa: E402
                                 export_forms, export_onnx, fold_star_relu)
from mmmetaformer.models import MetaFormer  # noqa: E402
from mmmetaformer.models.layers import GroupNorm1, StarReLU  # noqa: E402
from mmmetaformer.archs import FAMILIES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
import export_onnx as export_tool  # noqa: E402
import interpreter  # noqa: E402
from common import run_tool  # noqa: E402

SIZES = ((64, 64), (96, 128))
RTOL = 1e-4  # max |onnxruntime - PyTorch| relative to max |PyTorch| per output


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0):
    """Perturb the 1-D parameters (norm weights and biases, layer and res scales, StarReLU's
    scale and bias, conv and linear biases) away from their initial values."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad and param.dim() == 1:
            param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return model


def small(family: str) -> MetaFormer:
    """A family's network with fewer, narrower blocks (same layers), randomised."""
    arch = dict(FAMILIES[family], depths=(1, 1, 2, 1), dims=(32, 64, 96, 128))
    return randomize(MetaFormer(arch=arch)).eval()


def assert_parity(path, exportable, shape):
    result = check_onnx(str(path), exportable, shape)
    for name, (diff, scale) in result['outputs'].items():
        assert diff <= RTOL * scale, f'{name} at {shape}: {diff} vs max {scale}'
    return result


def op_types(path):
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize('family', list(FAMILIES))
def test_backbone_dynamic_sizes(family, tmp_path):
    exportable = Exportable(small(family), 'backbone')
    path = tmp_path / f'{family}.onnx'
    names = export_onnx(exportable, str(path), SIZES[0], dynamic=True)
    assert names == ['feat0', 'feat1', 'feat2', 'feat3']
    # RandFormer: exported at a 2x2 grid in stage 4, run at others and at its native 224x224
    for shape in SIZES + (((224, 224),) if family == 'randformer' else ()):
        assert_parity(path, exportable, shape)
    ops = op_types(path)  # GroupNorm(1) and LayerNorm: one LayerNormalization each
    assert 'LayerNormalization' in ops and not ops & {'InstanceNormalization', 'ReduceMean'}


@pytest.mark.parametrize('groupnorm', ['reducemean', 'instancenorm'])
def test_groupnorm_forms(groupnorm, tmp_path):
    exportable = Exportable(small('poolformer'), 'backbone')
    path = tmp_path / 'model.onnx'
    export_onnx(exportable, str(path), SIZES[0], dynamic=True, groupnorm=groupnorm)
    assert_parity(path, exportable, SIZES[1])
    ops = op_types(path)
    assert ('InstanceNormalization' in ops) == (groupnorm == 'instancenorm')
    assert ('ReduceMean' in ops) == (groupnorm == 'reducemean')


@pytest.mark.parametrize('family', ['convformer', 'poolformerv2'])
def test_starrelu_folding_is_exact(family):
    model = small(family).double()
    assert any(isinstance(m, StarReLU) and m.bias.abs() > 0.05 for m in model.modules())
    folded = fold_star_relu(copy.deepcopy(model))
    assert not any(isinstance(m, StarReLU) for m in folded.modules())
    forms = export_forms(model, 'reducemean')
    assert not any(isinstance(m, GroupNorm1) for m in forms.modules())
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        for ref, out, form in zip(model(x), folded(x), forms(x)):
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(form, ref, rtol=1e-10, atol=1e-10)


def test_classifier_with_checkpoint(tmp_path):
    config = str(ROOT / 'configs/imagenet/poolformer_s12_in1k.py')
    exportable, info = build_exportable(config)
    state = randomize(exportable.model).state_dict()
    torch.save(dict(state_dict=state), tmp_path / 'ckpt.pth')
    loaded, info = build_exportable(config, str(tmp_path / 'ckpt.pth'))
    assert info['part'] == 'classifier' and info['notes'] == []
    path = tmp_path / 'cls.onnx'
    assert export_onnx(loaded, str(path), SIZES[0], dynamic=True) == ['logits']
    for shape in SIZES:  # the weights were loaded: onnxruntime equals the model saved
        assert_parity(path, exportable, shape)


@pytest.mark.parametrize('config', ['configs/ade20k/fpn_randformer-s12_8xb4-40k_ade20k-512x512.py',
                                    'configs/demo/upernet_caformer-s18_ade20k_demo.py'])
@pytest.mark.slow
def test_segmentor_equals_mmseg_whole_inference(config, tmp_path):
    exportable, info = build_exportable(str(ROOT / config))
    assert info['part'] == 'segmentor'
    randomize(exportable.model)
    path = tmp_path / 'seg.onnx'
    assert export_onnx(exportable, str(path), SIZES[0], dynamic=True) == ['seg_logits']
    for shape in SIZES:
        assert_parity(path, exportable, shape)
        x = torch.randn(1, 3, *shape)
        meta = dict(img_shape=shape, ori_shape=shape, pad_shape=shape)
        with torch.no_grad():
            torch.testing.assert_close(exportable(x)[0],
                                       exportable.model.encode_decode(x, [meta]))


@pytest.mark.parametrize('config,part,outputs', [
    ('configs/demo/caformer_s18_maskrcnn_demo.py', 'features', [f'fpn{i}' for i in range(5)]),
    ('configs/coco/retinanet_poolformer-s12_fpn_1x_coco.py', 'dense_head',
     [f'{kind}{i}' for kind in ('cls_score', 'bbox_pred') for i in range(5)])])
def test_detector_parts(config, part, outputs, tmp_path):
    exportable, info = build_exportable(str(ROOT / config), part=part)
    assert info['part'] == part
    randomize(exportable.model)
    path = tmp_path / 'det.onnx'
    assert export_onnx(exportable, str(path), SIZES[0], dynamic=True) == outputs
    for shape in SIZES:
        assert_parity(path, exportable, shape)


def test_tool_check_and_errors(tmp_path, capsys):
    out = str(tmp_path / 'backbone.onnx')
    export_tool.main(['identityformer_s12', '--out', out, '--shape', '64', '64', '--check',
                      '--runs', '2'])
    printed = capsys.readouterr().out
    assert printed.count('max abs diff') == 4 and 'onnxruntime' in printed
    for argv, message in [
            (['no/such_config.py'], 'error: config not found: no/such_config.py'),
            (['identityformer_s12', str(tmp_path / 'missing.pth')],
             'error: checkpoint file not found'),
            ([str(ROOT / 'configs/caformer_s18_maskrcnn.py'), '--part', 'dense_head'],
             'error: '),
            (['identityformer_s12', '--opset', '13'], 'error: opset 13 < 14')]:
        with pytest.raises(SystemExit) as exc:
            run_tool(lambda: export_tool.main(argv + ['--out', out]))  # as on the command line
        assert str(exc.value.code).startswith(message) and '\n' not in str(exc.value.code)


@pytest.mark.parametrize('shape', [('0', '0'), ('-5', '-5'), ('100000', '100000')])
def test_tool_refuses_bad_shape(shape, tmp_path):
    out = tmp_path / 'model.onnx'
    with pytest.raises(SystemExit) as exc:
        run_tool(lambda: export_tool.main(['identityformer_s12', '--out', str(out),
                                           '--shape', *shape]))
    message = str(exc.value.code)
    assert message.startswith('error: --shape') and '\n' not in message
    assert not out.exists()


@pytest.mark.slow  # a child interpreter
def test_failed_write_keeps_the_old_file(tmp_path):
    """A write that fails half-way (a file size limit, as a full disk would) leaves the good
    file at the path untouched and no partial file beside it."""
    out = tmp_path / 'model.onnx'
    export_tool.main(['identityformer_s12', '--out', str(out), '--shape', '64', '64'])
    good = out.read_bytes()
    limit = len(good) // 4
    proc = interpreter.run(
        [str(ROOT / 'tools/export_onnx.py'), 'poolformer_s12', '--out', str(out), '--shape', '64',
         '64'], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300,
        rlimits=dict(RLIMIT_FSIZE=(limit, limit)))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith('error: ') and str(out) in proc.stderr
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.onnx']


@pytest.mark.parametrize('config', ['configs/imagenet/poolformer_s12_in1k.py',
                                    'configs/demo/upernet_caformer-s18_ade20k_demo.py'])
@pytest.mark.slow
def test_preprocessing_in_metadata(config, tmp_path):
    """The file carries the config's input normalisation, wherever the config keeps its data
    preprocessor (mmpretrain: top level; mmseg and mmdet: in the model)."""
    from mmengine.config import Config
    cfg = Config.fromfile(str(ROOT / config))
    preprocessor = cfg.get('data_preprocessor') or cfg.model.data_preprocessor
    out = tmp_path / 'model.onnx'
    export_tool.main([str(ROOT / config), '--out', str(out), '--shape', '64', '64'])
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    for key in ('mean', 'std'):
        assert json.loads(props[key]) == list(preprocessor[key])
