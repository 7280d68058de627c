"""The checkpoint trust rule (``mmmetaformer.trust``): files built here try to run code, forge
numpy dtypes or remap mmengine's statistics; markers and subprocesses prove nothing ran."""
import ast
import collections
import datetime
import io
import itertools
import os
import pickle
import re
import struct
import subprocess
import sys
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import CheckpointLoader, Runner
from torch.utils.data import Dataset

import interpreter
from mmmetaformer import trust
from mmmetaformer.sources import read_checkpoint
from mmmetaformer.trust import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
REFUSED = (pickle.UnpicklingError, CheckpointError)  # mmengine's loader / the project's


class _Reduces:
    """Pickles as ``reduce`` says: how the files below forge what numpy or mmengine write."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def _array(dtype, raw, shape=(1, )):
    """Pickles like ``np.ndarray`` with the given (possibly forged) dtype and raw bytes."""
    return _Reduces(np._core.multiarray._reconstruct, (np.ndarray, (0, ), b'b'),
                    (1, shape, dtype, False, raw))


# a void dtype with an object field, without numpy's "holds objects" flag (0, not 63)
FORGED_DTYPE = _Reduces(np.dtype, ('V8', False, True),
                        (3, '|', None, ('f0', ), {'f0': (np.dtype('O'), 0)}, 8, 1, 0))


def _save(path, **payload):
    torch.save(dict(state_dict={'w': torch.zeros(2)}, **payload), path)
    return str(path)


def _save_remapped(path, **extra):
    """A file whose HistoryBuffer maps 'mean' to ``HistoryBuffer.min``, as mmengine pickles it
    after such a remap (``__getstate__`` saves the class's mapping)."""
    saved = dict(HistoryBuffer._statistics_methods)
    HistoryBuffer._statistics_methods['mean'] = HistoryBuffer.min
    try:
        return _save(path, message_hub=dict(loss=HistoryBuffer([1., 3.], [1, 1])), **extra)
    finally:
        HistoryBuffer._statistics_methods.update(saved)


@pytest.fixture(autouse=True)
def statistics():
    """mmengine's statistics before the test, and restored after it (a failure may change them)."""
    HistoryBuffer()  # registers the defaults
    saved = dict(HistoryBuffer._statistics_methods)
    yield saved
    HistoryBuffer._statistics_methods.clear()
    HistoryBuffer._statistics_methods.update(saved)


def _loaders():
    return [read_checkpoint, CheckpointLoader.load_checkpoint]


# --- 2: forged dtypes and object arrays ------------------------------------------------------

def test_forged_dtype_does_not_crash(tmp_path):
    """Read by numpy, the forged array would hold a pointer 0x4141414141414141: printing it
    crashed the process (SIGSEGV). Here a subprocess reads it with the trust rule alone."""
    path = _save(tmp_path / 'forged.pth', meta=dict(x=_array(FORGED_DTYPE, b'A' * 8)))
    code = ('import importlib.util, sys\n'
            'spec = importlib.util.spec_from_file_location("trust", sys.argv[1])\n'
            'trust = importlib.util.module_from_spec(spec)\n'
            'spec.loader.exec_module(trust)\n'
            'try:\n    print(trust.load(sys.argv[2]))\n'
            'except trust.RefusedCheckpoint as err:\n    print("refused:", err.reason)\n')
    run = subprocess.run([sys.executable, '-c', code, str(ROOT / 'mmmetaformer' / 'trust.py'),
                          path], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith('refused: refusing numpy dtype')
    for load in _loaders():  # the same rule in this process
        with pytest.raises(REFUSED, match='refusing numpy dtype'):
            load(path)


@pytest.mark.parametrize('payload', [
    np.array(['text', 1], dtype=object), np.array([b'ab'], dtype='S2'),
    np.array([(1, 2.)], dtype='i4,f8'), np.zeros(2, dtype='M8[s]')],
    ids=['object', 'bytes', 'structured', 'datetime'])
def test_only_plain_numeric_arrays_load(tmp_path, payload):
    path = _save(tmp_path / 'array.pth', meta=dict(x=payload))
    for load in _loaders():
        with pytest.raises(REFUSED, match='refusing numpy dtype'):
            load(path)


def test_array_bytes_must_match_shape(tmp_path):
    path = _save(tmp_path / 'short.pth', meta=dict(x=_array(np.dtype('f8'), b'A' * 8, (4, ))))
    with pytest.raises(CheckpointError, match='its data is not 32 bytes'):
        read_checkpoint(path)


def test_numpy_data_round_trips(tmp_path):
    """Every plain dtype, both byte orders, Fortran order, 0-d and empty arrays, scalars."""
    rng = np.random.default_rng(0)
    arrays = [(rng.random((3, 2)) * 100).astype(np.dtype(code).newbyteorder(order))
              for code in trust.PLAIN_DTYPES for order in '<>']
    data = dict(arrays=arrays, fortran=np.asfortranarray(rng.random((3, 4))),
                scalars=[np.float32(1.5), np.int64(-3), np.bool_(True), np.complex64(1j)],
                zero_d=np.array(7), empty=np.zeros((0, 3)), hub=HistoryBuffer([1., 2.], [1, 3]))
    path = _save(tmp_path / 'numpy.pth', meta=data)
    for load in _loaders():
        got = load(path)['meta']
        for a, b in zip(got['arrays'] + [got['fortran'], got['zero_d'], got['empty']],
                        data['arrays'] + [data['fortran'], data['zero_d'], data['empty']]):
            assert type(a) is np.ndarray and a.dtype == b.dtype and a.flags.writeable
            np.testing.assert_array_equal(a, b)
        assert got['fortran'].flags.f_contiguous
        assert [(type(s), s) for s in got['scalars']] == [(type(s), s) for s in data['scalars']]
        assert type(got['hub']) is HistoryBuffer
        assert got['hub'].mean() == data['hub'].mean() and got['hub'].max() == 2.


def test_user_safe_globals_are_kept(tmp_path):
    before = set(torch.serialization.get_safe_globals())  # torch keeps a set: no order
    path = _save(tmp_path / 'date.pth', meta=dict(day=datetime.date(2020, 1, 2)))
    with pytest.raises(CheckpointError, match='it references datetime.date'):
        read_checkpoint(path)
    with torch.serialization.safe_globals([datetime.date]):
        assert read_checkpoint(path)['meta']['day'] == datetime.date(2020, 1, 2)
        assert datetime.date in torch.serialization.get_safe_globals()
    assert set(torch.serialization.get_safe_globals()) == before


# --- 3: HistoryBuffer statistics --------------------------------------------------------------

def test_refused_file_leaves_no_trace(tmp_path, statistics):
    """The remap comes first; a later object (a deque) makes the file refused."""
    path = _save_remapped(tmp_path / 'remap.pth', later=collections.deque())
    for load in _loaders():
        with pytest.raises(REFUSED, match='collections.deque'):
            load(path)
    assert HistoryBuffer._statistics_methods == statistics
    assert HistoryBuffer([1., 3.], [1, 1]).statistics('mean') == 2.  # what the logs show


def test_statistics_cannot_be_remapped(tmp_path, statistics):
    path = _save_remapped(tmp_path / 'remap.pth')
    for load in _loaders():
        with pytest.raises(REFUSED, match="only mmengine's own"):
            load(path)
    assert HistoryBuffer._statistics_methods == statistics
    honest = _save(tmp_path / 'honest.pth', message_hub=dict(loss=HistoryBuffer([1., 3.], [1, 1])))
    for load in _loaders():
        assert load(honest)['message_hub']['loss'].statistics('mean') == 2.


# --- 1: code in meta['config'] on resume ------------------------------------------------------

class TinyModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x, y, mode='loss'):
        return dict(loss=((self.fc(x).squeeze(-1) - y)**2).mean())


class TinyData(Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(x=torch.randn(2, generator=g), y=torch.randn((), generator=g))


_RUNS = itertools.count()


def _runner(work_dir, max_iters, **kwargs):
    """A Runner of ``max_iters`` iterations of TinyModel (a checkpoint every 2 by default)."""
    kwargs.setdefault('default_hooks', dict(checkpoint=dict(type='CheckpointHook', interval=2,
                                                            by_epoch=False)))
    return Runner(
        model=TinyModel(), work_dir=str(work_dir), experiment_name=f'tiny-{next(_RUNS)}',
        train_dataloader=dict(dataset=TinyData(), sampler=dict(type='DefaultSampler'),
                              batch_size=4, collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)), **kwargs)


@pytest.fixture(scope='module')
def honest(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('honest')
    _runner(work_dir, 2).train()
    return trust.load(work_dir / 'iter_2.pth')


@pytest.mark.parametrize('gpu_ids', ['[0]', None])
def test_resume_does_not_run_config_code(honest, tmp_path, gpu_ids):
    marker = tmp_path / 'marker'
    config = f"_x = __import__('os').system('touch {marker}')\n"
    honest['meta']['config'] = (f'gpu_ids = {gpu_ids}\n' if gpu_ids else '') + config
    torch.save(honest, tmp_path / 'iter_2.pth')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_2.pth'))
    runner = _runner(tmp_path, 3, resume=True)
    runner.train()
    assert runner.iter == 3 and not marker.exists()


def test_resume_still_checks_gpu_ids(honest, tmp_path):
    """mmengine's check of the GPU count (read from gpu_ids, mmcv 1.x style) still works."""
    marker = tmp_path / 'marker'
    honest['meta']['config'] = f"gpu_ids = range(0, 2)\nopen('{marker}', 'w')\n"
    torch.save(honest, tmp_path / 'iter_2.pth')
    with pytest.raises(RuntimeError, match='Number of GPUs used'):
        _runner(tmp_path, 3, resume=True, load_from=str(tmp_path / 'iter_2.pth')).train()
    assert not marker.exists()


@pytest.mark.parametrize('text,expected', [
    ('gpu_ids = [0, 1]\nx = 1', 'gpu_ids = [0, 1]\n'), ('gpu_ids = range(4)', 'gpu_ids = [0, 1, '
                                                        '2, 3]\n'),
    ("gpu_ids = __import__('os').getpid()", ''), ('gpu_ids = range(10**9)', ''),
    ('not python (', ''), (None, ''), ('-' * 10**6 + '1', ''), ('x = a' + '.b' * 10**6, '')],
    ids=['list', 'range', 'call', 'huge-range', 'syntax', 'none', 'parser-memory', 'recursion'])
def test_inert_config(text, expected):
    assert trust.inert_config(text) == expected


def test_resume_with_a_config_the_parser_cannot_hold(honest, tmp_path):
    """9: text in meta['config'] on which ``ast.parse`` runs out of memory."""
    honest['meta']['config'] = '-' * 10**6 + '1'
    torch.save(honest, tmp_path / 'iter_2.pth')
    runner = _runner(tmp_path, 3, resume=True, load_from=str(tmp_path / 'iter_2.pth'))
    runner.train()
    assert runner.iter == 3


# --- 6: files that are no checkpoints, and the re-save command ------------------------------

def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / 'random.pth'
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match='is not a checkpoint') as err:
        read_checkpoint(str(path))
    assert 'arbitrary' not in str(err.value)
    path.write_bytes(b'root:x:0:0:root:/root:/bin/bash\n')  # round three, 6a: not quoted
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(str(path))
    assert str(err.value) == (f'cannot read {path}: it is not a checkpoint (neither a PyTorch '
                              'file, which is a zip archive or a pickle, nor safetensors)')
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match='is empty'):
        read_checkpoint(str(tmp_path / 'empty.pth'))


def test_resave_command_quotes_the_path(tmp_path, monkeypatch):
    """The suggested command, pasted into a shell, re-saves the file and runs nothing else."""
    marker = tmp_path / 'pwned'
    path = tmp_path / "ck$(touch pwned)'.pth"
    torch.save(dict(state_dict={'w': torch.ones(2)}, extra=collections.deque()), path)
    with pytest.raises(CheckpointError, match='could run arbitrary Python code') as err:
        read_checkpoint(str(path))
    command = next(line.strip() for line in str(err.value).splitlines()
                   if line.strip().startswith('python -c'))
    # the shell, with printf standing in for python, shows the arguments python would get
    run = subprocess.run(['bash', '-c', "printf '%s\\0'" + command[len('python'):]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    option, code = run.stdout.split('\0')[:2]
    assert option == '-c' and not marker.exists()
    calls = [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)
             and ast.unparse(node.func) == 'torch.load']
    assert calls[0].args[0].value == str(path)
    monkeypatch.chdir(tmp_path)
    exec(code, {})  # what python -c would run: re-saves the tensors (the file is ours)
    assert torch.load(tmp_path / 'converted.pth')['w'].equal(torch.ones(2))


# --- round two, 1: files whose repr or hash is exponential ---------------------------------

def _shared(levels, make=lambda x: [x, x]):
    """2 ** levels leaves in a few hundred bytes of pickle: each level holds the last twice."""
    x = 0
    for _ in range(levels):
        x = make(x)
    return x


THE_PACKAGE = f'''
sys.path.insert(0, {str(ROOT / 'tools')!r})
from mmmetaformer.sources import read_checkpoint
from mmmetaformer.trust import CheckpointError
'''
TRUST_ALONE = f'''
import importlib.util
spec = importlib.util.spec_from_file_location('trust', {str(ROOT / 'mmmetaformer/trust.py')!r})
trust = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trust)
CheckpointError = trust.CheckpointError
'''
BOUNDED = '''
import resource, sys, time
{imports}
vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + {cap}, resource.RLIM_INFINITY))
before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time()
try:
    {call}
    print('done')
except CheckpointError as err:
    print('refused:', ' '.join(str(err).split())[:600])
print(time.time() - start, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
'''


def bounded(call, *args, timeout=120, cap=2**31, imports=THE_PACKAGE):
    """(the answer, seconds, bytes of memory) of running ``call`` (Python code, on
    ``sys.argv``) after ``imports`` in a subprocess whose address space is capped at ``cap``
    bytes over them (by default 2 GiB, a safety net)."""
    code = BOUNDED.format(imports=imports, call=call, cap=cap)
    run = interpreter.run(['-c', code, *map(str, args)], timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 0, run.stderr[-2000:]
    answer, figures = run.stdout.splitlines()[-2:]
    seconds, memory = map(float, figures.split())
    return answer, seconds, memory


@pytest.mark.parametrize('payload', [
    lambda: _array(np.dtype('f4'), _shared(32)),  # an array whose data is the bomb
    lambda: _Reduces(np.dtype, _shared(60, lambda x: (x, x))),  # dtype arguments, hashed
    lambda: _Reduces(np._core.multiarray.scalar, (_shared(32),)),
    lambda: _Reduces(getattr, (_shared(32), 'min')),
    lambda: _Reduces(HistoryBuffer, ()),  # its state below
], ids=['array-state', 'dtype-hash', 'scalar', 'getattr', 'history-buffer'])
@pytest.mark.slow  # a child interpreter
def test_exponential_data_is_refused_in_bounded_time_and_memory(tmp_path, payload):
    value = payload()
    if isinstance(value, _Reduces) and value.reduce[0] is HistoryBuffer:
        value = _Reduces(HistoryBuffer, (), _shared(32))
    path = tmp_path / 'bomb.pth'
    torch.save(dict(state_dict={'w': torch.zeros(2)}, meta=dict(x=value)), path)
    assert path.stat().st_size < 2048
    answer, seconds, memory = bounded('read_checkpoint(sys.argv[1])', path)
    assert answer.startswith(f'refused: refused to load {path}'), answer
    assert seconds < 10 and memory < 500 * 2**20


# --- round two, 7: stand-ins where the walk did not look ------------------------------------

def _with_metadata():
    state = collections.OrderedDict(w=torch.zeros(1))
    state._metadata = {'': dict(version=np.int64(2))}
    return state


def _with_attribute(cls):
    t = cls(torch.zeros(2))
    t.scale = np.float32(3)
    return dict(t=t)


@pytest.mark.parametrize('payload,built', [
    ({(np.float32(1), ): 'x'}, None),
    ({'s': {(np.float32(1), )}}, None),
    ({(_array(FORGED_DTYPE, b'A' * 8), ): 'x'}, None),
    (_with_metadata(), lambda state: state._metadata['']['version']),
    (_with_attribute(torch.Tensor), lambda state: state['t'].scale),
    (_with_attribute(nn.Parameter), lambda state: state['t'].scale)],
    ids=['tuple-key', 'nested-set', 'forged-dtype-in-key', 'metadata', 'tensor', 'parameter'])
def test_no_stand_in_leaks(tmp_path, payload, built):
    """Every record is checked, then built or refused: re-saving what was read writes only
    what torch and numpy would (torch lists the globals a file needs)."""
    path = tmp_path / 'file.pth'
    torch.save(payload, path)
    if built is None:
        with pytest.raises(CheckpointError, match='refusing numpy'):
            read_checkpoint(path)
        return
    got = read_checkpoint(path)
    assert type(built(got)) is type(built(payload)) and built(got) == built(payload)
    torch.save(got, tmp_path / 'again.pth')
    needed = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / 'again.pth')
    assert not [name for name in needed if 'mmmetaformer' in name], needed


# --- round two, 8: the stand-ins are bound for one load, not for the process ---------------

def test_other_threads_get_torchs_answer(tmp_path):
    """While a checkpoint is read, a plain ``torch.load(weights_only=True)`` in another thread
    is refused numpy data, as torch refuses it at any other time."""
    path = _save(tmp_path / 'numpy.pth', meta=dict(x=np.float32(1.5)))
    answers = []

    def plain_load():
        try:
            answers.append(torch.load(path, weights_only=True))
        except pickle.UnpicklingError as err:
            answers.append(err)

    plain_load()  # torch's own answer
    assert isinstance(answers[0], pickle.UnpicklingError) and 'numpy' in str(answers.pop())

    def load_meanwhile():
        thread = threading.Thread(target=plain_load)
        thread.start()
        thread.join()
        return torch.load(path, weights_only=True)

    assert trust.inert(load_meanwhile, str(path))['meta']['x'] == np.float32(1.5)
    assert isinstance(answers[0], pickle.UnpicklingError) and 'numpy' in str(answers[0])


# --- round three, 2: memory bounded by what the file holds ---------------------------------

def _forge_member(path, declared, deflate):
    """A torch file whose storage member declares ``declared`` bytes: a DEFLATE stream of that
    many zeros (a few hundred bytes a MiB), or stored, of the size it really has."""
    buffer = io.BytesIO()
    torch.save(dict(state_dict={'w': torch.zeros(1)}), buffer)
    compress = zlib.compressobj(9, zlib.DEFLATED, -15)
    mib = compress.compress(bytes(2**20)) + compress.flush(zlib.Z_FULL_FLUSH)
    stream = mib * (declared // 2**20) + compress.flush()
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, 'w') as out:
        name = next(n for n in src.namelist() if n.endswith('/data/0')).encode()
        for info in src.infolist():
            storage = info.filename.encode() == name
            out.writestr(info, stream if storage and deflate else src.read(info))
    raw = bytearray(path.read_bytes())  # the member's method and size, in both its headers
    central = raw.rindex(b'PK\x01\x02', 0, raw.rindex(name))
    local = raw.rindex(b'PK\x03\x04', 0, raw.index(name))
    for header, method, size in ((local, 8, 22), (central, 10, 24)):
        struct.pack_into('<H', raw, header + method, 8 if deflate else 0)
        struct.pack_into('<I', raw, header + size, declared)
        if not deflate:
            struct.pack_into('<I', raw, header + size - 4, declared)
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize('deflate', [True, False], ids=['compressed', 'oversized'])
@pytest.mark.slow  # a child interpreter
def test_members_larger_than_the_file_are_refused_before_allocation(tmp_path, deflate):
    """A 1 MiB file whose storage member inflates to 1 GiB: torch allocates (and fills) the
    declared size before it compares it with the tensor's; a stored member declaring more
    than the file: torch allocates it before it reads past the end."""
    path = _forge_member(tmp_path / 'bomb.pth', 2**30, deflate)
    assert path.stat().st_size < 2**21
    answer, seconds, memory = bounded('trust.load(sys.argv[1])', path, imports=TRUST_ALONE)
    assert re.match(re.escape(f'refused: cannot read {path}: it is not a checkpoint as torch '
                              'writes one (its zip members stored uncompressed): ') + (
        r'1 of its \d+ members are compressed' if deflate else
        r'its members declare 10737\d{5} bytes, the file has \d+'), answer), answer
    assert memory < 100 * 2**20


@pytest.mark.slow  # a child interpreter
def test_allocation_failure_is_reported_as_such(tmp_path):
    """Under a memory cap an intact file that does not fit is not called truncated."""
    path = tmp_path / 'big.pth'
    torch.save(dict(state_dict={'w': torch.zeros(32, 2**20)}), path)
    answer, _, _ = bounded('trust.load(sys.argv[1])', path, cap=64 * 2**20,
                           imports=TRUST_ALONE)
    assert answer.startswith(f'refused: cannot read {path}: there is not enough memory to load '
                             'it (RuntimeError: '), answer
    assert 'truncated' not in answer
