"""The checkpoint trust rule: no file is trusted to run code, and what a file holds is data.

Every checkpoint is read with ``torch.load(weights_only=True)``: torch's unpickler builds only
tensors, plain containers and scalars and refuses any other global. mmengine ``Runner``
checkpoints also hold numpy arrays, dtypes and scalars and ``HistoryBuffer`` objects (the
message hub); for these exactly seven names are bound, only while a checkpoint is read, to
the stand-ins below. A stand-in records its arguments and never calls numpy or mmengine, so
nothing a file says can reach their constructors or ``__setstate__`` (numpy's would accept
forged dtypes, mmengine's would rewrite ``HistoryBuffer``'s statistics for the process).
:func:`inert` then checks every record against these rules and only then builds the objects:

- a dtype must pickle exactly as numpy pickles one of :data:`PLAIN_DTYPES` (bool, integer,
  float, complex: no fields, sub-arrays, objects, strings or metadata);
- an array must be an ``ndarray`` of such a dtype, a shape of non-negative ints and raw bytes
  of exactly ``prod(shape) * itemsize``; a scalar such a dtype and ``itemsize`` bytes;
- a ``HistoryBuffer`` must hold two 1-D numeric arrays of equal length and a positive int
  ``max_length``, and may name its statistics only as mmengine does (``'min'`` ->
  ``HistoryBuffer.min``, same for ``max``, ``current`` and ``mean``); it is built by its
  constructor, so the statistics of the process stay mmengine's;
- ``getattr`` resolves only ``HistoryBuffer.min/max/current/mean``; ``bytes`` only makes
  ``b''`` (how Python pickles empty bytes, e.g. of an empty array).

Anything else is refused (:class:`RefusedCheckpoint`) and, as nothing is built before every
record passed, a refused file leaves no trace in the process. Records are looked for
everywhere (dictionary keys, sets, attributes of tensors and OrderedDicts); messages describe
what a file passed by its type, never by a repr, which shared nested data makes exponential.
The stand-ins answer only the thread whose load bound them. Before ``torch.load``, the members
of a zip file must be stored uncompressed and declare no more bytes than the file has (torch
allocates a member's declared size before reading it). Errors name the file and describe what
it holds by type and shape, never by its bytes or strings.

The config text a Runner checkpoint may carry (``meta['config']``, which mmengine's
``Runner.resume`` executes) is reduced to its ``gpu_ids`` by :func:`inert_config`, read
without running anything; the training state ``Runner.resume`` hands to the optimizer, the
parameter schedulers and the hooks is checked against the built ones by
:func:`check_resume_state`, and the optimizer's kernel is the config's.
"""
import ast
import contextlib
import contextvars
import math
import os
import pickle
import re
import shlex
import threading
import zipfile
from collections import Counter, OrderedDict

import numpy as np
import torch

#: The dtypes a checkpoint may store numpy data in.
PLAIN_DTYPES = ('b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8',
                'c8', 'c16')
_DTYPES = {np.dtype(code).newbyteorder(order).__reduce__()[1:]:
           np.dtype(code).newbyteorder(order) for code in PLAIN_DTYPES for order in '<>'}
_STATISTICS = ('min', 'max', 'current', 'mean')
_HISTORY_KEYS = {'max_length', '_log_history', '_count_history'}
_ATOMS = (str, int, bool, type(None))
_LOCK = threading.RLock()  # one load at a time binds the stand-ins
_reading = contextvars.ContextVar('mmmetaformer_reading', default=False)  # in this thread
# torch's messages for a pickle that needs more than its allow-list (the others: malformed)
_REFUSALS = re.compile(r'not an allowed global|is blocked|unrecognized function|Can only '
                       r'(build|create|append)|Unsupported operand|must be imported')


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the model."""


class RefusedCheckpoint(CheckpointError, pickle.UnpicklingError):
    """The file needs more than inert data to unpickle; nothing from it was run."""

    def __init__(self, source: str, reason: str, path: str = None):
        code = (f"import torch; ck = torch.load({path or source!r}, map_location='cpu', "
                "weights_only=False); torch.save(ck.get('state_dict', ck.get('model', ck)), "
                "'converted.pth')")
        super().__init__(
            f'refused to load {source}: it is a pickle that needs more than tensors and plain '
            f'data ({reason}), and unpickling it could run arbitrary Python code or crash. '
            'A checkpoint only needs tensors, so nothing from it was built or executed. If you '
            'trust the file and where it came from, re-save just its tensors once and use the '
            f'result instead:\n  python -c {shlex.quote(code)}\n'
            '(or write them with safetensors.torch.save_file).')
        self.source, self.reason = source, reason


class _Refused(Exception):
    """Raised inside ``torch.load``, which passes it on unchanged (it re-wraps only
    ``UnpicklingError``)."""


def _brief(x) -> str:
    """What a file passed, for a message: a scalar, or just the type of anything else (the
    repr of shared nested data takes exponential time and memory)."""
    return repr(x)[:100] if type(x) in _ATOMS + (bytes, float) else f'a {type(x).__name__}'


def _check_thread():
    """Stand-ins answer only the load that bound them: another thread's ``torch.load``
    meanwhile gets torch's own refusal."""
    if not _reading.get():
        raise pickle.UnpicklingError('Unsupported global: a numpy or mmengine global was '
                                     'not an allowed global by default')


class _Record:
    """A stand-in: records what the pickle passed; ``build`` validates it and makes the
    real object."""
    args, state = (), None

    def __new__(cls, *args):  # REDUCE and NEWOBJ both come here
        _check_thread()
        return super().__new__(cls)

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):  # the pickle's BUILD
        self.state = state


class _DType(_Record):
    """Bound to ``numpy.dtype``."""

    def build(self, _):
        flat = all(type(part) is tuple and all(type(v) in _ATOMS for v in part)
                   for part in (self.args, self.state))  # before hashing them
        if not (flat and (self.args, self.state) in _DTYPES):
            raise _Refused(f'refusing numpy dtype {_brief(self.args)}, state '
                           f'{_brief(self.state)}: only plain {", ".join(PLAIN_DTYPES)} dtypes '
                           'are data')
        return _DTYPES[self.args, self.state]


class _Array(_Record):
    """Bound to ``numpy.ndarray``; made by :func:`_reconstruct`, filled by BUILD."""

    def build(self, walk):
        if not (isinstance(self.state, tuple) and len(self.state) == 5 and self.state[0] == 1):
            raise _Refused(f'refusing a numpy array with state {_brief(self.state)}')
        _, shape, dtype, fortran, raw = self.state
        if not (type(shape) is tuple and all(type(n) is int and n >= 0 for n in shape)
                and isinstance(dtype, _DType) and type(fortran) is bool):
            raise _Refused(f'refusing a numpy array of shape {_brief(shape)}, dtype '
                           f'{_brief(dtype)}')
        if len(shape) > 64:  # numpy's limit
            raise _Refused(f'refusing a numpy array of {len(shape)} dimensions (at most 64)')
        dtype = walk(dtype)
        if type(raw) is not bytes or len(raw) != math.prod(shape) * dtype.itemsize:
            raise _Refused(f'refusing a numpy array of shape {shape}, dtype {dtype}: its data '
                           f'is not {math.prod(shape) * dtype.itemsize} bytes')
        return np.frombuffer(raw, dtype).reshape(shape, order='F' if fortran else 'C').copy('K')


class _Scalar(_Record):
    """Made by ``numpy.core.multiarray.scalar(dtype, raw bytes)``."""

    def build(self, walk):
        dtype, raw = self.args if len(self.args) == 2 else (None, None)
        if not isinstance(dtype, _DType) or type(raw) is not bytes:
            raise _Refused(f'refusing a numpy scalar made of {_brief(self.args)}')
        dtype = walk(dtype)
        if len(raw) != dtype.itemsize:
            raise _Refused(f'refusing a numpy {dtype} scalar of {len(raw)} bytes')
        return np.frombuffer(raw, dtype)[0]


class _Statistic(_Record):
    """What ``getattr(HistoryBuffer, name)`` gives: the name of one of its statistics."""

    def build(self, _):
        raise _Refused(f'refusing HistoryBuffer.{self.args[1]} outside a HistoryBuffer')


class _HistoryBuffer(_Record):
    """Bound to mmengine's ``HistoryBuffer``; made by NEWOBJ, filled by BUILD."""

    def build(self, walk):
        from mmengine.logging import HistoryBuffer
        state = self.state
        if not (type(state) is dict and _HISTORY_KEYS <= set(state)
                <= _HISTORY_KEYS | {'statistics_methods'}) or self.args:
            raise _Refused(f'refusing a HistoryBuffer with state {_brief(state)}')
        methods = state.get('statistics_methods', {})
        if not (type(methods) is dict and all(
                isinstance(m, _Statistic) and m.args[1] == name for name, m in methods.items())):
            raise _Refused(f'refusing a HistoryBuffer whose statistics are {_brief(methods)}: '
                           f"only mmengine's own ({', '.join(_STATISTICS)}) are accepted")
        log, count = walk(state['_log_history']), walk(state['_count_history'])
        max_length = state['max_length']
        if not (isinstance(log, np.ndarray) and isinstance(count, np.ndarray)
                and log.ndim == count.ndim == 1 and len(log) == len(count)
                and type(max_length) is int and max_length > 0):
            raise _Refused('refusing a HistoryBuffer that does not hold two 1-D arrays of '
                           'the same length and a positive max_length')
        return HistoryBuffer(log, count, max_length)


def _reconstruct(cls, *args):
    _check_thread()
    if cls is not _Array:
        raise _Refused(f'refusing numpy _reconstruct of {_brief(cls)}: only ndarray')
    return _Array()


def _bytes(*args):
    """Python pickles ``b''`` (an empty array's data) as ``bytes()``: nothing else."""
    _check_thread()
    if args:
        raise _Refused(f'refusing bytes of {_brief(args[0])}: only bytes() is data')
    return b''


def _getattr(obj, name, *default):
    _check_thread()
    if obj is not _HistoryBuffer or name not in _STATISTICS or default:
        raise _Refused(f'refusing getattr({_brief(obj)}, {_brief(name)}): only the HistoryBuffer '
                       f'statistics {", ".join(_STATISTICS)} may be referenced')
    return _Statistic(obj, name)


#: The names bound while a checkpoint is read, each to its stand-in.
STAND_INS = [(_DType, 'numpy.dtype'), (_Array, 'numpy.ndarray'),
             (_HistoryBuffer, 'mmengine.logging.history_buffer.HistoryBuffer'),
             (_getattr, 'builtins.getattr'), (_bytes, 'builtins.bytes')] + [
    (fn, f'{module}.multiarray.{name}') for fn, name in ((_reconstruct, '_reconstruct'),
                                                         (_Scalar, 'scalar'))
    for module in ('numpy._core', 'numpy.core')]  # numpy 2 / numpy 1 pickles


def _global_name(entry):
    return entry[1] if isinstance(entry, tuple) else f'{entry.__module__}.{entry.__qualname__}'


@contextlib.contextmanager
def _stand_ins():
    """Bind :data:`STAND_INS` for ``torch.load(weights_only=True)`` in this thread, one load
    at a time; safe globals the user added stay, except under those names, and all of them
    are back afterwards."""
    with _LOCK:
        saved = torch.serialization.get_safe_globals()
        names = {name for _, name in STAND_INS}
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(
            [g for g in saved if _global_name(g) not in names] + STAND_INS)
        token = _reading.set(True)
        try:
            yield
        finally:
            _reading.reset(token)
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(saved)


def _materialize(obj):
    """``obj`` with every record validated and built, wherever it is (attributes of tensors
    and OrderedDicts included); containers are updated in place. Dictionary keys and sets
    must hold none (they would have to be rebuilt)."""
    done = {}

    def walk(x):
        if id(x) in done:
            return done[id(x)]
        done[id(x)] = x
        if isinstance(x, _Record):
            done[id(x)] = x.build(walk)
        elif type(x) in (dict, OrderedDict, Counter):
            if any(walk(k) is not k for k in x):
                raise _Refused('refusing numpy or mmengine objects in dictionary keys')
            for k, v in x.items():
                x[k] = walk(v)
        elif type(x) is list:
            x[:] = [walk(v) for v in x]
        elif type(x) is tuple:
            items = tuple(walk(v) for v in x)
            done[id(x)] = x if all(a is b for a, b in zip(items, x)) else items
        elif type(x) in (set, frozenset) and any(walk(v) is not v for v in x):
            raise _Refused('refusing numpy or mmengine objects in a set')
        if isinstance(x, (OrderedDict, torch.Tensor)) and getattr(x, '__dict__', None):
            walk(vars(x))
        return done[id(x)]

    try:
        return walk(obj)
    except RecursionError:
        raise _Refused('refusing data nested too deeply') from None


def inert(load, source: str, path: str = None):
    """The result of ``load()`` (a ``torch.load(..., weights_only=True)`` call) with the stand-ins
    bound, as inert data; raises :class:`RefusedCheckpoint` naming ``source`` if the file needs
    anything else. Other errors (a damaged file) pass unchanged."""
    try:
        with _stand_ins():
            obj = load()
        return _materialize(obj)
    except _Refused as err:
        raise RefusedCheckpoint(source, str(err), path) from None
    except pickle.UnpicklingError as err:
        if not _REFUSALS.search(str(err)):
            raise
        names = dict.fromkeys(re.findall(r'GLOBAL ([\w.]+)', str(err)))
        reason = (f"it references {', '.join(names)}" if names else
                  next(line.strip() for line in str(err).splitlines() if _REFUSALS.search(line)))
        raise RefusedCheckpoint(source, reason, path) from None


def load(path: str, source: str = None, map_location='cpu'):
    """The PyTorch file ``path`` (read from ``source``, for messages) as inert data: the only
    ``torch.load`` of the package."""
    source = source or str(path)
    with open(path, 'rb') as f:
        head = f.read(8)
    if not head.startswith((b'PK\x03\x04', b'\x80')):  # torch: a zip file or a pickle
        raise CheckpointError(
            f'cannot read {source}: it is not a checkpoint (neither a PyTorch file, which is a '
            'zip archive or a pickle, nor safetensors)' if head else
            f'cannot read {source}: the file is empty')
    try:
        if head.startswith(b'PK'):
            _check_members(path, source)
        return inert(lambda: torch.load(path, map_location=map_location, weights_only=True),
                     source, str(path))
    except CheckpointError:
        raise
    except Exception as err:
        if isinstance(err, MemoryError) or _NO_MEMORY.search(str(err)):
            raise CheckpointError(
                f'cannot read {source}: there is not enough memory to load it '
                f'({type(err).__name__}: {_first_line(err)}); free memory or use a machine '
                'with more') from err
        raise CheckpointError(unreadable(source, err)) from err


# how torch and the C++ runtime report a failed allocation
_NO_MEMORY = re.compile(r"can't allocate memory|Cannot allocate memory|bad_alloc|out of memory")


def _check_members(path, source):
    """Refuse a torch zip file whose members declare more data than the file holds, before
    ``torch.load`` allocates each member's declared size (torch writes members uncompressed,
    so an honest file's members add up to less than its size)."""
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
    compressed = sum(m.compress_type != zipfile.ZIP_STORED for m in members)
    declared, size = sum(m.file_size for m in members), os.path.getsize(path)
    if compressed or declared > size:
        raise CheckpointError(
            f'cannot read {source}: it is not a checkpoint as torch writes one (its zip members '
            'stored uncompressed): ' + (
                f'{compressed} of its {len(members)} members are compressed' if compressed else
                f'its members declare {declared} bytes, the file has {size}') +
            '. Nothing of it was read.')


def _first_line(err) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else ''


def unreadable(source, err) -> str:
    return (f'cannot read {source}: it is not a complete PyTorch or safetensors checkpoint '
            f'({type(err).__name__}: {_first_line(err)}). The file may be truncated (an '
            'interrupted download?): download it again.')


def inert_config(text) -> str:
    """What mmengine's ``Runner.resume`` may execute of a checkpoint's ``meta['config']``.

    ``Runner.resume`` runs that text as a Python config only to read ``gpu_ids``; this reads
    ``gpu_ids`` without running anything (a literal list/tuple of ints, or mmcv 1.x's
    ``range(a, b)``) and returns just that assignment (empty if there is none)."""
    try:
        body = ast.parse(text).body if isinstance(text, str) else []
    except (SyntaxError, ValueError, MemoryError, RecursionError):  # MemoryError: too deep
        body = []
    gpu_ids = None
    for node in body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == 'gpu_ids' for t in node.targets):
            gpu_ids = _int_list(node.value)
    return f'gpu_ids = {gpu_ids!r}\n' if gpu_ids is not None else ''


def _int_list(node):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == 'range' and not node.keywords and len(node.args) <= 3):
        args = [_int_list(ast.List([a], ast.Load())) for a in node.args]
        if all(a is not None for a in args):
            ids = range(*(a[0] for a in args))
            return list(ids) if len(ids) <= 4096 else None
        return None
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    ok = isinstance(value, (list, tuple)) and all(type(i) is int for i in value)
    return list(value) if ok else None



# --- resuming: what Runner.resume hands to the optimizer, the schedulers and the hooks ---------

#: Optimizer settings that pick a kernel: always the config's, whatever a checkpoint says.
KERNEL_FLAGS = ('fused', 'foreach', 'capturable', 'differentiable')
_COUNTS = ('epoch', 'iter', 'max_epochs', 'max_iters')  # runtime info that hooks read
_TEXTS = ('loop_stage', 'last_ckpt', 'cfg', 'experiment_name', 'mmengine_version')


class _Unfit(Exception):
    """What of a checkpoint's training state does not fit; ``changed``: it would fit another
    config (other shapes or counts)."""

    def __init__(self, message, changed=False):
        super().__init__(message)
        self.changed = changed


def _expect(ok, message, changed=False):
    if not ok:
        raise _Unfit(message, changed)


def check_resume_state(checkpoint, source, model, optim_wrapper, param_schedulers):
    """The Runner checkpoint ``checkpoint`` (read by :func:`load` from ``source``) as it may be
    resumed into the built ``model`` (unwrapped), ``optim_wrapper`` (``OptimWrapper``,
    ``AmpOptimWrapper`` or ``OptimWrapperDict``) and ``param_schedulers`` (a list, a dict of
    lists, or None), or :class:`CheckpointError` naming ``source``.

    Checked: ``meta``'s epoch, iter and seed; the message hub (runtime info of the plain types
    hooks expect: ``keep_ckpt_ids`` only ints, which ``CheckpointHook`` formats into names of
    files it deletes, best checkpoints only ``best_*`` files beside ``source``); the optimizer
    state against the model (the same groups, settings of the config's kinds, at most one state
    per parameter: tensors of the parameter's shape and dtype, a finite step count); each
    scheduler's state against the built one (its keys only, of their kinds). Returned:
    ``checkpoint`` with the optimizer's kernel flags (:data:`KERNEL_FLAGS`) set to the built
    optimizer's, i.e. the config's."""
    try:
        _expect(isinstance(checkpoint, dict) and isinstance(checkpoint.get('meta'), dict)
                and 'message_hub' in checkpoint,
                'it is not a Runner checkpoint (it has no meta and message_hub)')
        meta = checkpoint['meta']
        for key in ('epoch', 'iter'):
            _expect(_is_count(meta.get(key)), f"its meta['{key}'] is not a non-negative int")
        seed = meta.get('seed')
        _expect(seed is None or _is_count(seed) and seed < 2**32,
                "its meta['seed'] is not an int below 2**32")
        _check_message_hub(checkpoint['message_hub'], str(source))
        resumed = dict(checkpoint)
        if 'optimizer' in checkpoint:
            names = {id(p): name for name, p in model.named_parameters()}
            wrappers = getattr(optim_wrapper, 'optim_wrappers', None)  # an OptimWrapperDict
            if wrappers is None:
                resumed['optimizer'] = _optimizer(checkpoint['optimizer'], optim_wrapper, names,
                                                  'optimizer')
            else:
                saved = checkpoint['optimizer']
                _expect(type(saved) is dict and set(saved) == set(wrappers),
                        f"its optimizers are not the config's {', '.join(wrappers)}", True)
                resumed['optimizer'] = {name: _optimizer(saved[name], wrapper, names,
                                                         f'optimizer {name}')
                                        for name, wrapper in wrappers.items()}
        if 'param_schedulers' in checkpoint and param_schedulers is not None:
            _check_schedulers(checkpoint['param_schedulers'], param_schedulers)
        return resumed
    except _Unfit as err:
        raise CheckpointError(
            f'cannot resume from {source}: {err}.' + (
                ' It was saved with another config.' if err.changed else '') +
            ' To start from its weights with this config instead, fine-tune: --cfg-options '
            f'load_from={shlex.quote(str(source))} without --resume.') from None


def _is_count(x) -> bool:
    return type(x) is int and x >= 0


def _is_real(x) -> bool:
    """A finite int or float (numpy's too), not a boolean."""
    return type(x) is int or isinstance(x, np.integer) or (
        isinstance(x, (float, np.floating)) and math.isfinite(x))


def _describe(x) -> str:
    """What ``x`` is, for a message, without its content."""
    if isinstance(x, torch.Tensor):
        return f'a {str(x.dtype)[6:]} tensor of shape {tuple(x.shape)}'
    name = type(x).__name__ + (f' of {len(x)}' if isinstance(x, (list, tuple, dict)) else '')
    return ('an ' if name[0] in 'aeiou' else 'a ') + name


def _check_message_hub(hub, source):
    """What ``MessageHub.load_state_dict`` keeps, and hooks read back."""
    from mmengine.logging import HistoryBuffer
    parts = ('log_scalars', 'runtime_info', 'resumed_keys')
    _expect(isinstance(hub, dict) and all(isinstance(hub.get(k), dict) and all(
        type(n) is str for n in hub[k]) for k in parts) and all(
        type(v) is HistoryBuffer for v in hub['log_scalars'].values()) and all(
        type(v) is bool for v in hub['resumed_keys'].values()),
        "its message_hub is not what mmengine saves (HistoryBuffers, runtime info and "
        "booleans by name)")
    def folder(path):
        return path.rsplit('/', 1)[0] if '://' in path else os.path.dirname(os.path.abspath(path))

    for key, value in hub['runtime_info'].items():
        if key in _COUNTS:
            ok, kind = _is_count(value), 'a non-negative int'
        elif key in _TEXTS:
            ok, kind = type(value) is str, 'a str'
        elif key == 'seed':
            ok, kind = value is None or type(value) is int, 'an int'
        elif key == 'keep_ckpt_ids':  # formatted into names of files CheckpointHook deletes
            ok = type(value) is list and all(map(_is_count, value))
            kind = 'a list of non-negative ints'
        elif key == 'eta' or key.startswith('best_score'):
            ok, kind = _is_real(value), 'a finite number'
        elif key.startswith('best_ckpt'):  # a file CheckpointHook deletes at the next best
            ok = type(value) is str and os.path.basename(value).startswith('best_') and (
                folder(value) == folder(source))
            kind = f'the name of a best_* file beside {source} (CheckpointHook deletes it)'
        else:
            continue
        _expect(ok, f'its message_hub runtime info {_brief(key)} is not {kind}')


def _optimizer(saved, wrapper, names, what):
    """``saved`` (an ``OptimWrapper`` state) checked against the built ``wrapper``, with its
    kernel flags."""
    built = wrapper.state_dict()
    optional = {'loss_scaler', 'base_param_settings'}
    _expect(type(saved) is dict and set(saved) - optional == set(built) - optional and (
        'base_param_settings' in saved) == ('base_param_settings' in built),
        f"its {what} state does not hold what mmengine saves of the config's: "
        f"{', '.join(built)}", True)
    groups, built_groups = saved['param_groups'], wrapper.optimizer.param_groups
    _expect(type(groups) is list and len(groups) == len(built_groups),
            f"its {what} has not the config's {len(built_groups)} parameter groups", True)
    param_of = {}  # the file's ids -> (parameter, its name, its group's flags), as torch maps
    for i, (group, built_group) in enumerate(zip(groups, built_groups)):
        ids, params = type(group) is dict and group.get('params'), built_group['params']
        flags = frozenset((k, v) for k, v in built_group.items() if type(v) is bool)
        _expect(type(ids) is list and len(ids) == len(params),
                f"its {what} group {i} has not the {len(params)} parameters the config gives "
                'it for this model', True)
        for n, (key, param) in enumerate(zip(ids, params)):
            _expect(type(key) is int and key not in param_of,
                    f'its {what} group {i} does not number its parameters one by one')
            param_of[key] = param, names.get(id(param), f'parameter {n} of group {i}'), flags
    resumed = dict(saved, param_groups=[
        dict(_settings(group, ref, f'{what} group {i}'), params=group['params'])
        for i, (group, ref) in enumerate(zip(groups, built['param_groups']))])
    if 'base_param_settings' in saved:
        resumed['base_param_settings'] = _settings(
            saved['base_param_settings'], built['base_param_settings'], f'{what} base settings')
    if built.get('loss_scaler') and 'loss_scaler' in saved:
        _like(saved['loss_scaler'], built['loss_scaler'], f'{what} loss scaler')
    state = saved['state']
    _expect(type(state) is dict and all(type(k) is int and k in param_of for k in state),
            f'its {what} state is not one state per parameter of its groups')
    kinds = {}  # the boolean settings of a group -> the names in its parameters' states
    for key, value in state.items():
        param, name, flags = param_of[key]
        _param_state(value, param, f'its {what} state of {name}')
        _expect(not value or kinds.setdefault(flags, set(value)) == set(value),
                f'its {what} state of {name} is not of the kind of the others')
    return resumed


def _settings(saved, built, what):
    """A parameter group (or mmengine's base settings) of the file, as the optimizer takes it:
    the config's settings of the config's kinds, ``initial_*`` (schedulers add them) finite
    numbers, the config's kernel flags; what is missing, the config's."""
    _expect(type(saved) is dict and all(type(k) is str for k in saved),
            f'its {what} is not settings by name')
    unknown = [k for k in saved if k not in built and not k.startswith('initial_')]
    _expect(not unknown, f"its {what} has {len(unknown)} settings the config's optimizer has "
            'not', True)
    for key, value in saved.items():
        if key in KERNEL_FLAGS or key == 'params' and type(built['params']) is list:
            continue  # the ids of a group's parameters are checked with the state
        if key in built:
            _like(value, built[key], f'{what} {key!r}')
        else:
            _expect(_is_real(value), f'its {what} {_brief(key)} is not a finite number')
    return dict(built, **{k: v for k, v in saved.items() if k not in KERNEL_FLAGS})


def _param_state(state, param, what):
    """One parameter's optimizer state: tensors of the parameter's shape and dtype (finite),
    a finite non-negative ``step``, other values plain numbers, booleans or None."""
    _expect(type(state) is dict and all(type(k) is str for k in state),
            f'{what} is not values by name')
    for key, value in state.items():
        if key == 'step':
            if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
                value = value.item()
            _expect(_is_real(value) and value >= 0,
                    f'{what} has a step that is not a finite non-negative number')
        elif isinstance(value, torch.Tensor):
            _expect(value.shape == param.shape and value.dtype == param.dtype,
                    f'{what} has {_describe(value)} for {key!r} where the parameter is '
                    f'{_describe(param.detach())}', True)
            _expect(not value.is_floating_point() or bool(torch.isfinite(value).all()),
                    f'{what} has values that are not finite for {key!r}')
        else:
            _expect(value is None or type(value) is bool or _is_real(value),
                    f'{what} has {_describe(value)} for {key!r}, not a tensor, a finite '
                    'number, a boolean or None')


def _like(value, ref, what):
    """``value`` is of the kind of ``ref`` (what the built object has): of its type (an int
    for a float too), its value for a boolean, string or None, finite numbers, sequences of
    its length, dicts of its keys, tensors of its shape and dtype."""
    if isinstance(ref, torch.Tensor):
        kind = isinstance(value, torch.Tensor) and value.dtype == ref.dtype
    else:
        kind = type(value) is type(ref) or type(ref) is float and type(value) is int
    data = (bool, str, type(None), int, float, list, tuple, dict, OrderedDict, Counter)
    _expect(kind and (isinstance(ref, torch.Tensor) or type(ref) in data),
            f"its {what} is {_describe(value)} where the config's is {_describe(ref)}")
    if isinstance(ref, (bool, str, type(None))):
        _expect(value == ref, f"its {what} is not the config's {ref!r}", True)
    elif isinstance(ref, (int, float)):
        _expect(type(value) is int or math.isfinite(value), f'its {what} is not finite')
    elif isinstance(ref, torch.Tensor):
        _expect(value.shape == ref.shape, f"its {what} is {_describe(value)} where the "
                f"config's is {_describe(ref)}", True)
        _expect(bool(torch.isfinite(value).all()), f'its {what} is not finite')
    elif isinstance(ref, dict):
        _expect(set(value) == set(ref), f"its {what} has other keys than the config's", True)
        for key in ref:
            _like(value[key], ref[key], f'{what}[{key!r}]')
    else:
        _expect(len(value) == len(ref), f"its {what} is {_describe(value)} where the config's "
                f'is {_describe(ref)}', True)
        for i, (v, r) in enumerate(zip(value, ref)):
            _like(v, r, f'{what}[{i}]')


def _check_schedulers(saved, built):
    """Each scheduler's state (``_ParamScheduler.load_state_dict`` updates its ``__dict__``
    with it): only the built scheduler's keys, of their kinds."""
    named = isinstance(built, dict)
    built, saved = (built, saved) if named else ({'': built}, {'': saved})
    _expect(type(saved) is dict and set(saved) == set(built),
            "its param_schedulers are not the config's", True)
    for name, schedulers in built.items():
        states, what = saved[name], 'param_schedulers' + (f' {name}' if named else '')
        _expect(type(states) is list and len(states) == len(schedulers),
                f"its {what} are not the config's {len(schedulers)}", True)
        for i, (state, scheduler) in enumerate(zip(states, schedulers)):
            ref = scheduler.state_dict()
            _expect(type(state) is dict and set(state) <= set(ref),
                    f'its {what}[{i}] is not a state of a {type(scheduler).__name__}', True)
            for key, value in state.items():
                _like(value, ref[key], f'{what}[{i}] {key!r}')
