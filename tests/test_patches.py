"""Tests for ``mmmetaformer.patches``: each test fails without the patch it covers."""
import copy
import gc
import io
import os
import pickle
import socket
import zipfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel, MMDistributedDataParallel
from mmengine.runner import CheckpointLoader, Runner, load_checkpoint
from torch.utils.data import Dataset

import mmmetaformer.patches as patches  # import mmmetaformer applies them


# --- tiny mmengine training setup ------------------------------------------------
class TinyModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x, y, mode='loss'):
        pred = self.fc(x).squeeze(-1)
        return dict(loss=((pred - y)**2).mean()) if mode == 'loss' else pred


class TinyData(Dataset):
    metainfo = dict(classes=('a', ))

    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(x=torch.randn(2, generator=g), y=torch.randn((), generator=g))


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


def _runner(work_dir, max_iters, name, resume=False, **kwargs):
    return Runner(
        model=TinyModel(),
        work_dir=str(work_dir),
        experiment_name=name,
        train_dataloader=dict(
            dataset=TinyData(),
            sampler=dict(type='DefaultSampler', shuffle=True),
            batch_size=4,
            collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        param_scheduler=dict(
            type='LinearLR', start_factor=0.5, by_epoch=False, end=10),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)),
        randomness=dict(seed=0),
        resume=resume,
        **kwargs)


def _train(work_dir, max_iters, name, resume=False):
    snapshot = Snapshot()
    _runner(work_dir, max_iters, name, resume, custom_hooks=[snapshot]).train()
    return snapshot.states


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A work_dir holding checkpoints of 4 iterations, and the final state."""
    work_dir = tmp_path_factory.mktemp('work_dir')
    return work_dir, _train(work_dir, 4, f'first-{work_dir.name}')['after']


# --- safe-load and inert-config: resume / load_from under weights_only=True ------
def test_resume_continues_from_saved_state(trained, tmp_path):
    work_dir, saved = trained
    assert (work_dir / 'last_checkpoint').read_text().endswith('iter_4.pth')
    states = _train(work_dir, 6, f'resume-{tmp_path.name}', resume=True)

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


def test_load_from_runner_checkpoint(trained):
    work_dir, saved = trained
    model = TinyModel()
    ckpt = load_checkpoint(model, str(work_dir / 'iter_4.pth'))
    torch.testing.assert_close(model.state_dict(), saved['model'])
    assert isinstance(ckpt['message_hub']['log_scalars']['train/loss'],
                      HistoryBuffer)


def test_numpy1_checkpoint_names(tmp_path):
    """Checkpoints written under numpy 1.x name ``numpy.core.multiarray``."""
    buf = io.BytesIO()
    torch.save({'hb': HistoryBuffer([0.5], [1])}, buf)
    path = tmp_path / 'np1.pth'
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, 'w') as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith('data.pkl'):
                data = data.replace(b'numpy._core.multiarray',
                                    b'numpy.core.multiarray')
                assert b'numpy.core.multiarray' in data
            dst.writestr(info, data)
    hb = CheckpointLoader.load_checkpoint(str(path))['hb']
    assert hb.current() == 0.5 and hb.mean() == 0.5


def test_allow_list_is_scoped_to_mmengine_loading(trained):
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
        _train(tmp_path, 6, f'planted-{tmp_path.name}', resume=True)
    assert not marker.exists()


def test_apply_is_idempotent():
    patched = CheckpointLoader.load_checkpoint.__func__
    patches.apply()
    assert CheckpointLoader.load_checkpoint.__func__ is patched
    assert getattr(patched, patches._MARK)


# --- cpu-distributed: torchrun + gloo on a CPU-only host -------------------------
def _dist_worker(rank, port, work_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2',
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    runner = _runner(work_dir, 2, f'dist-{port}', launcher='pytorch',
                     env_cfg=dict(dist_cfg=dict(backend='gloo')))
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


@pytest.mark.skipif(torch.cuda.is_available(), reason='covers CPU-only hosts')
def test_torchrun_gloo_training_on_cpu(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(port, str(tmp_path)), nprocs=2)
    assert (tmp_path / 'iter_2.pth').is_file()


# --- retrieval-in1d: np.in1d in mmpretrain's retrieval metrics -------------------
def test_retrieval_metrics_on_numpy2():
    metrics = pytest.importorskip('mmpretrain.evaluation')
    pred = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    target = [torch.tensor([0]), torch.tensor([2])]  # ranks 1 and 2
    recall = metrics.RetrievalRecall.calculate(
        pred, target, topk=(1, 2), target_indices=True)
    assert [r.item() for r in recall] == [50., 100.]
    ap = metrics.RetrievalAveragePrecision.calculate(
        pred, target, topk=3, target_indices=True)
    assert ap.item() == pytest.approx(75.)


# --- MMMETAFORMER_DISABLE_PATCHES ----------------------------------------------------
REPLACED = '''
import json, os, sys
from mmcv.transforms import LoadImageFromFile
from mmengine.hooks import CheckpointHook
from mmengine.runner import CheckpointLoader, Runner, checkpoint, runner
import mmmetaformer
targets = dict(loader=CheckpointLoader.load_checkpoint.__func__, resume=Runner.resume,
               to_model=checkpoint._load_checkpoint_to_model, save=runner.save_checkpoint,
               hook=CheckpointHook._save_best_checkpoint, image=LoadImageFromFile.transform)
package = os.path.dirname(mmmetaformer.__file__) + os.sep  # not a clone folder of that name
print(json.dumps(sorted(k for k, f in targets.items() if f.__code__.co_filename.startswith(package))))
'''


@pytest.mark.parametrize('disable,replaced', [
    ('', ['hook', 'image', 'loader', 'resume', 'save', 'to_model']),
    ('all', []),
    ('safe-load, empty-image-name', ['hook', 'resume', 'save', 'to_model'])])
def test_patches_can_be_turned_off(disable, replaced):
    import json
    import subprocess
    import sys
    run = subprocess.run([sys.executable, '-c', REPLACED], capture_output=True, text=True,
                         env=dict(os.environ, MMMETAFORMER_DISABLE_PATCHES=disable), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.splitlines()[-1]) == replaced


def test_unknown_patch_names_are_refused(monkeypatch):
    monkeypatch.setenv('MMMETAFORMER_DISABLE_PATCHES', 'safe-load,no-such-patch')
    with pytest.raises(ValueError, match=r"unknown patches \['no-such-patch'\]; known: all, "):
        patches.apply()
