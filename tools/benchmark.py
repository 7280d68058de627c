"""Latency and peak memory of the MetaFormer backbones against timm's ``features_only`` models,
alone or inside a whole mmdet Mask R-CNN / mmseg UperNet.

    python tools/benchmark.py [--task backbone|maskrcnn|upernet] [--models NAME ...]
        [--sizes 224 512x512 800x1333] [--batch N] [--device cpu|cuda] [--dtype fp32|bf16]
        [--channels-last] [--with-cp] [--modes forward train] [--repeats N] [--warmup N]
        [--threads N] [--no-memory] [--compile [--compile-backend NAME] [--compile-dynamic]]
        [--json OUT]

Both models hold the same weights (a timm model's state dict, loaded into ours through
``init_cfg``) and return the raw stage outputs; their largest output difference is recorded
for every case. Repetitions of ours and timm alternate (ABBA order) and the medians are
reported. Peak memory is the memory a step needs on top of the model and its input: on CUDA
from ``max_memory_allocated``, on CPU from the peak RSS of a new process per model (see
README, "Benchmark"). IdentityFormer and RandFormer have no timm model: ours only.

``--task maskrcnn`` / ``upernet``: the model of the project's COCO / ADE20K config for the arch,
with this project's backbone against the same model with ``mmpretrain.TIMMBackbone``
(``features_only``), all other weights copied; ``forward`` is a test forward (``predict``),
``train`` a training step (loss, backward) on a synthetic batch; no memory figures.

``--compile`` adds ours under ``torch.compile(fullgraph=True)``, timed side by side with ours
eager: compiled for each size, or with ``--compile-dynamic`` once for all sizes; in a whole
model its backbone is compiled in place (``model.backbone.compile(...)``), as the docs advise.
"""
import argparse
import copy
import functools
import importlib
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from typing import Optional

from common import add_debug_arg, run_tool  # first: it silences the stack's known warnings

import timm
import torch
import torch.nn as nn
from mmengine.logging import MMLogger
from safetensors.torch import save_file

from mmmetaformer.models import ARCHS, MetaFormer

MIB = 2**20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: --task: (scope, config of the arch) of the whole models.
DENSE_TASKS = {
    'maskrcnn': ('mmdet', 'configs/coco/mask-rcnn_{family}-{size}_fpn_1x_coco.py'),
    'upernet': ('mmseg', 'configs/ade20k/upernet_{family}-{size}_8xb2-160k_ade20k-512x512.py'),
}
#: glibc: serve every buffer of 64 KiB or more by mmap, so that freeing it lowers the RSS.
CHILD_ENV = dict(MALLOC_MMAP_THRESHOLD_='65536')


def parse_size(text: str):
    """``'224'`` -> (224, 224), ``'800x1333'`` -> (800, 1333) (height x width)."""
    parts = text.lower().split('x')
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f'size must be N or HxW, got {text!r}')
    return int(parts[0]), int(parts[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--task', default='backbone', choices=['backbone', *DENSE_TASKS],
                        help='the backbone alone, or inside a whole Mask R-CNN / UperNet')
    parser.add_argument('--models', nargs='+', default=['caformer_s18', 'convformer_s18'],
                        choices=list(ARCHS), metavar='NAME',
                        help='arch names (default: %(default)s)')
    parser.add_argument('--sizes', nargs='+', type=parse_size,
                        default=[(224, 224), (512, 512), (800, 1333)], metavar='HxW',
                        help='input sizes, N or HxW (default: 224 512x512 800x1333)')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        choices=['cpu', 'cuda'])
    parser.add_argument('--dtype', default='fp32', choices=['fp32', 'bf16'],
                        help='bf16: torch.autocast with bfloat16, fp32 weights')
    parser.add_argument('--channels-last', action='store_true',
                        help='input and models in channels_last memory format')
    parser.add_argument('--with-cp', action='store_true', help='activation checkpointing per block')
    parser.add_argument('--modes', nargs='+', default=['forward', 'train'],
                        choices=['forward', 'train'])
    parser.add_argument('--repeats', type=int, default=20, help='timed runs per model and mode')
    parser.add_argument('--warmup', type=int, default=3, help='untimed runs before them')
    parser.add_argument('--threads', type=int, default=_usable_cores(),
                        help='torch threads (default: usable cores, %(default)s)')
    parser.add_argument('--no-memory', action='store_true', help='skip peak memory')
    parser.add_argument('--compile', action='store_true',
                        help='also time ours under torch.compile, against ours eager')
    parser.add_argument('--compile-backend', default='inductor', metavar='NAME',
                        help='torch.compile backend (default: %(default)s; eager: Dynamo only)')
    parser.add_argument('--compile-dynamic', action='store_true',
                        help='one compile for all sizes (dynamic=True); default: one per size')
    parser.add_argument('--json', metavar='OUT', help='write the results to this JSON file')
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    if min(args.batch, args.repeats, args.threads) < 1 or args.warmup < 0:
        parser.error('--batch, --repeats and --threads must be >= 1, --warmup >= 0')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available')
    if args.task != 'backbone':
        missing = [name for name in args.models if not timm.is_model(name)
                   or not os.path.exists(dense_config(args.task, name))]
        if missing or args.with_cp:
            parser.error(f'--task {args.task}: no config or no timm model for {missing}'
                         if missing else f'--task {args.task}: --with-cp is for the backbone alone')
        args.no_memory = True
    return args


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


# --- models and steps ----------------------------------------------------------------------

def compile_settings(args) -> dict:
    """The ``torch.compile`` arguments of ``--compile``: one graph, static or dynamic sizes."""
    return dict(backend=args.compile_backend, fullgraph=True, dynamic=args.compile_dynamic)


def compile_model(model: nn.Module, args) -> nn.Module:
    return torch.compile(model, **compile_settings(args))


def build(impl: str, name: str, with_cp: bool, channels_last: bool, device, checkpoint=None,
          compile_args=None):
    """Ours (``out_norm=None``; ``compiled``: under :func:`compile_model`) or timm's
    ``features_only`` model, with ``checkpoint`` (a timm file) as weights if given; returns the
    model and what ``with_cp`` applied to timm."""
    applied = None
    if impl == 'compiled':
        model, _ = build('ours', name, with_cp, channels_last, device, checkpoint)
        return compile_model(model, compile_args), None
    if impl == 'ours':
        model = MetaFormer(arch=name, out_norm=None, with_cp=with_cp, init_cfg=dict(
            type='Pretrained', checkpoint=checkpoint) if checkpoint else None)
        if checkpoint:
            model.init_weights()
    else:
        weights = dict(pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint))
        model = timm.create_model(name, features_only=True, **(weights if checkpoint else {}))
        if with_cp:  # per block, like ours (the features wrapper's own switch is per stage)
            stages = [m for m in model.modules()
                      if m is not model and hasattr(m, 'set_grad_checkpointing')]
            for stage in stages:
                stage.set_grad_checkpointing(True)
            applied = f'per block: set_grad_checkpointing on {len(stages)} timm stages'
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, applied


def perturb(model: nn.Module) -> nn.Module:
    """Move the 1-D parameters (norms, biases, StarReLU) off their init values and the layer
    scales to 0.05-0.15 (PoolFormer's 1e-5 hides the blocks), so that every path of a block
    shows in the output check."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.rand(param.shape, generator=gen) - 0.5
            if 'layer_scale' in name:
                param.copy_(0.1 + 0.1 * noise)
            elif param.ndim == 1:
                param.add_(0.4 * noise)
    return model


def build_pair(args, name: str, device):
    """Ours and, where timm has ``name``, timm's model, both with the weights of a timm model
    (seed 0, perturbed), and with ``--compile`` ours compiled; and what ``--with-cp`` applied
    to timm's."""
    torch.manual_seed(0)
    if not timm.is_model(name):
        models = {'ours': build('ours', name, args.with_cp, args.channels_last, device)[0]}
        applied = None
    else:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = os.path.join(tmp, f'{name}.safetensors')
            save_file(perturb(timm.create_model(name)).state_dict(), checkpoint)
            ours, _ = build('ours', name, args.with_cp, args.channels_last, device, checkpoint)
            reference, applied = build('timm', name, args.with_cp, args.channels_last, device,
                                       checkpoint)
        models = {'ours': ours, 'timm': reference}
    if args.compile:
        models['compiled'] = compile_model(models['ours'], args)
    return models, applied


def make_input(args, size, device):
    x = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    return x.to(memory_format=torch.channels_last) if args.channels_last else x


def autocast(device_type: str, dtype: str):
    if dtype == 'bf16':
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return nullcontext()


def make_step(model, x, mode: str, dtype: str):
    """One inference (eval, inference mode) or training step (train, forward + backward of
    the sum of the outputs' means; the gradients are freed after it, as ``zero_grad`` would
    after the optimizer step, so that the model holds none between steps)."""
    def forward():
        with torch.inference_mode(), autocast(x.device.type, dtype):
            model(x)

    def train():
        with autocast(x.device.type, dtype):
            loss = sum(out.float().mean() for out in model(x))
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.train(mode == 'train')
    return forward if mode == 'forward' else train


# --- whole detectors and segmentors (--task) ------------------------------------------------

def dense_config(task: str, name: str) -> str:
    family, size = name.rsplit('_', 1)
    return os.path.join(ROOT, DENSE_TASKS[task][1].format(family=family, size=size))


def build_dense(task: str, name: str, backbone: dict) -> nn.Module:
    """The model of the project's ``task`` config for ``name`` with ``backbone`` (on CPU,
    SyncBN as BN)."""
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    scope = DENSE_TASKS[task][0]
    cfg = Config.fromfile(dense_config(task, name))
    cfg.model.backbone = backbone
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry').MODELS
    return revert_sync_batchnorm(registry.build(cfg.model))


def build_dense_pair(args, name: str, device) -> dict:
    """Ours and the peer, ``mmpretrain.TIMMBackbone(features_only=True)``, in the ``--task``
    model: both backbones load one timm file (seed 0, perturbed), every other weight is copied
    from ours. TIMMBackbone returns the raw stage outputs, so ours runs with ``out_norm=None``
    (the output norms, a few elementwise ops, are left out of both). With ``--compile``, a copy
    of ours with its backbone compiled in place."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, f'{name}.safetensors')
        save_file(perturb(timm.create_model(name)).state_dict(), checkpoint)
        ours = build_dense(args.task, name, dict(
            type='mmmetaformer.MetaFormer', arch=name, out_norm=None,
            init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))
        ours.init_weights()
        peer = build_dense(args.task, name, dict(
            type='mmpretrain.TIMMBackbone', model_name=name, features_only=True,
            pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint)))
    heads = {k: v for k, v in ours.state_dict().items() if not k.startswith('backbone.')}
    missing, unexpected = peer.load_state_dict(heads, strict=False)
    if unexpected or not all(key.startswith('backbone.') for key in missing):
        raise RuntimeError(f'{args.task} {name}: the peer model differs outside the backbone: '
                           f'{unexpected or missing}')
    # timm's features_only MetaFormers return NHWC tensors seen as NCHW (channels_last
    # strides); mmcv 2.1's CPU RoIAlign reads those wrongly (0.94 max error on randn), so the
    # peer's features are made contiguous, as a correct pipeline needs
    peer.backbone.register_forward_hook(
        lambda module, args, outputs: tuple(o.contiguous() for o in outputs))
    models = {'ours': ours, 'timm': peer}
    if args.compile:
        models['compiled'] = copy.deepcopy(ours)
        models['compiled'].backbone.compile(**compile_settings(args))
    for model in models.values():
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
    return models


def dense_batch(task: str, size, batch: int) -> dict:
    """A synthetic batch of the data loader's form: random images with 5 random boxes and
    masks (``maskrcnn``, 80 classes) or a random label map (``upernet``, 150 classes)."""
    if task == 'maskrcnn':
        from mmdet.testing import demo_mm_inputs
        torch.manual_seed(0)
        return demo_mm_inputs(batch, [(3, *size)] * batch, num_items=[5] * batch,
                              num_classes=80, with_mask=True)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    gen = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 256, (3, *size), generator=gen, dtype=torch.uint8))
        sample = SegDataSample(metainfo=dict(img_shape=size, ori_shape=size, pad_shape=size))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, *size), generator=gen))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def make_dense_step(model, batch: dict, mode: str, dtype: str):
    """A test forward (eval, inference mode, ``predict``) or a training step (``loss``,
    backward of the summed losses, gradients freed) of a whole model on ``batch``."""
    data = model.data_preprocessor(copy.deepcopy(batch), mode == 'train')
    device_type = data['inputs'].device.type

    def forward():
        with torch.inference_mode(), autocast(device_type, dtype):
            model(**data, mode='predict')

    def train():
        with autocast(device_type, dtype):
            loss, _ = model.parse_losses(model(**data, mode='loss'))
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.train(mode == 'train')
    return forward if mode == 'forward' else train


def case_steps(args, models: dict, size, device):
    """For one size: a function ``model -> outputs`` to compare (backbone: the stage outputs;
    whole models: ``extract_feat``) and a function ``(model, mode) -> step``."""
    if args.task == 'backbone':
        x = make_input(args, size, device)
        return (lambda m: m(x)), lambda model, mode: make_step(model, x, mode, args.dtype)
    batch = dense_batch(args.task, size, args.batch)
    inputs = models['ours'].data_preprocessor(copy.deepcopy(batch), False)['inputs']
    return ((lambda m: m.extract_feat(inputs)),
            lambda model, mode: make_dense_step(model, batch, mode, args.dtype))


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed_ms(step, device) -> float:
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def time_interleaved(steps: dict, device, warmup: int, repeats: int) -> dict:
    """Timings (ms) per implementation, runs alternating in ABBA order."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            times[name].append(timed_ms(steps[name], device))
    return times


def max_abs_diff(ours, reference, outputs) -> Optional[float]:
    """Largest difference of ``outputs(model)`` (a sequence of tensors) in eval mode and
    inference mode (as the ``forward`` steps run, which a compiled model then reuses); the
    models' train/eval modes are restored."""
    if reference is None:
        return None
    modes = ours.training, reference.training
    ours.eval()
    reference.eval()
    with torch.inference_mode():
        pairs = zip(outputs(ours), outputs(reference))
        diff = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
    ours.train(modes[0])
    reference.train(modes[1])
    return diff


# --- peak memory ---------------------------------------------------------------------------

def cuda_peak_mib(step, device) -> float:
    """Peak memory allocated during one (warm) step on top of what is allocated before it."""
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MIB


def _status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS mark (VmHWM) to the current RSS; False where impossible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def rss_peak_mib(step) -> float:
    """Peak RSS during one step above the RSS before it, in this process: after a warm-up
    step, VmHWM after the step minus VmRSS before it, with VmHWM reset in between."""
    if not _reset_peak_rss():  # e.g. not Linux: only growth beyond every earlier peak shows
        scale = 1 if sys.platform == 'darwin' else 1024  # ru_maxrss: bytes on macOS, else KiB
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * scale / MIB
    step()
    base = _status_kib('VmRSS')
    _reset_peak_rss()
    step()
    return (_status_kib('VmHWM') - base) / 1024


def memory_child(spec: dict) -> dict:
    """Peak RSS per mode of one implementation and case, measured in this new process."""
    args = argparse.Namespace(**spec)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device('cpu')
    model, _ = build(args.impl, args.model, args.with_cp, args.channels_last, device,
                     compile_args=args)
    x = make_input(args, tuple(args.size), device)
    return {mode: rss_peak_mib(make_step(model, x, mode, args.dtype)) for mode in args.modes}


@functools.lru_cache(maxsize=None)
def fresh_processes():
    """Processes forked from a server that has only imported this tool (a new interpreter each
    time would import torch, timm and the stack again), under glibc's ``CHILD_ENV``."""
    os.environ.update(CHILD_ENV)  # read by glibc when the server starts; its forks inherit it
    context = multiprocessing.get_context('forkserver')
    context.set_forkserver_preload(['torch', 'timm', 'mmmetaformer', '__main__'])
    return context


def cpu_peaks(args, impl: str, name: str, size) -> dict:
    """:func:`memory_child` in a new process (:func:`fresh_processes`), so that neither the
    other implementation nor earlier cases leave memory (allocator caches) behind."""
    spec = dict(impl=impl, model=name, size=size, batch=args.batch, dtype=args.dtype,
                channels_last=args.channels_last, with_cp=args.with_cp, modes=args.modes,
                threads=args.threads, compile_backend=args.compile_backend,
                compile_dynamic=args.compile_dynamic)
    with ProcessPoolExecutor(1, mp_context=fresh_processes(), max_tasks_per_child=1) as pool:
        try:
            return pool.submit(memory_child, spec).result()
        except Exception as err:
            raise RuntimeError(f'memory measurement of {impl} {name} {size} failed: '
                               f'{type(err).__name__}: {err}') from err


# --- report --------------------------------------------------------------------------------

def machine_info(args, device) -> dict:
    cpu = platform.processor() or platform.machine()
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f
                        if line.startswith('model name')), cpu)
    cpu_memory = ('peak RSS above the pre-step RSS (VmHWM reset by /proc/self/clear_refs)'
                  if _reset_peak_rss() else 'ru_maxrss after minus before the step')
    return dict(cpu=cpu, cores=os.cpu_count(), usable_cores=_usable_cores(), threads=args.threads,
                python=platform.python_version(), platform=platform.platform(),
                torch=torch.__version__, timm=timm.__version__, cuda=torch.version.cuda,
                cuda_device=torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
                memory_method=None if args.no_memory else
                'torch.cuda.max_memory_allocated above memory_allocated before the step'
                if device.type == 'cuda' else f'new process per model and size: {cpu_memory}')


def make_record(args, name, size, mode, times, peaks, diffs, timm_with_cp,
                compiled_first_s=None) -> dict:
    """The JSON record of one (model, size, mode); ratios are ours / timm and compiled / ours
    of the rounded figures, None where timm has no model or nothing was compiled (or memory
    was not measured). ``diffs``: the largest output difference of timm and of the compiled
    model to ours."""
    def ms(impl):
        return round(statistics.median(times[impl]), 3) if impl in times else None

    def mib(impl):
        peak = peaks.get(impl, {}).get(mode)
        return None if peak is None else round(peak, 2)

    def ratio(a, b):
        return round(a / b, 4) if a is not None and b else None

    return dict(task=args.task, model=name, size=f'{size[0]}x{size[1]}', mode=mode,
                batch=args.batch,
                device=args.device, dtype=args.dtype, channels_last=args.channels_last,
                with_cp=args.with_cp, timm_with_cp=timm_with_cp,
                ours_ms=ms('ours'), timm_ms=ms('timm'), ratio=ratio(ms('ours'), ms('timm')),
                ours_peak_mib=mib('ours'), timm_peak_mib=mib('timm'),
                mem_ratio=ratio(mib('ours'), mib('timm')), max_abs_diff=diffs.get('timm'),
                compiled_ms=ms('compiled'), compiled_ratio=ratio(ms('compiled'), ms('ours')),
                compiled_first_s=None if compiled_first_s is None else round(compiled_first_s, 3),
                compiled_peak_mib=mib('compiled'), compiled_max_abs_diff=diffs.get('compiled'),
                repeats=args.repeats, warmup=args.warmup,
                **{f'{impl}_samples_ms': [round(t, 3) for t in times[impl]] if impl in times
                   else None for impl in IMPLS})


#: The implementations a record can hold: ours, timm's, ours under torch.compile.
IMPLS = ('ours', 'timm', 'compiled')


#: Table columns: title, width, record field, format of a number (text is left-aligned).
COLUMNS = [('model', 18, 'model', ''), ('size', 9, 'size', ''), ('mode', 7, 'mode', ''),
           ('ours ms', 10, 'ours_ms', '.2f'), ('timm ms', 10, 'timm_ms', '.2f'),
           ('ratio', 6, 'ratio', '.3f'), ('ours MiB', 9, 'ours_peak_mib', '.1f'),
           ('timm MiB', 9, 'timm_peak_mib', '.1f'), ('mem ratio', 9, 'mem_ratio', '.3f'),
           ('max diff', 8, 'max_abs_diff', '.1e')]
#: The columns added by --compile.
COMPILED_COLUMNS = [('compiled ms', 11, 'compiled_ms', '.2f'),
                    ('vs eager', 8, 'compiled_ratio', '.3f'),
                    ('first s', 7, 'compiled_first_s', '.1f'),
                    ('comp MiB', 9, 'compiled_peak_mib', '.1f'),
                    ('comp diff', 9, 'compiled_max_abs_diff', '.1e')]


def table_row(record=None, compiled: bool = False) -> str:
    """The header, or the line of ``record``; ``compiled``: with :data:`COMPILED_COLUMNS`."""
    cells = []
    for title, width, key, fmt in COLUMNS + (COMPILED_COLUMNS if compiled else []):
        if record is None:
            cells.append(title.rjust(width) if fmt else title.ljust(width))
        elif not fmt:
            cells.append(str(record[key]).ljust(width))
        else:
            value = record[key]
            cells.append(('-' if value is None else format(value, fmt)).rjust(width))
    return '  '.join(cells)


#: A case whose timed samples spread wider than this (max / min) gets a warning.
SPREAD_LIMIT = 1.3


def spread_warning(record: dict) -> Optional[str]:
    """A warning line when the samples of a record spread wider than :data:`SPREAD_LIMIT`."""
    spreads = {impl: max(samples) / min(samples) for impl in IMPLS
               if (samples := record.get(f'{impl}_samples_ms'))}
    wide = ', '.join(f'{impl} {spread:.2f}' for impl, spread in spreads.items()
                     if spread > SPREAD_LIMIT)
    if not wide:
        return None
    return (f"warning: {record['model']} {record['size']} {record['mode']}: the samples spread "
            f'widely (max/min {wide} > {SPREAD_LIMIT}): other work shared the machine. For a '
            'quiet measurement stop other programs, pin the run to idle cores (taskset -c, '
            'with --threads at most their number) and raise --warmup and --repeats')


def progress(text: str):
    """A progress line on stderr (the table on stdout stays clean)."""
    print(text, file=sys.stderr, flush=True)


def run(args) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    MMLogger.get_instance('benchmark', log_level='WARNING')  # keep the table free of load logs
    result = dict(machine=machine_info(args, device),
                  settings=dict(vars(args), sizes=[f'{h}x{w}' for h, w in args.sizes]),
                  records=[])
    print(table_row(compiled=args.compile), flush=True)
    total, number = len(args.models) * len(args.sizes), 0
    for name in args.models:
        progress(f'{name}: building the models')
        models, timm_with_cp = (build_pair(args, name, device) if args.task == 'backbone'
                                else (build_dense_pair(args, name, device), None))
        for size in args.sizes:
            number += 1
            case = f'[{number}/{total}] {name} {size[0]}x{size[1]}'
            outputs, step_of = case_steps(args, models, size, device)
            diffs = {'timm': max_abs_diff(models['ours'], models.get('timm'), outputs)}
            peaks = {}
            if not args.no_memory and device.type == 'cpu':
                progress(f'{case}: peak memory, a new process per model')
                peaks = {impl: cpu_peaks(args, impl, name, size) for impl in models}
            for mode in args.modes:
                progress(f'{case} {mode}: {args.warmup} + {args.repeats} runs of '
                         f'{" and ".join(models)}')
                steps = {impl: step_of(m, mode) for impl, m in models.items()}
                first_s = None
                if 'compiled' in steps:  # compiles at the first size of each mode
                    first_s = timed_ms(steps['compiled'], device) / 1e3
                    if 'compiled' not in diffs:
                        diffs['compiled'] = max_abs_diff(models['ours'], models['compiled'],
                                                         outputs)
                times = time_interleaved(steps, device, args.warmup, args.repeats)
                if not args.no_memory and device.type == 'cuda':
                    for impl, step in steps.items():
                        peaks.setdefault(impl, {})[mode] = cuda_peak_mib(step, device)
                record = make_record(args, name, size, mode, times, peaks, diffs, timm_with_cp,
                                     first_s)
                result['records'].append(record)
                print(table_row(record, args.compile), flush=True)
                if spread_warning(record):
                    progress(spread_warning(record))
                if args.json:  # rewritten after every record: a long run keeps what it measured
                    with open(args.json, 'w') as f:
                        json.dump(result, f, indent=1)
    return result


def main(argv=None):
    run(parse_args(argv))


if __name__ == '__main__':
    run_tool(main)
