"""Files written whole, and checkpoints found intact.

Every file the project writes goes through :func:`replacing`: a temporary file in the same
folder, renamed over the destination once complete, so that a reader, or a run killed
meanwhile, sees the old file or the whole new one (mmengine's file backend
``'mmmetaformer_local'``, :class:`~mmmetaformer.engine.hooks.AtomicLocalBackend`, writes so).
Imports only the standard library at module level: tools/onnx_infer.py (no torch) loads this
file for its pictures.
"""
import contextlib
import glob
import os
import os.path as osp
import re
import zipfile
from typing import List, Optional


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextlib.contextmanager
def replacing(path, mode: str = 'w', **kwargs):
    """A file opened for writing ``path`` whole: a temporary file in the same folder, renamed to
    ``path`` when complete (one left by a killed process is removed by the next write). A
    failure raises OSError naming ``path`` and leaves the old file as it was."""
    path = os.fspath(path)
    folder = osp.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(osp.join(glob.escape(folder), '.*.tmp')):
        pid = re.search(r'\.(\d+)\.tmp$', stale)
        if pid and not _alive(int(pid[1])):
            with contextlib.suppress(OSError):
                os.remove(stale)
    tmp = osp.join(folder, f'.{osp.basename(path)}.{os.getpid()}.tmp')
    try:
        with open(tmp, mode.replace('w', 'x'), **kwargs) as f:  # never through a file or link
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch's writer reports a full disk as RuntimeError
        raise OSError(f'cannot write {path}: {err}') from err
    finally:
        if osp.lexists(tmp):
            os.remove(tmp)


def write_bytes(path, data: bytes) -> None:
    with replacing(path, 'wb') as f:
        f.write(data)


def save(obj, path) -> None:
    """``torch.save(obj, path)`` through :func:`replacing`."""
    import torch
    with replacing(path, 'wb') as f:
        torch.save(obj, f)


# --- intact checkpoints -------------------------------------------------------------------

def damage(path: str) -> Optional[str]:
    """What is wrong with the checkpoint file ``path`` ('does not exist', 'is empty', ...), or
    None: a PyTorch zip file whose members all pass their CRC check (or a legacy pickle)."""
    if not osp.isfile(path):
        return 'does not exist'
    with open(path, 'rb') as f:
        head = f.read(4)
    if not head:
        return 'is empty'
    if not head.startswith((b'PK\x03\x04', b'\x80')):
        return 'is not a PyTorch checkpoint'
    if head.startswith(b'\x80'):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f'is incomplete or damaged (an interrupted save?): {err}'
    return f'is damaged (CRC error in {bad})' if bad else None


def intact_checkpoints(*folders: str, newest_only: bool = False) -> List[str]:
    """The Runner checkpoints (``epoch_N.pth``, ``iter_N.pth``) in ``folders`` without
    :func:`damage`, newest first."""
    files = sorted({path for folder in folders for path in glob.glob(osp.join(
        glob.escape(folder), '*.pth')) if re.fullmatch(r'(epoch|iter)_\d+\.pth',
                                                       osp.basename(path))},
                   key=osp.getmtime, reverse=True)
    intact = []
    for path in files:
        if damage(path) is None:
            intact.append(path)
            if newest_only:
                break
    return intact
