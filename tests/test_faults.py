"""Faults that must not cost a run or half-load a model: a kill during a save, damaged
checkpoints, tensors that cannot load as they are, bad locations and arguments."""
import functools
import http.server
import os
import pickle
import re
import socket
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from mmengine.runner import CheckpointLoader

import interpreter
from mmmetaformer.checkpoints import load_backbone_checkpoint
from mmmetaformer.models import PoolFormerV2, RandFormer
from mmmetaformer.models.mixers import RandomMixing, resample_mixing_matrix
from mmmetaformer.sources import read_checkpoint
from mmmetaformer.trust import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from tiny_run import log_of as _log  # noqa: E402
from tiny_run import tiny_runner as _runner  # noqa: E402

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))


class _RunsCode:
    """Unpickling this calls ``open(marker, 'w')``: stands for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')

# A tiny run that checkpoints every iteration keeping one file; the save of iteration 2
# writes half of the file, says so with a marker file and waits to be killed.
STALLING_RUN = '''
import os, sys, time
sys.path.insert(0, {tests!r})
import mmmetaformer.engine.hooks as hooks
import mmmetaformer.fileio as fileio
from tiny_run import tiny_runner
real_write = fileio.write_bytes


def write_bytes(path, data):
    if os.path.basename(path) == 'iter_2.pth':
        with fileio.replacing(path, 'wb') as f:
            f.write(data[:len(data) // 2])
            f.flush()
            open({marker!r}, 'w').close()
            time.sleep(600)
    return real_write(path, data)


hooks.write_bytes = write_bytes  # what the file backend of the checkpoint hook calls
tiny_runner({work_dir!r}, 4, default_hooks=dict(checkpoint=dict(
    type='mmmetaformer.SafeCheckpointHook', interval=1, by_epoch=False,
    max_keep_ckpts=1))).train()
'''


# --- 5: saves and resume -----------------------------------------------------------------------

@pytest.mark.slow  # a child interpreter
def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    work, marker = tmp_path / 'work', tmp_path / 'saving'
    script = STALLING_RUN.format(tests=str(Path(__file__).parent), marker=str(marker),
                                 work_dir=str(work))
    child = interpreter.start(['-c', script], env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert child.poll() is None, child.stderr[-2000:]
            assert time.time() < deadline, 'the run never reached its second save'
            time.sleep(0.1)
    finally:
        child.kill()  # SIGKILL
        child.wait()
    assert (work / 'iter_1.pth').is_file() and not (work / 'iter_2.pth').exists()
    runner = _runner(work, 4, resume=True, default_hooks=dict(checkpoint=dict(
        type='mmmetaformer.SafeCheckpointHook', interval=1, by_epoch=False, max_keep_ckpts=1)))
    runner.train()
    assert runner.iter == 4 and 'resumed epoch: 0, iter: 1' in _log(work)
    assert [p.name for p in work.glob('*.pth')] == ['iter_4.pth']
    assert not list(work.glob('.*.tmp'))  # the killed save's temporary file is gone too


@pytest.fixture
def two_checkpoints(tmp_path):
    """A work dir with iter_1.pth and iter_2.pth, the latest truncated."""
    work = tmp_path / 'work'
    _runner(work, 2, default_hooks=dict(checkpoint=dict(
        type='mmmetaformer.SafeCheckpointHook', interval=1, by_epoch=False))).train()
    latest = work / 'iter_2.pth'
    latest.write_bytes(latest.read_bytes()[:latest.stat().st_size // 2])
    return work


def test_resume_skips_a_damaged_latest_checkpoint(two_checkpoints):
    runner = _runner(two_checkpoints, 3, resume=True)
    runner.train()
    assert runner.iter == 3
    log = _log(two_checkpoints)
    assert 'resumed epoch: 0, iter: 1' in log
    assert (f"The latest checkpoint {two_checkpoints / 'iter_2.pth'} is incomplete or damaged"
            in log and f"resuming from {two_checkpoints / 'iter_1.pth'}" in log)


def test_resume_from_a_damaged_file_names_the_intact_ones(two_checkpoints):
    latest = two_checkpoints / 'iter_2.pth'
    with pytest.raises(CheckpointError) as err:
        _runner(two_checkpoints, 3, resume=True, load_from=str(latest)).train()
    message = str(err.value)
    assert '\n' not in message and message.startswith(f'cannot resume from {latest}: it is '
                                                      'incomplete or damaged')
    assert message.endswith(f"newest first: {two_checkpoints / 'iter_1.pth'}")
    (two_checkpoints / 'iter_1.pth').unlink()
    with pytest.raises(CheckpointError, match='holds no intact checkpoint'):
        _runner(two_checkpoints, 3, resume=True).train()


# --- 4: tensors that cannot load as they are ------------------------------------------------

def _state():
    return {k: v.clone() for k, v in PoolFormerV2(arch=TINY).state_dict().items()}


def _spoil_nonfinite(state):
    state['stages.1.blocks.0.mlp.fc1.weight'][0, :3] = float('nan')
    state['stages.3.blocks.0.norm2.weight'][-1] = float('inf')
    return 'NaN/Inf values in 2 tensors: stages.1.blocks.0.mlp.fc1.weight (3 of '


@pytest.mark.parametrize('spoil', [
    _spoil_nonfinite,
    lambda s: s.update(**{'stem.conv.bias': s['stem.conv.bias'].long()}) or
    'stem.conv.bias: integer values (torch.int64) where float values belong',
    lambda s: s.update(**{'stages.3.blocks.0.norm2.weight': s['stages.3.blocks.0.norm2.weight']
                          > 0}) or 'norm2.weight: bool values',
    lambda s: s.update(**{'stages.3.blocks.0.mlp.fc2.weight': s[
        'stages.3.blocks.0.mlp.fc2.weight'].to_sparse()}) or 'a torch.sparse_coo tensor',
    lambda s: s.update(**{'stages.3.blocks.0.mlp.fc2.weight': torch.empty(
        s['stages.3.blocks.0.mlp.fc2.weight'].shape, device='meta')}) or 'tensor on meta'],
    ids=['nonfinite', 'int64', 'bool', 'sparse', 'meta'])
def test_bad_tensors_are_refused_before_any_is_copied(spoil, tmp_path):
    state = _state()
    expected = spoil(state)
    model = PoolFormerV2(arch=TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match='Nothing was loaded') as err:
        model.load_state_dict(state)  # the backbone's load hook checks a state dict
    assert expected in str(err.value)
    path = tmp_path / 'spoiled.pth'
    torch.save(state, path)
    model.init_cfg = dict(type='Pretrained', checkpoint=str(path))
    with pytest.raises(CheckpointError, match=f'{re.escape(str(path))} .*holds tensors that '
                       'cannot be loaded'):
        model.init_weights()
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())


def test_converter_writes_nothing_it_would_refuse(tmp_path):
    from test_checkpoints import convert_tool, source
    state = dict(source('poolformerv2_s12')[1])
    state['stages.0.blocks.0.mlp.fc1.weight'] = state['stages.0.blocks.0.mlp.fc1.weight'] * \
        float('nan')
    torch.save(state, tmp_path / 'poolformerv2_s12.pth')
    with pytest.raises(CheckpointError, match='NaN/Inf values in 1 tensors'):
        convert_tool.convert(str(tmp_path / 'poolformerv2_s12.pth'), str(tmp_path / 'out.pth'),
                             'poolformerv2_s12')
    assert not (tmp_path / 'out.pth').exists()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_files_load(dtype):
    state = {k: v.to(dtype) for k, v in _state().items()}
    model = PoolFormerV2(arch=TINY)
    model.load_state_dict(state)
    assert all(v.equal(state[k].float()) for k, v in model.state_dict().items())


# --- 6: locations ------------------------------------------------------------------------------

@pytest.mark.parametrize('scheme', ['ftp', 'hf'])
def test_unsupported_schemes_are_named(scheme):
    with pytest.raises(CheckpointError, match=f'{scheme}:// is not a supported location; use a '
                       'local path or one of http://, https://, timm://'):
        read_checkpoint(f'{scheme}://host/dir/model.pth')


@pytest.fixture
def served(tmp_path, monkeypatch):
    """(folder, its http:// URL): a local web server; torch's hub cache in tmp_path/hub."""
    folder = tmp_path / 'served'
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    monkeypatch.setattr(http.server.SimpleHTTPRequestHandler, 'log_message', lambda *a: None)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f'http://127.0.0.1:{server.server_port}'
    server.shutdown()


def test_url_cache_is_keyed_by_the_whole_url(served, tmp_path):
    folder, url = served
    states = {}
    for name in ('a', 'b'):
        (folder / name).mkdir()
        states[name] = _state()
        torch.save(dict(state_dict=states[name]), folder / name / 'model.pth')
    for name in ('a', 'b', 'a'):
        model = PoolFormerV2(arch=TINY)
        load_backbone_checkpoint(model, f'{url}/{name}/model.pth')
        assert all(v.equal(states[name][k]) for k, v in model.state_dict().items())
        loaded = CheckpointLoader.load_checkpoint(f'{url}/{name}/model.pth')  # load_from
        assert all(v.equal(states[name][k]) for k, v in loaded['state_dict'].items())
    assert len(list((tmp_path / 'hub' / 'checkpoints').iterdir())) == 2


def test_urls_in_load_from_run_no_code(served, tmp_path):
    """mmengine reads http(s) URLs with torch.hub, which defaults to weights_only=False."""
    folder, url = served
    marker = tmp_path / 'pwned'
    torch.save(dict(state_dict=_state(), extra=_RunsCode(marker)), folder / 'evil.pth')
    with pytest.raises(pickle.UnpicklingError, match='refused to load'):
        CheckpointLoader.load_checkpoint(f'{url}/evil.pth')
    assert not marker.exists()


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]  # nothing listens there
    monkeypatch.setattr(hf, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(hf, 'ENDPOINT', f'http://127.0.0.1:{port}')
    monkeypatch.setattr(hf, 'HF_HUB_CACHE', str(tmp_path / 'hf'))
    start = time.time()
    with pytest.raises(CheckpointError, match=r'cannot fetch timm://caformer_s18.sail_in1k .*'
                       'is out of reach and it is not in the local cache'):
        read_checkpoint('timm://caformer_s18.sail_in1k')
    assert time.time() - start < 5


# --- 6: arguments and the RandFormer cache -----------------------------------------------------

@pytest.mark.parametrize('kwargs,message', [
    (dict(out_indices=(-5, )), r'out_indices must be .* \(-4 to 3\), got \(-5,\)'),
    (dict(arch=dict(TINY, depths=(1, -1, 1, 1))), r'depths must be positive integers'),
    (dict(arch=dict(TINY, dims=(8, 0, 8, 8))), r'dims must be positive integers'),
    (dict(drop_path_rate=1.5), r'drop_path_rate must be in \[0, 1\), got 1.5'),
    (dict(drop_path_rate=-0.1), r'drop_path_rate must be in \[0, 1\)')])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoolFormerV2(**{'arch': TINY, **kwargs})
    assert PoolFormerV2(arch=TINY, out_indices=(-4, -1)).out_indices == (0, 3)


def test_random_mixing_cache_is_bounded_by_memory(monkeypatch):
    """Four grids of a RandFormer's third stage; the cache budget is set to 64 MiB here."""
    monkeypatch.setattr(RandomMixing, 'cache_bytes', 64 * 2**20)
    model = RandFormer(arch=dict(TINY, depths=(1, 1, 3, 1))).eval()
    for size in [(640, 640), (768, 768), (896, 896), (1024, 1024)]:  # 40x40 ... 64x64 tokens
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            model(x)
        cached = sum(m.nbytes for m in RandomMixing._cache.values())
        assert 0 < cached <= RandomMixing.cache_bytes
    mixer = model.stages[2].blocks[0].token_mixer
    x = torch.randn(1, 40, 40, 2)
    expected = resample_mixing_matrix(mixer.random_matrix, (40, 40)) @ x.reshape(1, 1600, 2)
    torch.testing.assert_close(mixer(x), expected.reshape(1, 40, 40, 2))


# --- round two ---------------------------------------------------------------------------------

@pytest.mark.slow  # a child interpreter
def test_wide_views_are_refused_in_bounded_memory(tmp_path):
    """2: a neck tensor that views 4 bytes through stride 0 as 3e9 values, in a whole-model
    file for the converter (which has no neck to check its shape against)."""
    from test_checkpoints import source, to_official
    from test_trust import bounded
    state = {f'backbone.{k}': v for k, v in to_official(source('poolformer_s12')[1],
                                                         v1=True).items()
             if not k.startswith(('norm.', 'head.'))}  # a detector's backbone
    state['neck.lateral_convs.0.conv.weight'] = torch.zeros(1).expand(3 * 10**9)
    path = tmp_path / 'mask_rcnn_poolformer_s12.pth'
    torch.save(dict(state_dict=state), path)
    answer, seconds, memory = bounded('from convert_checkpoint import convert\n    '
                                      'convert(sys.argv[1], sys.argv[2])', path,
                                      tmp_path / 'out.pth')
    assert answer.startswith(f'refused: {path}') and 'neck.lateral_convs.0.conv.weight: ' \
        '3000000000 values declared over 1 stored' in answer, answer
    assert seconds < 10 and memory < 500 * 2**20 and not (tmp_path / 'out.pth').exists()


def test_downloads_write_only_their_cache_entry(served, tmp_path):
    """5: a legacy-zip archive whose member is named like another URL's cache entry."""
    from mmmetaformer.sources import url_cache_name
    folder, url = served
    honest, planted = _state(), {k: torch.zeros_like(v) for k, v in _state().items()}
    torch.save(dict(state_dict=honest), folder / 'victim.pth')
    torch.save(dict(state_dict=planted), tmp_path / 'planted.pth')
    with zipfile.ZipFile(folder / 'attack.zip', 'w') as archive:
        archive.write(tmp_path / 'planted.pth', url_cache_name(f'{url}/victim.pth'))
    with pytest.raises(CheckpointError, match=f'cannot read {url}/attack.zip'):
        CheckpointLoader.load_checkpoint(f'{url}/attack.zip')
    assert [p.name for p in (tmp_path / 'hub' / 'checkpoints').iterdir()] == [
        url_cache_name(f'{url}/attack.zip')]
    loaded = CheckpointLoader.load_checkpoint(f'{url}/victim.pth')['state_dict']
    assert all(v.equal(honest[k]) for k, v in loaded.items())


@pytest.mark.parametrize('pointer', ['', 'elsewhere/iter_9.pth'], ids=['empty', 'stale'])
def test_resume_survives_an_empty_or_stale_pointer(two_checkpoints, pointer):
    """6: a kill while mmengine rewrote last_checkpoint left it empty (or it names a file
    that is gone): resume from the newest intact checkpoint in the work dir."""
    (two_checkpoints / 'iter_2.pth').unlink()
    (two_checkpoints / 'last_checkpoint').write_text(pointer and str(two_checkpoints / pointer))
    runner = _runner(two_checkpoints, 3, resume=True)
    runner.train()
    assert runner.iter == 3 and 'resumed epoch: 0, iter: 1' in _log(two_checkpoints)


def test_last_checkpoint_is_replaced_not_rewritten(tmp_path):
    """6: the pointer file is a new file each time (written whole, then renamed)."""
    pointer = tmp_path / 'last_checkpoint'
    pointer.write_text('')
    inode = pointer.stat().st_ino
    _runner(tmp_path, 2).train()
    assert pointer.stat().st_ino != inode and pointer.read_text() == str(tmp_path / 'iter_2.pth')
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith('.tmp')]


def test_resume_takes_runner_checkpoints_only(two_checkpoints):
    """12: beside the damaged latest, a newer non-Runner file (converted weights) and the
    temporary file of a killed best-checkpoint save."""
    torch.save(dict(state_dict=_state()), two_checkpoints / 'converted.pth')
    stale = two_checkpoints / '.best_accuracy_iter_1.pth.999999.tmp'
    stale.write_bytes(b'half a checkpoint')
    runner = _runner(two_checkpoints, 3, resume=True)
    runner.train()
    assert runner.iter == 3 and 'resumed epoch: 0, iter: 1' in _log(two_checkpoints)
    assert not stale.exists()


# --- round two, 9: errors that name the file and the problem -----------------------------------

def test_truncated_file_through_load_from(tmp_path):
    path = tmp_path / 'iter_1.pth'
    torch.save(dict(state_dict=_state()), path)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f'cannot read {path}: .*may be truncated'):
        CheckpointLoader.load_checkpoint(str(path))


def test_numpy_shape_of_65_dims(tmp_path):
    from test_trust import _array
    import numpy as np
    path = tmp_path / 'dims.pth'
    torch.save(dict(meta=dict(x=_array(np.dtype('f4'), b'\0' * 4, (1, ) * 65))), path)
    with pytest.raises(CheckpointError, match='a numpy array of 65 dimensions'):
        read_checkpoint(str(path))


FULL_DISK = '''
import resource, sys, torch
import mmmetaformer
from mmengine.runner import save_checkpoint
resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, resource.RLIM_INFINITY))  # ulimit -f 1024
try:  # as mmmetaformer.SafeCheckpointHook saves
    save_checkpoint(dict(w=torch.zeros(2 ** 20)), sys.argv[1],
                    backend_args=dict(backend='mmmetaformer_local'))
except OSError as err:
    print(err)
'''


@pytest.mark.slow  # a child interpreter
def test_failed_save_names_the_file(tmp_path):
    path = tmp_path / 'iter_2.pth'
    torch.save(dict(w=torch.ones(2)), path)
    run = interpreter.run(['-c', FULL_DISK, str(path)], timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines()[-1].startswith(f'cannot write {path}: '), run.stdout
    assert torch.load(path, weights_only=True)['w'].equal(torch.ones(2))  # the old one stays
    assert [p.name for p in tmp_path.iterdir()] == ['iter_2.pth']


def test_unknown_layout_in_the_converter_names_the_file(tmp_path):
    from test_checkpoints import convert_tool
    path = tmp_path / 'other.pth'
    torch.save({'encoder.weight': torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=f'{path}: unrecognised checkpoint layout'):
        convert_tool.convert(str(path), str(tmp_path / 'out.pth'))


def test_state_dict_that_is_a_list(tmp_path):
    from mmengine.runner import load_checkpoint
    path = tmp_path / 'list.pth'
    torch.save(dict(state_dict=[torch.zeros(1)]), path)
    model = torch.nn.Module()
    model.backbone = PoolFormerV2(arch=TINY)
    with pytest.raises(CheckpointError, match=f"{path}: its 'state_dict' is a list"):
        load_checkpoint(model, str(path))  # load_from, tools/test.py
    with pytest.raises(CheckpointError, match=f"{path}: its 'state_dict' is a list"):
        load_backbone_checkpoint(PoolFormerV2(arch=TINY), str(path))


def test_nested_tensor(tmp_path):
    state = _state()
    state['stem.conv.bias'] = torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])
    path = tmp_path / 'nested.pth'
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=f'{path}: stem.conv.bias is a nested tensor'):
        load_backbone_checkpoint(PoolFormerV2(arch=TINY), str(path))
