"""One command that checks the GPU path and prints one table.

    python tools/gpu_check.py [--device cuda|cpu] [--json OUT]

Rows: CUDA vs CPU features of one model per family (fp32, TF32 off); fp16 and bf16 autocast
outputs finite and close to fp32; one mixed-precision training step of a Mask R-CNN and an
UperNet with the optimizer wrapper of ``tools/train.py --amp``; the SDPA backend that
CAFormer's attention runs on; ours vs timm latency and peak memory (``tools/benchmark.py``);
the memory saved by activation checkpointing; ours under ``torch.compile`` against ours eager
at two sizes (``tools/benchmark.py --compile``). Exit status 1 if a check fails.

Without a CUDA device it prints one line and exits 0. ``--device cpu`` runs the same checks
on CPU at small sizes (a dry run of the table; parity is then CPU against CPU).
"""
import argparse
import contextlib
import io
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
benchmark = None  # tools/benchmark.py, imported by main() once a device is there

FAMILY_MODELS = ('poolformer_s12', 'poolformerv2_s12', 'identityformer_s12', 'randformer_s12',
                 'convformer_s18', 'caformer_s18')
#: Per device: input size of the model checks, (batch, size) of the whole models and of the
#: benchmark (batch >= 2: UperNet's pooling branch has a BatchNorm over 1x1 maps), repeats;
#: the torch.compile backend and two sizes (not square: with dynamic sizes the first size's
#: equal height and width would share one symbol, and a later size compile again).
SETTINGS = {'cuda': dict(size=(224, 224), dense=(2, (512, 512)), repeats=10, warmup=3,
                         compile_backend='inductor', compile_sizes=((512, 640), (640, 896))),
            'cpu': dict(size=(64, 64), dense=(2, (96, 96)), repeats=2, warmup=1,
                        compile_backend='eager', compile_sizes=((64, 96), (96, 128)))}
#: Largest difference to the fp32 output, relative to its largest value: fp32 across devices
#: (different kernels, TF32 off), and the autocast dtypes (8 and 11 bits of mantissa, rounding
#: accumulated over the blocks).
TOLERANCE = {'fp32': 1e-4, 'fp16': 2e-2, 'bf16': 1e-1}
DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}
#: SDPA kernels by their ATen op, as the profiler names them.
SDPA_OPS = {'_scaled_dot_product_flash_attention_for_cpu': 'flash (CPU)',
            '_scaled_dot_product_flash_attention': 'flash',
            '_scaled_dot_product_efficient_attention': 'memory-efficient',
            '_scaled_dot_product_cudnn_attention': 'cuDNN',
            '_scaled_dot_product_attention_math': 'math'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'],
                        help='cpu: a dry run of the checks at small sizes')
    parser.add_argument('--json', metavar='OUT', help='write the rows to this JSON file')
    return parser.parse_args(argv)


def row(check: str, ok, detail: str) -> dict:
    """A table row; ``ok`` None for a figure that is reported, not checked."""
    return dict(check=check, status='info' if ok is None else 'ok' if ok else 'FAIL',
                detail=detail)


def relative_error(outputs, reference):
    """(all finite, largest difference / largest reference value) over the feature maps."""
    finite = all(bool(torch.isfinite(out).all()) for out in outputs)
    scale = max(ref.abs().max().item() for ref in reference)
    error = max((out.float() - ref).abs().max().item() for out, ref in zip(outputs, reference))
    return finite, error / max(scale, 1e-12)


def build_model(name: str):
    from mmmetaformer.models import MetaFormer
    torch.manual_seed(0)
    model = MetaFormer(arch=name)
    model.init_weights()
    return benchmark.perturb(model).eval()


@torch.no_grad()
def model_checks(device, size) -> list:
    """Per family: device vs CPU in fp32 (TF32 off), and fp16 / bf16 autocast vs fp32 on the
    device."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _model_checks(device, size)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _model_checks(device, size) -> list:
    rows = []
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    for name in FAMILY_MODELS:
        model = build_model(name)
        cpu = [out.float() for out in model(x)]
        model.to(device)
        reference = [out.float() for out in model(x.to(device))]
        finite, error = relative_error([out.cpu() for out in reference], cpu)
        rows.append(row(f'parity {name}', finite and error <= TOLERANCE['fp32'],
                        f'{device.type} vs cpu fp32: max diff {error:.1e} of max |feature|'))
        for dtype, torch_dtype in DTYPES.items():
            if device.type == 'cuda' and dtype == 'bf16' and not torch.cuda.is_bf16_supported():
                rows.append(row(f'{dtype} autocast {name}', None, 'not supported by this GPU'))
                continue
            with torch.autocast(device.type, dtype=torch_dtype):
                outputs = model(x.to(device))
            finite, error = relative_error(outputs, reference)
            rows.append(row(f'{dtype} autocast {name}', finite and error <= TOLERANCE[dtype],
                            f'finite: {finite}, max diff {error:.1e} of max |feature| '
                            f'(tolerance {TOLERANCE[dtype]:g})'))
    return rows


def amp_train_checks(device, batch: int, size) -> list:
    """One training step of each whole model with the optimizer wrapper of ``--amp``."""
    from mmengine.optim import build_optim_wrapper

    from mmmetaformer.engine import amp_optim_wrapper
    rows = []
    for task in benchmark.DENSE_TASKS:
        torch.manual_seed(0)
        model = benchmark.build_dense(task, 'caformer_s18', dict(type='mmmetaformer.CAFormer'))
        model.init_weights()
        model.to(device).train()
        cfg, chosen = amp_optim_wrapper(
            dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4)), device.type)
        optim_wrapper = build_optim_wrapper(model, cfg)
        log_vars = model.train_step(benchmark.dense_batch(task, size, batch), optim_wrapper)
        loss = log_vars['loss'].item()
        params_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        scaler = getattr(optim_wrapper, 'loss_scaler', None)
        scale = f', loss scale {scaler.get_scale():g}' if scaler is not None else ''
        rows.append(row(f'amp train step {task}', math.isfinite(loss) and params_finite,
                        f'{chosen.split(": ", 1)[1]}; caformer_s18, {batch}x{size[0]}x{size[1]}: '
                        f'loss {loss:.3f}{scale}, weights finite: {params_finite}'))
    return rows


def sdpa_ops(model, x, dtype) -> set:
    """The SDPA kernels (:data:`SDPA_OPS`) that a forward of ``model`` runs."""
    from torch.profiler import ProfilerActivity, profile
    context = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with torch.no_grad(), context, profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    names = {event.name.removeprefix('aten::') for event in prof.events()}
    return {label for op, label in SDPA_OPS.items() if op in names}


def sdpa_check(device, size) -> list:
    """The kernel CAFormer's attention runs on per dtype, and which kernels accept its shapes
    (each forced with ``sdpa_kernel``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = build_model('caformer_s18').to(device)
    x = torch.randn(1, 3, *size, device=device)
    used = {name: sdpa_ops(model, x, dtype) for name, dtype in
            [('fp32', None), *DTYPES.items()]}
    tokens = (size[0] // 16) * (size[1] // 16)
    q = torch.randn(1, model.dims[2] // 32, tokens, 32, device=device,
                    dtype=torch.float16 if device.type == 'cuda' else torch.float32)
    accepted = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            accepted.append(backend.name.lower())
        except RuntimeError:
            pass
    detail = ', '.join(f'{dtype}: {"/".join(sorted(ops)) or "none"}' for dtype, ops in used.items())
    return [row('sdpa backend caformer_s18', None,
                f'{detail}; forced, {q.dtype} accepted by: {", ".join(accepted)}')]


def benchmark_rows(device, settings) -> list:
    """``tools/benchmark.py`` ours vs timm (fp32 and bf16), then ``--with-cp`` memory."""
    batch, size = settings['dense']
    common = ['--device', device.type, '--models', 'caformer_s18', 'convformer_s18',
              '--sizes', f'{size[0]}x{size[1]}', '--batch', str(batch),
              '--repeats', str(settings['repeats']), '--warmup', str(settings['warmup'])]
    rows, plain = [], None
    for extra in ([], ['--dtype', 'bf16'], ['--with-cp', '--modes', 'train']):
        with contextlib.redirect_stdout(io.StringIO()):
            records = benchmark.run(benchmark.parse_args(common + extra))['records']
        if '--with-cp' in extra:
            for cp in records:
                base = next(r for r in plain if (r['model'], r['mode']) == (cp['model'], 'train'))
                rows.append(row(f'with_cp memory {cp["model"]}', None,
                                f'train {cp["size"]} batch {batch}: ours '
                                f'{base["ours_peak_mib"]:.0f} -> {cp["ours_peak_mib"]:.0f} MiB, '
                                f'timm {base["timm_peak_mib"]:.0f} -> '
                                f'{cp["timm_peak_mib"]:.0f} MiB'))
            continue
        plain = plain or records
        for r in records:
            rows.append(row(f'latency {r["model"]} {r["dtype"]} {r["mode"]}', None,
                            f'{r["size"]} batch {batch}: ours {r["ours_ms"]:.1f} ms, timm '
                            f'{r["timm_ms"]:.1f} ms, ratio {r["ratio"]:.2f}; peak ours '
                            f'{r["ours_peak_mib"]:.0f} MiB, timm {r["timm_peak_mib"]:.0f} MiB'))
    return rows


def compile_rows(device, settings) -> list:
    """``tools/benchmark.py --compile``: ours compiled against ours eager, fp32, compiled for
    each size, then once for both (``--compile-dynamic``, forward and training steps apart:
    the first compiled step at the second size shows whether it compiled again). A run that
    fails gives a FAIL row with its error."""
    batch = settings['dense'][0]
    common = ['--device', device.type, '--models', 'caformer_s18', 'convformer_s18',
              '--sizes', *(f'{h}x{w}' for h, w in settings['compile_sizes']),
              '--batch', str(batch), '--repeats', str(settings['repeats']),
              '--warmup', str(settings['warmup']), '--compile',
              '--compile-backend', settings['compile_backend']]
    rows = []
    for kind, modes in (('static', ['forward', 'train']), ('dynamic', ['forward']),
                        ('dynamic', ['train'])):
        extra = ['--modes', *modes] + (['--compile-dynamic'] if kind == 'dynamic' else [])
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                records = benchmark.run(benchmark.parse_args(common + extra))['records']
        except Exception as err:  # a compiler's error is what the row reports
            message = (str(err).strip().splitlines() or [''])[0]
            rows.append(row(f'compile {kind} {" ".join(modes)}', False,
                            f'{type(err).__name__}: {message}'[:300]))
            continue
        for r in records:
            memory = ('' if r['ours_peak_mib'] is None else
                      f'; peak eager {r["ours_peak_mib"]:.0f} MiB, compiled '
                      f'{r["compiled_peak_mib"]:.0f} MiB')
            rows.append(row(f'compile {kind} {r["model"]} {r["mode"]} {r["size"]}', None,
                            f'batch {batch}, {settings["compile_backend"]}: eager '
                            f'{r["ours_ms"]:.1f} ms, compiled {r["compiled_ms"]:.1f} ms, ratio '
                            f'{r["compiled_ratio"]:.2f}; first compiled step '
                            f'{r["compiled_first_s"]:.1f} s; max diff '
                            f'{r["compiled_max_abs_diff"]:.1e}{memory}'))
    return rows


def print_table(rows):
    width = max(len(r['check']) for r in rows)
    print(f'{"check".ljust(width)}  status  detail')
    for r in rows:
        print(f'{r["check"].ljust(width)}  {r["status"].ljust(6)}  {r["detail"]}')


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        print(f'gpu_check: skipped, no CUDA device (torch {torch.__version__}, '
              f'CUDA build {torch.version.cuda})')
        return 0
    global benchmark
    import benchmark
    from mmengine.logging import MMLogger
    MMLogger.get_instance('gpu_check', log_level='WARNING')
    device = torch.device(args.device)
    settings = SETTINGS[device.type]
    rows = []
    for title, check in [
            ('models', lambda: model_checks(device, settings['size'])),
            ('amp training', lambda: amp_train_checks(device, *settings['dense'])),
            ('sdpa', lambda: sdpa_check(device, settings['size'])),
            ('benchmark', lambda: benchmark_rows(device, settings)),
            ('compile', lambda: compile_rows(device, settings))]:
        benchmark.progress(f'gpu_check: {title}')
        rows += check()
    print_table(rows)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(device=torch.cuda.get_device_name(device) if device.type == 'cuda'
                           else 'cpu', torch=torch.__version__, rows=rows), f, indent=1)
    return int(any(r['status'] == 'FAIL' for r in rows))


if __name__ == '__main__':
    sys.exit(main())
