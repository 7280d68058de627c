"""The run components the configs name (mmmetaformer.SafeRunner, SafeCheckpointHook) and the
checkpoint schemes every mmengine load goes through, on a tiny mmengine training run."""
import copy
import io
import os
import pickle
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader, Runner, load_checkpoint

from mmmetaformer.trust import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))
import interpreter  # noqa: E402
from tiny_run import TinyData, TinyModel, log_of, tiny_runner  # noqa: E402


class Snapshot(Hook):
    """Records the training state at ``before_train`` and ``after_train``."""

    def __init__(self):
        self.states = {}

    def _record(self, runner, when):
        self.states[when] = dict(
            iter=runner.iter,
            model=copy.deepcopy(runner.model.state_dict()),
            optim=copy.deepcopy(runner.optim_wrapper.state_dict()),
            sched=[s.state_dict() for s in runner.param_schedulers],
            loss=runner.message_hub.get_scalar('train/loss').data[0].copy()
            if 'train/loss' in runner.message_hub.log_scalars else None)

    def before_train(self, runner):
        self._record(runner, 'before')

    def after_train(self, runner):
        self._record(runner, 'after')


def _train(work_dir, max_iters, resume=False, **kwargs):
    snapshot = Snapshot()
    tiny_runner(work_dir, max_iters, resume=resume, custom_hooks=[snapshot], **kwargs).train()
    return snapshot.states


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A work_dir holding checkpoints of 4 iterations, and the final state."""
    work_dir = tmp_path_factory.mktemp('work_dir')
    return work_dir, _train(work_dir, 4)['after']


# --- resume and load_from ---------------------------------------------------------------------

def test_resume_continues_from_saved_state(trained, tmp_path):
    work_dir, saved = trained
    assert (work_dir / 'last_checkpoint').read_text().endswith('iter_4.pth')
    states = _train(work_dir, 6, resume=True)

    resumed = states['before']
    assert resumed['iter'] == saved['iter'] == 4
    torch.testing.assert_close(resumed['model'], saved['model'])
    torch.testing.assert_close(resumed['optim']['state'], saved['optim']['state'])
    assert resumed['optim']['param_groups'] == saved['optim']['param_groups']
    assert resumed['sched'] == saved['sched']
    assert (resumed['loss'] == saved['loss']).all() and len(saved['loss']) == 4

    final = states['after']
    assert final['iter'] == 6
    assert final['optim']['state'][0]['step'].item() == 6
    assert (work_dir / 'iter_6.pth').is_file()


def test_plain_runner_reads_runner_checkpoints_by_the_trust_rule(trained):
    """A config without runner_type: mmengine's Runner, whose loads go through the schemes."""
    work_dir, saved = trained
    model = TinyModel()
    ckpt = load_checkpoint(model, str(work_dir / 'iter_4.pth'))
    torch.testing.assert_close(model.state_dict(), saved['model'])
    assert isinstance(ckpt['message_hub']['log_scalars']['train/loss'], HistoryBuffer)
    runner = Runner(model=TinyModel(), work_dir=str(work_dir), load_from=str(
        work_dir / 'iter_4.pth'), resume=True, train_dataloader=dict(
            dataset=TinyData(), sampler=dict(type='DefaultSampler'), batch_size=4,
            collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=5), optim_wrapper=dict(
            optimizer=dict(type='AdamW', lr=0.01)), default_hooks=dict(checkpoint=None))
    runner.train()
    assert runner.iter == 5


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    runner = tiny_runner(tmp_path, 1, resume=True)
    runner.train()
    assert runner.iter == 1
    log = log_of(tmp_path)
    assert f'resume: {tmp_path} holds no checkpoint to resume from; training starts from the ' \
        'beginning' in log and 'latest checkpoint None' not in log


def test_resume_of_another_config_is_one_line(trained, tmp_path):
    work_dir, _ = trained
    with pytest.raises(CheckpointError) as err:
        tiny_runner(tmp_path, 6, model=TinyModel(outputs=3), resume=True,
                    load_from=str(work_dir / 'iter_4.pth')).train()
    message = str(err.value)
    assert '\n' not in message and message.startswith(f"cannot resume from {work_dir}")
    assert 'fc.weight is (1, 2) in the file and (3, 2) in the model' in message
    assert 'load_from' in message


def test_load_from_fine_tunes_to_other_shapes_and_test_refuses_them(trained, tmp_path):
    work_dir, saved = trained
    runner = tiny_runner(tmp_path, 1, model=TinyModel(outputs=3),
                         load_from=str(work_dir / 'iter_4.pth'))
    runner.train()
    assert '2 tensors of ' in log_of(tmp_path) and 'keep their initialisation' in log_of(tmp_path)
    runner = tiny_runner(tmp_path / 'test', 1, model=TinyModel(outputs=3),
                         load_from=str(work_dir / 'iter_4.pth'))
    with pytest.raises(CheckpointError, match=r'does not fit .*\n.*wrong shape: fc\.weight'):
        runner.load_or_resume()  # as runner.test() does


# --- the trust rule on every load ------------------------------------------------------------

def test_numpy1_checkpoint_names(tmp_path):
    """Checkpoints written under numpy 1.x name ``numpy.core.multiarray``."""
    buf = io.BytesIO()
    torch.save({'hb': HistoryBuffer([0.5], [1])}, buf)
    path = tmp_path / 'np1.pth'
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, 'w') as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith('data.pkl'):
                data = data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
                assert b'numpy.core.multiarray' in data
            dst.writestr(info, data)
    hb = CheckpointLoader.load_checkpoint(str(path))['hb']
    assert hb.current() == 0.5 and hb.mean() == 0.5


def test_allow_list_is_scoped_to_the_load(trained):
    work_dir, _ = trained
    before = set(torch.serialization.get_safe_globals())
    CheckpointLoader.load_checkpoint(str(work_dir / 'iter_4.pth'))
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(pickle.UnpicklingError):  # plain torch.load is unchanged
        torch.load(work_dir / 'iter_4.pth')


class _RunsCode:
    """Unpickling this calls ``open(marker, 'w')``: stands for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


class _ReadsClassAttr:
    """Unpickling this calls ``getattr(HistoryBuffer, '_statistics_methods')``."""

    def __reduce__(self):
        return getattr, (HistoryBuffer, '_statistics_methods')


def _evil_checkpoint(path, payload):
    torch.save({'state_dict': TinyModel().state_dict(), 'meta': payload}, path)
    return str(path)


@pytest.mark.parametrize('load', [
    lambda path: load_checkpoint(TinyModel(), path),
    lambda path: CheckpointLoader.load_checkpoint(path),
], ids=['load_checkpoint', 'CheckpointLoader'])
def test_foreign_pickle_is_not_executed(tmp_path, load):
    marker = tmp_path / 'pwned'
    path = _evil_checkpoint(tmp_path / 'evil.pth', _RunsCode(marker))
    with pytest.raises(pickle.UnpicklingError) as err:
        load(path)
    assert not marker.exists()
    assert f'refused to load {path}' in str(err.value)
    assert 'nothing from it was built or executed' in str(err.value)
    assert 'open' in str(err.value)  # names the refused global


def test_getattr_resolves_only_history_buffer_statistics(tmp_path):
    path = _evil_checkpoint(tmp_path / 'evil.pth', _ReadsClassAttr())
    with pytest.raises(pickle.UnpicklingError, match='refusing getattr'):
        CheckpointLoader.load_checkpoint(path)


def test_resume_does_not_trust_the_work_dir(tmp_path):
    """A planted file in the work_dir, named by last_checkpoint, is refused."""
    marker = tmp_path / 'pwned'
    path = _evil_checkpoint(tmp_path / 'iter_4.pth', _RunsCode(marker))
    (tmp_path / 'last_checkpoint').write_text(path)
    with pytest.raises(pickle.UnpicklingError, match='refused to load'):
        _train(tmp_path, 6, resume=True)
    assert not marker.exists()


# --- DDP on CPU-only hosts ---------------------------------------------------------------------
# One rank of a 2-process run, started as torchrun starts it (environment variables), in a child
# interpreter (tests/interpreter.py).
DIST_WORKER = '''
import gc, sys
import torch
import torch.distributed as dist
from mmengine.model import MMDistributedDataParallel
sys.path.insert(0, {tests!r})
from tiny_run import tiny_runner
# the OpenMMLab configs ask for NCCL: the SafeRunner takes gloo on a CPU-only host
runner = tiny_runner(sys.argv[1], 2, launcher='pytorch',
                     env_cfg=dict(dist_cfg=dict(backend='nccl')))
runner.train()
assert runner.distributed and runner.world_size == 2 and runner.iter == 2
assert isinstance(runner.model, MMDistributedDataParallel)
params = torch.cat([p.detach().flatten() for p in runner.model.parameters()])
gathered = [torch.empty_like(params) for _ in range(2)]
dist.all_gather(gathered, params)
torch.testing.assert_close(gathered[0], gathered[1])  # DDP kept ranks in sync
# Tear down before exit: torch's gloo worker threads may otherwise still be
# freeing work objects while Python finalizes, which aborts the process.
del runner
gc.collect()
dist.destroy_process_group()
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason='covers CPU-only hosts')
@pytest.mark.slow
def test_torchrun_gloo_training_on_cpu(tmp_path):
    env = dict(os.environ, WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
               MASTER_PORT=interpreter.free_port())
    code = DIST_WORKER.format(tests=str(Path(__file__).parent))
    ranks = [interpreter.start(['-c', code, str(tmp_path)],
                               env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))
             for rank in range(2)]
    for rank in ranks:
        assert rank.wait(timeout=300) == 0, rank.stderr[-3000:]
    assert (tmp_path / 'iter_2.pth').is_file()
