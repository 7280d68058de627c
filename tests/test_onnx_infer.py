"""tools/onnx_infer.py on bad input: one ``error:`` line naming the file, never a traceback,
never a control character of the file on the terminal. The models are small graphs built with
onnx's helper API, with the metadata tools/export_onnx.py writes."""
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import onnx_infer  # noqa: E402  (tools/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ('torch', 'torchvision', 'mmcv', 'mmdet', 'mmengine', 'mmseg', 'mmpretrain')
META = dict(producer='mmmetaformer', part='classifier', mean=[100.0, 110.0, 120.0],
            std=[50.0, 50.0, 50.0], bgr_to_rgb=True, resize=[dict(type='ResizeEdge', scale=32)],
            classes=['circle', 'square', 'triangle'])


def model(path, meta=None, input_name='input', shape=(1, 3, 'h', 'w'), extra=()):
    """A classifier (the mean of each input channel) or, with ``part='segmentor'``, a segmentor
    (the input itself: 3 classes), with ``meta`` as tools/export_onnx.py writes it (strings
    as they are, other values as JSON). ``extra``: more nodes, initializers and outputs."""
    meta = dict(META, **(meta or {}))
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(shape))
    if meta.get('part') == 'segmentor':
        nodes, outputs = [helper.make_node('Identity', [input_name], ['logits'])], [
            helper.make_tensor_value_info('logits', TensorProto.FLOAT, None)]
    else:
        axes = list(range(2, len(shape))) or [1]
        nodes = [helper.make_node('ReduceMean', [input_name], ['logits'], axes=axes, keepdims=0)]
        outputs = [helper.make_tensor_value_info('logits', TensorProto.FLOAT, None)]
    initializers = []
    for item in extra:
        {onnx.NodeProto: nodes, onnx.TensorProto: initializers,
         onnx.ValueInfoProto: outputs}[type(item)].append(item)
    graph = helper.make_graph(nodes, 'g', [x], outputs, initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])
    helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v)
                                   for k, v in meta.items() if v is not None})
    onnx.save(proto, str(path))
    return str(path)


def image(path, size=(40, 48), color=(30, 90, 200)):
    cv2.imwrite(str(path), np.full((*size, 3), color, np.uint8))
    return str(path)


def run(*args):
    """tools/onnx_infer.py in this process, drawing into ``out`` beside the model (the first
    argument): (exit status, the error line)."""
    out = ['--out-dir', str(Path(args[0]).parent / 'out')] if '--out-dir' not in args else []
    try:
        onnx_infer.main([str(a) for a in args] + out)
        return 0, None
    except SystemExit as exit:
        return 1, str(exit.code)


def refused(*args):
    status, line = run(*args)
    assert status == 1 and line.startswith('error: ') and '\n' not in line, line
    return line


def test_a_small_classifier_runs_without_torch(tmp_path):
    """The baseline: the numbers the graph computes, in a process where torch and the
    OpenMMLab packages cannot be imported."""
    path = image(tmp_path / 'x.png')
    code = ('import runpy, sys\n'
            f'sys.modules.update(dict.fromkeys({BLOCKED!r}))\n'
            f'sys.argv = ["tools/onnx_infer.py", *sys.argv[1:]]\n'
            'runpy.run_path("tools/onnx_infer.py", run_name="__main__")\n')
    proc = subprocess.run([sys.executable, '-c', code, model(tmp_path / 'm.onnx'), path,
                           '--out-dir', str(tmp_path / 'out')], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits = (np.array([200, 90, 30]) - np.array(META['mean'])) / 50  # RGB means, normalised
    probs = np.exp(logits) / np.exp(logits).sum()
    assert proc.stdout == f'{path}: circle ({probs[0]:.2f}) -> {tmp_path}/out/x.png\n'
    assert cv2.imread(str(tmp_path / 'out/x.png')).shape == (40, 48, 3)


@pytest.mark.parametrize('meta,expected', [
    (dict(part=None), 'holds no part in its metadata'),
    (dict(mean='[1,2'), 'has a metadata mean that is not 1 or 3 finite numbers in JSON'),
    (dict(std=[50, 0, 50]), 'has a metadata std that is not 1 or 3 positive numbers'),
    (dict(resize=[dict(type='Resize', scale=[200000, 200000])]),
     'has a metadata resize that is not a list of Resize, ResizeEdge and CenterCrop steps'),
    (dict(pad_size_divisor=0), 'has a metadata pad_size_divisor that is not an int from 1'),
    (dict(classes=[1, 2, 3]), 'has a metadata classes that is not a list of names'),
    (dict(mean='[' * 100000), 'has a metadata mean that is not'),
], ids=['no-part', 'mean-malformed', 'std-zero', 'resize-huge', 'divisor-zero', 'classes',
        'mean-deep'])
def test_bad_metadata_is_one_line(tmp_path, meta, expected):
    path = model(tmp_path / 'm.onnx', meta)
    assert refused(path, image(tmp_path / 'x.png')).startswith(f'error: {path} {expected}')


@pytest.mark.parametrize('name,shape', [('x', (1, 3, 'h', 'w')), ('input', (1, 3)),
                                        ('input', (1, 3, 100000, 100000)),
                                        ('input', (100000, 100000, 100))],
                         ids=['named-otherwise', 'rank-2', 'huge-fixed', 'rank-3-huge'])
def test_inputs_other_than_the_exports_are_one_line(tmp_path, name, shape):
    path = model(tmp_path / 'm.onnx', input_name=name, shape=shape)
    assert refused(path, image(tmp_path / 'x.png')).startswith(
        f'error: {path} does not take what tools/export_onnx.py gives a model: one float '
        'tensor named input, 1 x 3 x H x W')


def test_a_graph_that_allocates_too_much_is_one_line(tmp_path):
    """A graph whose ConstantOfShape declares a 1e5 x 1e5 x 100 tensor (4 TB): onnxruntime
    fails to allocate it."""
    extra = [numpy_helper.from_array(np.array([100000, 100000, 100], np.int64), 'shape'),
             helper.make_node('ConstantOfShape', ['shape'], ['big']),
             helper.make_tensor_value_info('big', TensorProto.FLOAT, [100000, 100000, 100])]
    path = model(tmp_path / 'm.onnx', extra=extra)
    picture = image(tmp_path / 'x.png')
    assert refused(path, picture).startswith(f'error: onnxruntime cannot run {path} on '
                                             f'{picture}: ')


def test_outputs_other_than_the_exports_are_one_line(tmp_path):
    """A 'detector' whose one output is a classifier's."""
    path = model(tmp_path / 'm.onnx', dict(part='detector'))
    assert refused(path, image(tmp_path / 'x.png')) == (
        f"error: {path} does not give what tools/export_onnx.py gives a detector (its outputs' "
        'shapes: (1, 3))')


def test_metadata_cannot_write_to_the_terminal(tmp_path):
    """A class name that would clear the line and print a forged error is shown escaped."""
    forged = '\x1b[2K\rerror: forged\n'
    path = model(tmp_path / 'm.onnx', dict(classes=[forged, 'b', 'c']))
    picture = image(tmp_path / 'x.png')
    proc = subprocess.run([sys.executable, 'tools/onnx_infer.py', path, picture, '--out-dir',
                           str(tmp_path / 'out')], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f'{picture}: \\x1b[2K\\rerror: forged\\n (')
    assert '\x1b' not in proc.stdout and '\r' not in proc.stdout
    assert proc.stdout.count('\n') == 1 and proc.stderr == ''


def test_images_drawn_to_one_name_are_refused(tmp_path):
    """a/x.png and b/x.jpg would both be drawn to out/x.png."""
    for folder in 'ab':
        (tmp_path / folder).mkdir()
    first, second = image(tmp_path / 'a/x.png'), image(tmp_path / 'b/x.jpg')
    assert refused(model(tmp_path / 'm.onnx'), first, second, '--out-dir', tmp_path / 'out') == (
        f'error: the images {first} and {second} would both be drawn to {tmp_path}/out/x.png, '
        'the second over the first; pass one folder at a time')
    assert not (tmp_path / 'out').exists()


def _cut_png(width, height):
    """A PNG header of ``width`` x ``height`` gray pixels, then a little data."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack(
            '>I', zlib.crc32(kind + data))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0,
                                                              0, 0, 0))
            + chunk(b'IDAT', zlib.compress(bytes(4 * (width + 1)))))


@pytest.mark.parametrize('content,expected', [
    (b'', 'the file is empty (0 bytes)'),
    (_cut_png(60000, 60000), 'it is a 60000x60000 PNG image, larger than OpenCV decodes')],
    ids=['empty', 'huge'])
def test_images_opencv_cannot_read_are_named(tmp_path, content, expected):
    path = tmp_path / 'x.png'
    path.write_bytes(content)
    assert refused(model(tmp_path / 'm.onnx'), path).startswith(
        f'error: cannot read image {path}: {expected}')


def test_an_image_resized_beyond_the_limits_is_named(tmp_path):
    """ResizeEdge of the short side to 32 on a 1 x 40000 image: 1.3 M x 32 pixels."""
    path = image(tmp_path / 'thin.png', size=(1, 40000))
    assert refused(model(tmp_path / 'm.onnx'), path).startswith(
        f'error: {path} would be resized to 1280000x32 pixels, outside what onnx_infer.py runs')


def test_a_segmentor_runs(tmp_path):
    """The identity 'segmentor': its label map drawn over the image."""
    path = model(tmp_path / 'm.onnx', dict(part='segmentor', resize=[]))
    assert run(path, image(tmp_path / 'x.png')) == (0, None)
    assert cv2.imread(str(tmp_path / 'out/x.png')).shape == (40, 48, 3)
