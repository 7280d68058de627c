"""Resuming (``trust.check_resume_state``): what mmengine's ``Runner.resume`` hands to the
optimizer, the parameter schedulers and the hooks is checked against the built model and config
first. Honest checkpoints come from mmengine's Runner; a subprocess shows what plain torch does
with the forged one."""
import collections
import copy
import math
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.optim import AmpOptimWrapper, OptimWrapper, OptimWrapperDict
from mmengine.runner import Runner
from torch.utils.data import Dataset

import interpreter
from mmmetaformer import trust
from mmmetaformer.trust import CheckpointError, check_resume_state

ROOT = Path(__file__).resolve().parents[1]


class Classifier(BaseModel):

    def __init__(self, num_classes=3):
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x, y, mode='loss'):
        logits = self.head(self.trunk(x).relu())
        return dict(loss=F.cross_entropy(logits, y % logits.shape[1]))


class Data(Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(x=torch.randn(4, generator=g), y=torch.tensor(i))


SCHEDULERS = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2),
              dict(type='MultiStepLR', milestones=[3, 5], by_epoch=False)]


def runner(work_dir, num_classes=3, max_iters=4, **optimizer):
    """A Runner of Classifier with AdamW (the head at a tenth of the lr: a group per
    parameter, as mmengine's paramwise_cfg makes them) and two schedulers."""
    return Runner(
        model=Classifier(num_classes), work_dir=str(work_dir),
        train_dataloader=dict(dataset=Data(), sampler=dict(type='DefaultSampler'), batch_size=4,
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-3, **optimizer),
                           paramwise_cfg=dict(custom_keys={'head': dict(lr_mult=0.1)})),
        param_scheduler=SCHEDULERS, default_hooks=dict(checkpoint=dict(
            type='CheckpointHook', interval=2, by_epoch=False, max_keep_ckpts=1)))


def built(work_dir, num_classes=3, **optimizer):
    """(model, optim_wrapper, param_schedulers) built from the config as Runner.resume builds
    them."""
    r = runner(work_dir, num_classes, **optimizer)
    r.optim_wrapper = r.build_optim_wrapper(r.optim_wrapper)
    r.param_schedulers = r.build_param_scheduler(r.param_schedulers)
    return r.model, r.optim_wrapper, r.param_schedulers


@pytest.fixture(scope='module')
def honest(tmp_path_factory):
    """A checkpoint mmengine wrote after 4 iterations, and where."""
    work_dir = tmp_path_factory.mktemp('honest')
    runner(work_dir).train()
    path = work_dir / 'iter_4.pth'
    return trust.load(path), str(path)


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.equal(b)
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, HistoryBuffer):
        return type(b) is HistoryBuffer and same(a.data, b.data)
    if isinstance(a, np.ndarray):
        return type(b) is np.ndarray and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


@pytest.fixture(scope='module')
def config(tmp_path_factory):
    """The built objects of the honest checkpoint's config (the check leaves them alone)."""
    return built(tmp_path_factory.mktemp('config'))


def refused(checkpoint, source, objects):
    with pytest.raises(CheckpointError) as err:
        check_resume_state(checkpoint, source, *objects)
    message = str(err.value)
    assert message.startswith(f'cannot resume from {source}: ') and '\n' not in message
    assert f'fine-tune: --cfg-options load_from={source} without --resume' in message
    return message


# --- the forged optimizer state: plain torch crashes, the check refuses it --------------------

BEFORE = '''
import sys, torch
checkpoint = torch.load(sys.argv[1], weights_only=True)
param = torch.nn.Parameter(torch.zeros(1024, 12544))
optimizer = torch.optim.AdamW([param], lr=1e-3, fused=False)  # the config's
optimizer.load_state_dict(checkpoint['optimizer'])
print('fused:', optimizer.param_groups[0]['fused'], flush=True)
param.grad = torch.ones_like(param)
optimizer.step()
print('stepped', flush=True)
'''


@pytest.mark.slow  # a child interpreter
def test_forged_optimizer_state_crashes_torch_and_is_refused(tmp_path):
    """A Runner checkpoint of tensors only whose AdamW state for a 1024x12544 weight holds one
    value, with fused=True: torch takes the file's fused over the config's fused=False and
    its _fused_adam reads and writes past the one value (SIGSEGV). The check names the
    parameter and keeps the config's kernel."""
    model = nn.Sequential(collections.OrderedDict(fc=nn.Linear(12544, 1024, bias=False)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=False)
    group = dict(optimizer.state_dict()['param_groups'][0], fused=True)
    one = dict(step=torch.tensor(1.), exp_avg=torch.zeros(1), exp_avg_sq=torch.zeros(1))
    path = tmp_path / 'iter_1.pth'
    torch.save(dict(meta=dict(epoch=0, iter=1), state_dict={},
                    message_hub=dict(log_scalars={}, runtime_info={}, resumed_keys={}),
                    optimizer=dict(state={0: one}, param_groups=[group])), path)

    run = interpreter.run(['-c', BEFORE, str(path)], timeout=120)
    assert run.stdout.startswith('fused: True')  # the file's kernel, not the config's
    # the write past the one value kills the process, during the step or at exit
    assert run.returncode == -signal.SIGSEGV or 'Error' in run.stderr, (run.returncode,
                                                                        run.stderr[-2000:])

    with pytest.raises(CheckpointError) as err:
        check_resume_state(trust.load(path), str(path), model, OptimWrapper(optimizer), None)
    assert str(err.value).startswith(
        f"cannot resume from {path}: its optimizer state of fc.weight has a float32 tensor of "
        "shape (1,) for 'exp_avg' where the parameter is a float32 tensor of shape "
        '(1024, 12544). It was saved with another config.')


def test_changed_num_classes_names_the_head(honest, tmp_path):
    """An honest change (3 -> 5 classes): the first parameter whose state differs is named,
    with how to fine-tune instead."""
    checkpoint, source = honest
    message = refused(checkpoint, source, built(tmp_path, num_classes=5))
    assert "its optimizer state of head.weight has a float32 tensor of shape (3, 8) for " \
           "'exp_avg' where the parameter is a float32 tensor of shape (5, 8). It was saved " \
           'with another config.' in message


def test_honest_checkpoint_passes_unchanged_and_resumes(honest, tmp_path):
    checkpoint, source = honest
    kept = copy.deepcopy(checkpoint)
    model, optim_wrapper, schedulers = built(tmp_path)
    resumed = check_resume_state(checkpoint, source, model, optim_wrapper, schedulers)
    assert same(resumed, kept) and same(checkpoint, kept)
    optim_wrapper.load_state_dict(resumed['optimizer'])
    for scheduler, state in zip(schedulers, resumed['param_schedulers']):
        scheduler.load_state_dict(state)
    optim_wrapper.update_params(model(torch.randn(2, 4), torch.tensor([0, 1]))['loss'])
    assert optim_wrapper.optimizer.state_dict()['state'][0]['step'] == 5


@pytest.mark.parametrize('config_fused', [False, None])
def test_kernel_flags_are_the_configs(honest, tmp_path, config_fused):
    """fused/foreach/capturable/differentiable of the file are replaced by the built
    optimizer's (the config's, also where it does not set them), in every group and in
    mmengine's base settings; the other settings stay the file's."""
    checkpoint, source = honest
    forged = copy.deepcopy(checkpoint)
    for group in forged['optimizer']['param_groups'] + [
            forged['optimizer']['base_param_settings']]:
        group.update(fused=True, foreach=True, capturable=True, differentiable=True)
    model, optim_wrapper, schedulers = built(tmp_path, fused=config_fused)
    resumed = check_resume_state(forged, source, model, optim_wrapper, schedulers)
    expected = copy.deepcopy(checkpoint['optimizer'])
    for group in expected['param_groups'] + [expected['base_param_settings']]:
        group.update(fused=config_fused)
    assert same(resumed['optimizer'], expected)
    optim_wrapper.load_state_dict(resumed['optimizer'])
    assert {g['fused'] for g in optim_wrapper.optimizer.param_groups} == {config_fused}


def _edit(part, change):
    """A function that applies ``change`` to ``checkpoint[part...]`` of a copy."""
    def edit(checkpoint):
        target = checkpoint
        for key in part[:-1]:
            target = target[key]
        change(target, part[-1])
    return edit


def _set(value):
    return lambda target, key: target.__setitem__(key, value)


FORGED = {  # what a file may hold that Runner.resume would hand on
    'meta-epoch-negative': (('meta', 'epoch'), _set(-1), "meta['epoch'] is not a non-negative"),
    'meta-iter-float': (('meta', 'iter'), _set(4.0), "meta['iter'] is not a non-negative int"),
    'meta-seed-huge': (('meta', 'seed'), _set(2**70), "meta['seed'] is not an int below"),
    'keep-ckpt-path': (('message_hub', 'runtime_info', 'keep_ckpt_ids'), _set(['/../../x']),
                       "runtime info 'keep_ckpt_ids' is not a list of non-negative ints"),
    'best-ckpt-elsewhere': (('message_hub', 'runtime_info', 'best_ckpt'),
                            _set('/etc/best_passwd'), "runtime info 'best_ckpt' is not the name"),
    'best-score-nan': (('message_hub', 'runtime_info', 'best_score'), _set(math.nan),
                       "'best_score' is not a finite number"),
    'iter-text': (('message_hub', 'runtime_info', 'iter'), _set('4'), "'iter' is not a non-neg"),
    'log-scalar-list': (('message_hub', 'log_scalars', 'loss'), _set([1.0]),
                        'message_hub is not what mmengine saves'),
    'state-unknown-id': (('optimizer', 'state', 99), _set({}),
                         'optimizer state is not one state per parameter'),
    'state-step-inf': (('optimizer', 'state', 0, 'step'), _set(torch.tensor(math.inf)),
                       'has a step that is not a finite non-negative number'),
    'state-nan': (('optimizer', 'state', 1, 'exp_avg'), lambda t, k: t[k].fill_(math.nan),
                  "state of trunk.bias has values that are not finite for 'exp_avg'"),
    'state-dtype': (('optimizer', 'state', 0, 'exp_avg'), lambda t, k: t.update(
        {k: t[k].double()}), 'has a float64 tensor of shape (8, 4) for'),
    'state-missing-key': (('optimizer', 'state', 1), lambda t, k: t[k].pop('exp_avg_sq'),
                          'state of trunk.bias is not of the kind of the others'),
    'group-ids-repeat': (('optimizer', 'param_groups', 1, 'params'), _set([0]),
                         'group 1 does not number its parameters one by one'),
    'group-lr-text': (('optimizer', 'param_groups', 0, 'lr'), _set('0.1'),
                      "optimizer group 0 'lr' is a str where the config's is a float."),
    'group-betas-3': (('optimizer', 'param_groups', 0, 'betas'), _set((0.9, 0.99, 0.9)),
                      "'betas' is a tuple of 3 where the config's is a tuple of 2"),
    'group-amsgrad': (('optimizer', 'param_groups', 2, 'amsgrad'), _set(True),
                      "its optimizer group 2 'amsgrad' is not the config's False. It was saved "
                      'with another config'),
    'group-unknown': (('optimizer', 'param_groups', 0, 'lr_override'), _set(1.0),
                      "group 0 has 1 settings the config's optimizer has not"),
    'groups-fewer': (('optimizer', 'param_groups'), lambda t, k: t[k].pop(),
                     "optimizer has not the config's 4 parameter groups"),
    'base-params': (('optimizer', 'base_param_settings', 'params'), _set(list(range(9))),
                    "base settings 'params' is a list of 9 where the config's is a float32 "
                    'tensor of shape (1,).'),
    'scheduler-optimizer': (('param_schedulers', 0, 'optimizer'), _set({}),
                            'param_schedulers[0] is not a state of a LinearLR'),
    'scheduler-step-text': (('param_schedulers', 0, 'last_step'), _set('4'),
                            "param_schedulers[0] 'last_step' is a str where the config's is "
                            'an int.'),
    'scheduler-param-name': (('param_schedulers', 1, 'param_name'), _set('fused'),
                             "param_schedulers[1] 'param_name' is not the config's 'lr'. It "
                             'was saved'),
    'scheduler-values-short': (('param_schedulers', 0, 'base_values'), lambda t, k: t[k].pop(),
                               "'base_values' is a list of 4 where the config's is a list of 5"),
    'scheduler-values-nan': (('param_schedulers', 1, '_last_value', 0), _set(math.nan),
                             "its param_schedulers[1] '_last_value'[0] is not finite."),
    'scheduler-milestones': (('param_schedulers', 1, 'milestones'), _set(collections.Counter(
        {3: 1, 10**9: 1})), "its param_schedulers[1] 'milestones' has other keys than the "
        "config's. It was saved"),
    'schedulers-fewer': (('param_schedulers', ), lambda t, k: t[k].pop(),
                         "param_schedulers are not the config's 2"),
}


@pytest.mark.parametrize('edit,expected', [(_edit(*v[:2]), v[2]) for v in FORGED.values()],
                         ids=list(FORGED))
def test_forged_training_state_is_refused(honest, config, edit, expected):
    checkpoint, source = honest
    forged = copy.deepcopy(checkpoint)
    edit(forged)
    assert expected in refused(forged, source, config)


def test_best_checkpoint_beside_the_file_passes(honest, config):
    checkpoint, source = honest
    forged = copy.deepcopy(checkpoint)
    forged['message_hub']['runtime_info'].update(
        best_ckpt=str(Path(source).with_name('best_loss_iter_2.pth')), best_score=0.5,
        best_score_acc=0.25)
    check_resume_state(forged, source, *config)


def test_amp_loss_scaler_and_wrapper_dicts(tmp_path):
    """AmpOptimWrapper's loss scaler state (a CPU GradScaler here: AmpOptimWrapper wants a GPU)
    and an OptimWrapperDict's wrappers by name."""
    class CpuAmpOptimWrapper(AmpOptimWrapper):

        def __init__(self, optimizer):
            OptimWrapper.__init__(self, optimizer)
            self.loss_scaler = torch.amp.GradScaler('cpu')

    model = Classifier()
    wrappers = OptimWrapperDict(
        trunk=CpuAmpOptimWrapper(torch.optim.SGD(model.trunk.parameters(), lr=0.1)),
        head=OptimWrapper(torch.optim.SGD(model.head.parameters(), lr=0.1)))
    state = wrappers.state_dict()
    checkpoint = dict(meta=dict(epoch=0, iter=0), optimizer=state,
                      message_hub=dict(log_scalars={}, runtime_info={}, resumed_keys={}))
    assert check_resume_state(checkpoint, 'x.pth', model, wrappers, None)['optimizer'] == state
    for change, expected in [(dict(scale=math.inf), "optimizer trunk loss scaler['scale']"),
                             (dict(_growth_tracker='0'), "loss scaler['_growth_tracker']")]:
        forged = copy.deepcopy(checkpoint)
        forged['optimizer']['trunk']['loss_scaler'].update(change)
        with pytest.raises(CheckpointError, match=re.escape(expected)):
            check_resume_state(forged, 'x.pth', model, wrappers, None)
    forged = dict(checkpoint, optimizer=dict(trunk=state['trunk']))
    with pytest.raises(CheckpointError, match="its optimizers are not the config's trunk, head"):
        check_resume_state(forged, 'x.pth', model, wrappers, None)
