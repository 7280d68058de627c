"""A Runner that checks what it reads and runs DDP on CPUs:
``runner_type='mmmetaformer.SafeRunner'``."""
import copy
import datetime
import inspect
import logging
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel
from mmengine.device import get_device
from mmengine.dist import is_distributed
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import MODEL_WRAPPERS
from mmengine.runner import Runner, find_latest_checkpoint

from .. import trust
from ..checkpoints import first, load_state, prepare_model_state, read
from ..dataset_checks import check_dataset
from ..fileio import damage, intact_checkpoints
from ..registry import RUNNERS
from ..trust import CheckpointError


# mmengine's DDP default, buffers not broadcast at each forward, in the argument that recent
# torch takes for it (it warns in every process that broadcast_buffers is deprecated)
_NO_FORWARD_BUFFER_SYNC = dict(forward_sync_buffers=False) if 'forward_sync_buffers' in \
    inspect.signature(DistributedDataParallel).parameters else dict(broadcast_buffers=False)


def _on_rank0(line: str):
    if os.environ.get('RANK', '0') == '0':  # once per run, not once per process
        print(line, file=sys.stderr, flush=True)


@RUNNERS.register_module()
class SafeRunner(Runner):
    """mmengine's ``Runner`` (same arguments), which also

    - checks the datasets a run reads before it starts (:func:`~mmmetaformer.dataset_checks.
      check_dataset`: missing folders, damaged annotations, empty image files);
    - loads ``load_from`` whole (:func:`~mmmetaformer.checkpoints.load_model_checkpoint`):
      every tensor of the model with its shape; in training, tensors of another shape keep their
      initialisation (fine-tuning to another number of classes), with one warning;
    - resumes from the newest intact checkpoint when ``last_checkpoint`` names a damaged or
      missing one, only from a checkpoint of the same model, and hands the optimizer, the
      schedulers and the message hub only state that fits them
      (:func:`~mmmetaformer.trust.check_resume_state`);
    - runs ``launcher='pytorch'`` on CPU-only hosts: a gloo process group and DDP without
      device ids (mmengine assumes one GPU per process);
    - lets DDP look for unused parameters when some get no gradient (a backbone output the neck
      or heads skip), with one warning naming them.
    """

    def __init__(self, *args, **kwargs):
        self._resuming = self._training = False
        super().__init__(*args, **kwargs)

    # --- datasets ---------------------------------------------------------------------
    def _check_datasets(self, *names):
        loaders = {name: getattr(self, f'_{name}') for name in names}
        configs = {k: v for k, v in loaders.items()  # not yet built, from a config
                   if isinstance(v, dict) and isinstance(v.get('dataset'), dict)}
        for report in check_dataset(configs):
            _on_rank0(f'warning: {report}')

    def train(self):
        self._check_datasets('train_dataloader', 'val_dataloader')
        self._training = True
        return super().train()

    def val(self):
        self._check_datasets('val_dataloader')
        return super().val()

    def test(self):
        self._check_datasets('test_dataloader')
        return super().test()

    # --- DDP on CPUs ------------------------------------------------------------------
    def setup_env(self, env_cfg):
        if self.distributed and not is_distributed() and self.launcher == 'pytorch' \
                and get_device() == 'cpu':
            dist_cfg = dict(env_cfg.get('dist_cfg', {}), backend='gloo')  # NCCL needs GPUs
            dist_cfg.pop('init_backend', None)
            if 'timeout' in dist_cfg:
                dist_cfg['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
            torch.distributed.init_process_group(**dist_cfg)
        super().setup_env(env_cfg)

    def wrap_model(self, model_wrapper_cfg, model):
        if not self.distributed or is_model_wrapper(model):
            return super().wrap_model(model_wrapper_cfg, model)
        cfg = copy.deepcopy(model_wrapper_cfg) or dict(
            _NO_FORWARD_BUFFER_SYNC,
            find_unused_parameters=self.cfg.get('find_unused_parameters', False))
        if not cfg.get('find_unused_parameters'):
            unused = params_without_gradient(model)
            if unused:
                cfg['find_unused_parameters'] = True
                _on_rank0(
                    f'warning: {first(unused, 4)} never get a gradient (the neck or heads skip '
                    'those backbone outputs): DDP runs with find_unused_parameters=True; to drop '
                    "them instead, leave those stages out of the backbone's out_indices and "
                    "their widths out of the neck's in_channels (mmdet FPN: start_level=0), or "
                    "of the heads' in_index")
        if get_device() != 'cpu':
            return super().wrap_model(cfg, model)
        cfg.setdefault('type', 'MMDistributedDataParallel')
        return MODEL_WRAPPERS.build(cfg, default_args=dict(module=model))  # no device_ids

    # --- loading ----------------------------------------------------------------------
    def load_or_resume(self):
        if not self._has_loaded and self._resume and self._load_from is None:
            self._load_from = latest_intact_checkpoint(self.work_dir)
            if self._load_from is None:
                self._resume = False
                print_log(f'resume: {self.work_dir} holds no checkpoint to resume from; training '
                          'starts from the beginning', logger='current', level=logging.WARNING)
        super().load_or_resume()

    def resume(self, filename, resume_optimizer=True, resume_param_scheduler=True,
               map_location='default'):
        problem = damage(filename) if '://' not in str(filename) else None
        if problem is not None:
            others = [p for p in intact_checkpoints(os.path.dirname(str(filename)) or '.')
                      if os.path.abspath(p) != os.path.abspath(str(filename))]
            raise CheckpointError(
                f'cannot resume from {filename}: it {problem}; ' + (
                    f"intact checkpoints beside it, newest first: {', '.join(others)}"
                    if others else 'there is no intact checkpoint beside it'))
        self._resuming = True
        try:
            super().resume(filename, resume_optimizer, resume_param_scheduler, map_location)
        finally:
            self._resuming = False

    def load_checkpoint(self, filename, map_location='cpu', strict=False,
                        revise_keys=[(r'^module.', '')]):  # noqa: B006 (mmengine's signature)
        checkpoint = read(filename, map_location)
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        purpose = 'resume' if self._resuming else 'fine-tune' if self._training else 'load'
        state = prepare_model_state(model, checkpoint, filename, purpose)
        if self._resuming:
            self.optim_wrapper = self.build_optim_wrapper(self.optim_wrapper)
            if self.param_schedulers is not None:
                self.param_schedulers = self.build_param_scheduler(self.param_schedulers)
            checkpoint = trust.check_resume_state(checkpoint, str(filename), model,
                                                  self.optim_wrapper, self.param_schedulers)
        load_state(model, state)
        self._has_loaded = True
        return checkpoint


def latest_intact_checkpoint(work_dir: str):
    """The checkpoint ``work_dir/last_checkpoint`` names, or when it names a damaged or missing
    file (an interrupted save), the newest intact one beside it, with a warning; None when there
    is none."""
    latest = find_latest_checkpoint(work_dir)  # None: no last_checkpoint; '': an empty one
    if latest is None:
        intact = intact_checkpoints(work_dir, newest_only=True)
        return intact[0] if intact else None
    if '://' in latest:
        return latest
    problem = damage(latest) if latest else 'is empty'
    if problem is None:
        return latest
    what = f'the latest checkpoint {latest}' if latest else f'{work_dir}/last_checkpoint'
    folders = [os.path.dirname(latest) or work_dir, work_dir]
    intact = intact_checkpoints(*filter(os.path.isdir, folders), newest_only=True)
    if not intact:
        raise CheckpointError(f'cannot resume: {what} {problem}, and '
                              f"{' or '.join(dict.fromkeys(folders))} holds no intact "
                              'checkpoint')
    print_log(f'{what[0].upper()}{what[1:]} {problem}; resuming from {intact[0]}, the newest '
              'intact checkpoint', logger='current', level=logging.WARNING)
    return intact[0]


def params_without_gradient(model):
    """Names of the trainable parameters of ``model``'s backbone and neck that no input of the
    heads depends on (e.g. a backbone output norm whose level the neck skips with
    ``start_level``, or that no mmseg head names in ``in_index``). Found by one backward pass
    of a small zero batch, in eval mode, through ``extract_feat`` and each head's input
    selection (mmseg ``_transform_inputs``, mmpretrain ``pre_logits``)."""
    from ..models import MetaFormer
    if not isinstance(getattr(model, 'backbone', None), MetaFormer):
        return []
    heads = []
    for name in ('decode_head', 'auxiliary_head', 'head'):
        head = getattr(model, name, None)
        heads += list(head) if isinstance(head, torch.nn.ModuleList) else [head] if head else []
    training = model.training
    model.eval()
    try:
        feats = model.extract_feat(torch.zeros(1, 3, 128, 128, device=next(
            model.parameters()).device))
        used = [head._transform_inputs(feats) if hasattr(head, '_transform_inputs')
                else head.pre_logits(feats) for head in heads
                if hasattr(head, '_transform_inputs') or hasattr(head, 'pre_logits')] or feats
        sum(t.sum() for t in _tensors(used)).backward()
        return [name for name, p in model.named_parameters() if p.requires_grad
                and p.grad is None and name.startswith(('backbone.', 'neck.'))]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(training)


def _tensors(outputs):
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for item in outputs for t in _tensors(item)]
