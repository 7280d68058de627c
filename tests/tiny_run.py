"""A tiny mmengine training setup for the tests of the run components: a two-parameter model,
16 samples, a SafeRunner with a SafeCheckpointHook (as the project's configs name them)."""
import itertools
from pathlib import Path

import torch
import torch.nn as nn
from mmengine.model import BaseModel
from torch.utils.data import Dataset

from mmmetaformer.engine import SafeRunner

_RUNS = itertools.count()


class TinyModel(BaseModel):

    def __init__(self, outputs=1):
        super().__init__()
        self.fc = nn.Linear(2, outputs)

    def forward(self, x, y, mode='loss'):
        pred = self.fc(x)[:, 0]
        return dict(loss=((pred - y)**2).mean()) if mode == 'loss' else pred


class TinyData(Dataset):
    metainfo = dict(classes=('a', ))

    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(x=torch.randn(2, generator=g), y=torch.randn((), generator=g))


def tiny_runner(work_dir, max_iters, model=None, hook='mmmetaformer.SafeCheckpointHook',
                optimizer=None, **kwargs):
    """A SafeRunner of ``max_iters`` iterations of TinyModel, AdamW, a LinearLR schedule and a
    checkpoint every 2 iterations (override with ``default_hooks``)."""
    kwargs.setdefault('default_hooks', dict(checkpoint=dict(type=hook, interval=2,
                                                            by_epoch=False)))
    return SafeRunner(
        model=model or TinyModel(), work_dir=str(work_dir), experiment_name=f'tiny-{next(_RUNS)}',
        train_dataloader=dict(dataset=TinyData(), sampler=dict(type='DefaultSampler'),
                              batch_size=4, collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(optimizer=optimizer or dict(type='AdamW', lr=0.01)),
        param_scheduler=dict(type='LinearLR', start_factor=0.5, by_epoch=False, end=10),
        randomness=dict(seed=0), **kwargs)


def log_of(work_dir):
    return '\n'.join(p.read_text() for p in Path(work_dir).glob('*/*.log'))
