"""A checkpoint hook whose saves survive a kill at any moment, and the file backend it saves
through."""
import os.path as osp

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook

from ..fileio import replacing, write_bytes
from ..registry import HOOKS


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend whose writes replace a file only once complete
    (registered as ``'mmmetaformer_local'``)."""

    def put(self, obj: bytes, filepath) -> None:
        write_bytes(filepath, obj)

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        with replacing(filepath, 'w', encoding=encoding) as f:
            f.write(obj)


class _DeferredRemovals:
    """A file backend whose ``remove``/``rmtree`` only note what to remove."""

    def __init__(self, backend):
        self.backend, self.removals = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def remove(self, path):
        self.removals.append((self.backend.remove, path))

    def rmtree(self, path):
        self.removals.append((self.backend.rmtree, path))


@HOOKS.register_module()
class SafeCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` (same arguments) with crash-safe saving.

    mmengine's hook writes checkpoints and ``last_checkpoint`` in place, and removes the
    checkpoint beyond ``max_keep_ckpts`` (or the previous best) before it saves the new one: a
    kill during a save leaves no complete checkpoint, or an empty ``last_checkpoint``. This one
    writes each file to a temporary file renamed when complete (local folders, through the
    ``'mmmetaformer_local'`` file backend unless ``backend_args`` names another), points
    ``last_checkpoint`` at a checkpoint only once it is complete, and removes old checkpoints
    after that.
    """

    def before_train(self, runner) -> None:
        out_dir = self.out_dir or runner.work_dir
        if self.backend_args is None and self.file_client_args is None and \
                '://' not in str(out_dir):
            self.backend_args = dict(backend='mmmetaformer_local')
        super().before_train(runner)

    def _remove(self, path):
        if self.file_backend.isfile(path):
            self.file_backend.remove(path)
        elif self.file_backend.isdir(path):  # checkpoints saved by deepspeed are folders
            self.file_backend.rmtree(path)

    def _save_checkpoint_with_step(self, runner, step, meta):
        """mmengine's steps in a crash-safe order: save the checkpoint, point
        ``last_checkpoint`` at it, and only then remove the one beyond ``max_keep_ckpts``."""
        outdated = None
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and
                                            self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                outdated = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(self.out_dir, filename, self.file_client_args,
                               save_optimizer=self.save_optimizer,
                               save_param_scheduler=self.save_param_scheduler, meta=meta,
                               by_epoch=self.by_epoch, backend_args=self.backend_args,
                               **self.args)
        if not is_main_process():
            return
        with replacing(osp.join(runner.work_dir, 'last_checkpoint')) as f:
            f.write(self.last_ckpt)
        if outdated is not None:
            self._remove(self.file_backend.join_path(self.out_dir,
                                                     self.filename_tmpl.format(outdated)))

    def _save_best_checkpoint(self, runner, metrics) -> None:
        """mmengine's, removing the previous best only once the new one is saved."""
        backend = self.file_backend
        self.file_backend = deferred = _DeferredRemovals(backend)
        try:
            super()._save_best_checkpoint(runner, metrics)
        finally:
            self.file_backend = backend
        current = {getattr(self, 'best_ckpt_path', None),
                   *getattr(self, 'best_ckpt_path_dict', {}).values()}
        for remove, path in deferred.removals:
            if path not in current and backend.exists(path):
                remove(path)
