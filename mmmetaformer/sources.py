"""Where checkpoints come from: local paths, http(s) URLs, ``timm://`` names and the other
locations mmengine reads, each read by the trust rule (:mod:`mmmetaformer.trust`).

:data:`SCHEMES` are registered with mmengine's ``CheckpointLoader`` when mmmetaformer is
imported, so that every checkpoint mmengine loads (a backbone's ``init_cfg``, ``load_from``,
``resume``, ``init_detector`` / ``init_model``) is read here. A checkpoint's
``meta['config']``, which mmengine's ``Runner.resume`` executes to read ``gpu_ids``, is
reduced to that assignment (:func:`~mmmetaformer.trust.inert_config`).
"""
import hashlib
import os
import os.path as osp
import socket
from typing import Mapping
from urllib.parse import urlparse

from mmengine.logging import print_log

from . import trust
from .checkpoints import remember_source
from .trust import CheckpointError


def read_checkpoint(source, map_location='cpu'):
    """The object stored at ``source`` (a path, an http(s) URL, ``timm://<hub name>`` or an
    mmengine file-backend URI), read without running any code from it."""
    source = str(source)
    if source.startswith('timm://'):
        path = _download_timm(source[len('timm://'):])
    elif source.startswith(('http://', 'https://')):
        path = _download_url(source)
    elif '://' in source:
        from mmengine.fileio import get_local_path
        from mmengine.fileio.backends import backends, prefix_to_backends
        scheme = source.split('://', 1)[0].rsplit(':', 1)[-1]
        if scheme not in prefix_to_backends:
            supported = [*_URL_SCHEMES, *(f'{p}://' for p in prefix_to_backends if p)]
            raise CheckpointError(
                f'cannot read {source}: {scheme}:// is not a supported location; use a local '
                f"path or one of {', '.join(dict.fromkeys(supported))} (mmengine file "
                f"backends: {', '.join(backends)})")
        with get_local_path(source) as path:
            return _read_file(path, source, map_location)
    elif not osp.isfile(source):
        raise CheckpointError(f'checkpoint file not found: {source}')
    else:
        path = source
    return _read_file(path, source, map_location)


def _read_file(path: str, source: str, map_location):
    with open(path, 'rb') as f:
        head = f.read(9)
    if len(head) == 9 and head[8:] == b'{':  # safetensors: u64 header size, then JSON
        from safetensors.torch import load_file
        try:
            checkpoint = load_file(path)
        except Exception as err:
            raise CheckpointError(trust.unreadable(source, err)) from err
    else:
        checkpoint = trust.load(path, source, map_location)
    weights = checkpoint.get('state_dict') if isinstance(checkpoint, dict) else None
    if weights is not None and not isinstance(weights, Mapping):
        raise CheckpointError(f"{source}: its 'state_dict' is a {type(weights).__name__}, not "
                              'tensors by name')
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    if isinstance(meta, dict) and 'config' in meta:
        meta['config'] = trust.inert_config(meta['config'])
    remember_source(checkpoint, source)
    return checkpoint


# --- downloads ----------------------------------------------------------------------------
_URL_SCHEMES = ('http://', 'https://', 'timm://')


def url_cache_name(url: str) -> str:
    """The file name a download of ``url`` is cached under: made from the whole URL, so that
    two URLs ending in the same name do not share it."""
    return f'{hashlib.sha256(url.encode()).hexdigest()[:16]}-{osp.basename(urlparse(url).path)}'


def _download_url(url: str) -> str:
    """Download ``url`` once into torch's hub cache, under a name made from the whole URL."""
    from torch.hub import download_url_to_file, get_dir
    path = osp.join(get_dir(), 'checkpoints', url_cache_name(url))
    if not osp.isfile(path):
        os.makedirs(osp.dirname(path), exist_ok=True)
        print_log(f'Downloading {url} to {path}', logger='current')
        try:
            download_url_to_file(url, path)  # writes a temporary file, renamed when complete
        except Exception as err:
            raise CheckpointError(
                f'cannot download {url} ({type(err).__name__}: {err}). If this machine is '
                f'offline, download it elsewhere, copy it to {path} or pass its local '
                'path instead.') from err
    return path


def _download_timm(name: str) -> str:
    """The local file of the timm hub weights ``name``, e.g. ``caformer_s18.sail_in1k``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from timm.models import get_pretrained_cfg
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None or not cfg.hf_hub_id:
        raise CheckpointError(
            f"timm://{name}: timm has no pretrained weights of that name; timm's MetaFormer "
            "weights are listed by timm.list_pretrained('*former*'), e.g. "
            'timm://caformer_s18.sail_in22k_ft_in1k')
    hub_id, error = cfg.hf_hub_id, None
    offline = not _hub_reachable()  # then only the local cache, at once (no 35 s of retries)
    for filename in ('model.safetensors', 'pytorch_model.bin'):
        try:
            return hf_hub_download(hub_id, filename, local_files_only=offline)
        except (LocalEntryNotFoundError, EntryNotFoundError) as err:  # not cached / no file
            error = err
        except Exception as err:
            error = err
            break
    from huggingface_hub import constants
    reason = f'{constants.ENDPOINT} is out of reach and it is not in the local cache' \
        if offline else f'{type(error).__name__}: {error}'
    raise CheckpointError(
        f'cannot fetch timm://{name} from the Hugging Face hub (repo {hub_id}): {reason}\n'
        f'If this machine is offline, download https://huggingface.co/{hub_id}/resolve/main/'
        'model.safetensors on a connected one and pass its local path instead (or copy its '
        'Hugging Face cache).')


def _hub_reachable(timeout: float = 3.) -> bool:
    """False in huggingface_hub's offline mode or when its endpoint takes no TCP connection
    within ``timeout`` seconds (name lookup included)."""
    from concurrent.futures import ThreadPoolExecutor
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    address = (url.hostname, url.port or (443 if url.scheme == 'https' else 80))
    pool = ThreadPoolExecutor(1)
    try:
        pool.submit(socket.create_connection, address, timeout).result(timeout).close()
        return True
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


# --- mmengine's CheckpointLoader schemes --------------------------------------------------
# Named ``load_from_<backend>``: mmengine logs "Loads checkpoint by <backend> backend".

def load_from_local(filename, map_location=None):
    return read_checkpoint(filename, map_location)


def load_from_http(filename, map_location=None):
    return read_checkpoint(filename, map_location)


def load_from_timm(filename, map_location=None):
    return read_checkpoint(filename, map_location)


def load_from_petrel(filename, map_location=None):
    return read_checkpoint(filename, map_location)


def _model_zoo(filename: str, names: Mapping, what: str) -> str:
    """The URL (or mmengine-home relative path) ``filename`` names in a model-zoo table."""
    name = filename.split('://', 1)[1]
    if name not in names:
        raise CheckpointError(f'{filename}: {what} lists no model {name!r}')
    return names[name]


def load_from_torchvision(filename, map_location=None):
    from mmengine.runner.checkpoint import get_torchvision_models
    url = _model_zoo(filename, get_torchvision_models(), "torchvision's model zoo")
    return read_checkpoint(url, map_location)


def load_from_openmmlab(filename, map_location=None):
    from mmengine.runner.checkpoint import (get_deprecated_model_names,
                                            get_external_models)
    name = filename.split('://', 1)[1]
    name = get_deprecated_model_names().get(name, name)
    url = _model_zoo(f'open-mmlab://{name}', get_external_models(), "OpenMMLab's model zoo")
    if not url.startswith(('http://', 'https://')):  # a file in mmengine's home folder
        url = osp.join(osp.expanduser(os.getenv('MMENGINE_HOME', osp.join(
            os.getenv('XDG_CACHE_HOME', '~/.cache'), 'mmengine'))), url)
    return read_checkpoint(url, map_location)


def load_from_mmcls(filename, map_location=None):
    from mmengine.runner.checkpoint import get_mmcls_models
    url = _model_zoo(filename, get_mmcls_models(), "mmcls's model zoo")
    checkpoint = read_checkpoint(url, map_location)
    state = checkpoint.get('state_dict', checkpoint)  # mmcls backbones for mmdet / mmseg
    return dict(state_dict={k[len('backbone.'):]: v for k, v in state.items()
                            if k.startswith('backbone.')})


#: Every scheme mmengine 0.10 ships but ``pavi://`` (an internal service, read by torch's own
#: ``weights_only`` default), and ``timm://``.
SCHEMES = {
    '': load_from_local,
    ('http://', 'https://'): load_from_http,
    'timm://': load_from_timm,
    ('modelzoo://', 'torchvision://'): load_from_torchvision,
    ('open-mmlab://', 'openmmlab://'): load_from_openmmlab,
    'mmcls://': load_from_mmcls,
    (r'(\S+\:)?s3://', r'(\S+\:)?petrel://'): load_from_petrel,
}
