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
The stand-ins answer only the thread whose load bound them. The config text a Runner
checkpoint may carry (``meta['config']``, which mmengine's ``Runner.resume`` executes) is
reduced to its ``gpu_ids`` by :func:`inert_config`, read without running anything.
"""
import ast
import contextlib
import contextvars
import math
import pickle
import re
import shlex
import threading
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
            f'cannot read {source}: it is not a checkpoint (neither a PyTorch file nor '
            f'safetensors; it starts with {head!r})' if head else
            f'cannot read {source}: the file is empty')
    try:
        return inert(lambda: torch.load(path, map_location=map_location, weights_only=True),
                     source, str(path))
    except RefusedCheckpoint:
        raise
    except Exception as err:
        raise CheckpointError(unreadable(source, err)) from err


def unreadable(source, err) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ''
    return (f'cannot read {source}: it is not a complete PyTorch or safetensors checkpoint '
            f'({type(err).__name__}: {first}). The file may be truncated (an interrupted '
            'download?): download it again.')


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
