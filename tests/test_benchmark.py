"""tools/benchmark.py runs on a tiny input and writes the documented table and JSON fields
(no timings are checked), alone and inside a whole Mask R-CNN (--task maskrcnn), and with
--compile; and tools/gpu_check.py skips with one line without a GPU."""
import json
import os
from pathlib import Path

import pytest
import torch

import interpreter

pytestmark = pytest.mark.slow  # not in `make test-quick`

ROOT = Path(__file__).resolve().parents[1]
MODELS = ['caformer_s18', 'identityformer_s12']  # with a timm model, and ours only
MODES = ['forward', 'train']
REPEATS = 2
MACHINE_FIELDS = {'cpu', 'cores', 'usable_cores', 'threads', 'python', 'platform', 'torch', 'timm',
                  'cuda', 'cuda_device', 'memory_method'}
RECORD_FIELDS = {'task', 'model', 'size', 'mode', 'batch', 'device', 'dtype', 'channels_last',
                 'with_cp', 'timm_with_cp', 'ours_ms', 'timm_ms', 'ratio', 'ours_peak_mib',
                 'timm_peak_mib', 'mem_ratio', 'max_abs_diff', 'repeats', 'warmup',
                 'ours_samples_ms', 'timm_samples_ms', 'compiled_ms', 'compiled_ratio',
                 'compiled_first_s', 'compiled_peak_mib', 'compiled_max_abs_diff',
                 'compiled_samples_ms'}
TIMM_FIELDS = ('timm_ms', 'ratio', 'timm_peak_mib', 'mem_ratio', 'max_abs_diff',
               'timm_samples_ms')
COMPILED_FIELDS = ('compiled_ms', 'compiled_ratio', 'compiled_first_s', 'compiled_peak_mib',
                   'compiled_max_abs_diff', 'compiled_samples_ms')
HEADER = ['model', 'size', 'mode', 'ours', 'ms', 'timm', 'ms', 'ratio', 'ours', 'MiB', 'timm',
          'MiB', 'mem', 'ratio', 'max', 'diff']


def run_benchmark(out, *args):
    proc = interpreter.run(
        ['tools/benchmark.py', *args, '--batch', '1', '--repeats', str(REPEATS),
         '--device', 'cpu', '--threads', '1', '--json', str(out)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope='module')
def benchmark(tmp_path_factory):
    out = tmp_path_factory.mktemp('benchmark') / 'out.json'
    proc = run_benchmark(out, '--models', *MODELS, '--sizes', '64x64', '--warmup', '1')
    return proc.stdout, json.loads(out.read_text()), proc.stderr


def test_json_fields(benchmark):
    _, result, _ = benchmark
    assert MACHINE_FIELDS <= set(result['machine'])
    assert result['machine']['threads'] == 1 and result['machine']['cuda_device'] is None
    records = result['records']
    assert [(r['model'], r['size'], r['mode']) for r in records] == [
        (model, '64x64', mode) for model in MODELS for mode in MODES]
    for r in records:
        assert set(r) == RECORD_FIELDS
        assert (r['batch'], r['device'], r['dtype'], r['channels_last'], r['with_cp'],
                r['repeats']) == (1, 'cpu', 'fp32', False, False, REPEATS)
        assert isinstance(r['ours_ms'], float) and r['ours_ms'] > 0
        assert isinstance(r['ours_peak_mib'], float) and r['ours_peak_mib'] >= 0
        assert len(r['ours_samples_ms']) == REPEATS
        assert all(r[field] is None for field in COMPILED_FIELDS)  # no --compile


def test_ratios_against_timm(benchmark):
    _, result, _ = benchmark
    for r in result['records']:
        if r['model'] != 'caformer_s18':
            continue
        assert r['timm_ms'] > 0 and len(r['timm_samples_ms']) == REPEATS
        assert r['ratio'] == pytest.approx(r['ours_ms'] / r['timm_ms'], rel=1e-3)
        assert r['timm_peak_mib'] > 0
        assert r['mem_ratio'] == pytest.approx(r['ours_peak_mib'] / r['timm_peak_mib'], rel=1e-3)
        assert r['max_abs_diff'] < 1e-4  # same weights, same computation
        assert r['timm_with_cp'] is None


def test_ours_only_without_timm_model(benchmark):
    _, result, _ = benchmark
    records = [r for r in result['records'] if r['model'] == 'identityformer_s12']
    assert records and all(r[field] is None for r in records for field in TIMM_FIELDS)


def test_printed_table(benchmark):
    stdout, result, _ = benchmark
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('model'))
    assert lines[header].split() == HEADER
    rows = [line.split() for line in lines[header + 1:] if line.strip()]
    assert [row[:3] for row in rows] == [[r['model'], r['size'], r['mode']]
                                         for r in result['records']]
    assert all(row[4] == '-' for row in rows if row[0] == 'identityformer_s12')


def test_spread_warning_follows_the_samples(benchmark):
    """A case gets a warning exactly when its samples spread wider than max/min 1.3."""
    _, result, stderr = benchmark
    for r in result['records']:
        samples = [s for s in (r['ours_samples_ms'], r['timm_samples_ms']) if s]
        wide = any(max(s) / min(s) > 1.3 for s in samples)
        assert (f"warning: {r['model']} {r['size']} {r['mode']}: the samples spread" in stderr) \
            == wide


@pytest.mark.parametrize('ours,timm,wide', [([10, 12.9], [10, 10.5], None),
                                            ([10, 13.5], None, 'ours 1.35'),
                                            ([10, 11], [4, 10], 'timm 2.50')])
def test_spread_warning_names_the_limit_and_the_remedy(ours, timm, wide):
    import benchmark as tool
    record = dict(model='caformer_s18', size='224x224', mode='forward', ours_samples_ms=ours,
                  timm_samples_ms=timm)
    warning = tool.spread_warning(record)
    if wide is None:
        assert warning is None
    else:
        assert f'max/min {wide} > 1.3' in warning and '--repeats' in warning
        assert 'taskset' in warning


def test_detector_mode(tmp_path):
    """--task maskrcnn: the project's Mask R-CNN config with our backbone against the same model
    with mmpretrain's TIMMBackbone, one test forward and one training step each: the records
    carry the task, no memory figures, and backbone + FPN features equal (same weights)."""
    out = tmp_path / 'dense.json'
    proc = run_benchmark(out, '--task', 'maskrcnn', '--models', 'caformer_s18',
                         '--sizes', '64x96', '--warmup', '0')
    records = json.loads(out.read_text())['records']
    assert [(r['task'], r['model'], r['size'], r['mode']) for r in records] == [
        ('maskrcnn', 'caformer_s18', '64x96', mode) for mode in MODES]
    for r in records:
        assert set(r) == RECORD_FIELDS
        assert r['ours_ms'] > 0 and r['timm_ms'] > 0
        assert r['ratio'] == pytest.approx(r['ours_ms'] / r['timm_ms'], rel=1e-3)
        assert r['ours_peak_mib'] is None and r['timm_peak_mib'] is None
        assert r['max_abs_diff'] < 1e-3  # same network: FPN outputs of the two models
    assert '[1/1] caformer_s18 64x96 train:' in proc.stderr  # progress, before each measurement
    assert len([line for line in proc.stdout.splitlines() if line.startswith('caformer_s18')]) == 2


def test_compiled_side_by_side(capsys, one_thread):
    """--compile --compile-dynamic: ours under torch.compile (Dynamo only: backend eager) next
    to ours eager at two sizes, with the same outputs, in the records and in extra table
    columns (in this process: the tool's own process start is tested above)."""
    import benchmark as tool
    result = tool.run(tool.parse_args([
        '--models', 'identityformer_s12', '--sizes', '64x96', '96x128', '--modes', 'forward',
        '--batch', '1', '--repeats', str(REPEATS), '--warmup', '0', '--device', 'cpu',
        '--threads', '1', '--no-memory', '--compile', '--compile-backend', 'eager',
        '--compile-dynamic']))
    settings = result['settings']
    assert (settings['compile'], settings['compile_backend'], settings['compile_dynamic']) == (
        True, 'eager', True)
    records = result['records']
    assert [r['size'] for r in records] == ['64x96', '96x128']
    for r in records:
        assert set(r) == RECORD_FIELDS
        assert r['compiled_ms'] > 0 and len(r['compiled_samples_ms']) == REPEATS
        assert r['compiled_ratio'] == pytest.approx(r['compiled_ms'] / r['ours_ms'], rel=1e-3)
        assert r['compiled_first_s'] > 0 and r['compiled_peak_mib'] is None
        assert r['compiled_max_abs_diff'] < 1e-5  # the same computation
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('model'))
    assert lines[header].split() == HEADER + ['compiled', 'ms', 'vs', 'eager', 'first', 's',
                                              'comp', 'MiB', 'comp', 'diff']
    assert len(lines[header + 1].split()) == 10 + 5  # one cell per column


def test_gpu_check_skips_without_gpu():
    """No CUDA device: one line, exit status 0."""
    if torch.cuda.is_available():
        pytest.skip('a CUDA device is present')
    proc = interpreter.run(['tools/gpu_check.py'], cwd=ROOT, timeout=120,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0
    assert (proc.stdout + proc.stderr).strip().splitlines() == [proc.stdout.strip()]
    assert proc.stdout.startswith('gpu_check: skipped, no CUDA device')


def test_detector_pair_predicts_the_same():
    """In ``--task maskrcnn`` both models do the same work: the same detections from the same
    image. (timm's features come in channels_last strides, which mmcv's CPU RoIAlign misreads:
    uncorrected, the peer found no objects where ours found dozens.)"""
    import argparse
    import copy
    import benchmark as tool
    models = tool.build_dense_pair(argparse.Namespace(task='maskrcnn', channels_last=False,
                                                      compile=False),
                                   'caformer_s18', torch.device('cpu'))
    batch = tool.dense_batch('maskrcnn', (320, 320), 1)
    found = {}
    for name, model in models.items():
        model.eval()
        with torch.inference_mode():
            data = model.data_preprocessor(copy.deepcopy(batch), False)
            found[name] = [sample.pred_instances for sample in model(**data, mode='predict')]
    for ours, peer in zip(found['ours'], found['timm']):
        assert len(ours) > 0 and len(peer) == len(ours)
        torch.testing.assert_close(peer.scores, ours.scores, atol=1e-4, rtol=0)
