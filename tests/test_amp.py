"""Mixed precision: float16 autocast where a naive float16 path overflows (a block of every
family, against its float32 result and timm's block), StarReLU's float16 gradients against the
formula, the optimizer wrapper of ``tools/train.py --amp``, and one epoch of ``--amp`` training
of the demo Mask R-CNN on CPU (bfloat16)."""
import json
import os
from pathlib import Path

import pytest
import timm
import torch

import interpreter
from mmmetaformer.checkpoints import convert_to_canonical
from mmmetaformer.engine import AutocastOptimWrapper, amp_optim_wrapper
from mmmetaformer.models import MetaFormer
from mmmetaformer.models.layers import FP16_HIDDEN_LIMIT, StarReLU
from mmmetaformer.models.mixers import Attention, Pooling

ROOT = Path(__file__).resolve().parents[1]
FP16_MAX = torch.finfo(torch.float16).max
#: Allowed difference to float32, relative to the largest value: float16 rounds to 2**-11
#: relative; sums over a few hundred terms and the norms put the error at a few 1e-3. Plus
#: float16's smallest normal number, 2**-14: smaller values (tiny gradients) underflow, which
#: is what loss scaling is for, not what is tested here.
FP16_TOLERANCE = 1e-2
FP16_TINY = 2.0**-14
#: Gradients of weights are sums over every position of products of float16 values, with
#: cancellation: a few times more. Checked: the gradients that flow through StarReLU (the
#: input's and those of the layers before it). Not compared: StarReLU's scalars s and b (sums
#: over the whole hidden tensor, mostly cancelling; compared with the formula in their own
#: test), and the weights of the layers that take the hidden (fc2, dwconv, pwconv2), whose
#: float16 weight gradients are products of the ~1e5 hidden with the output gradient, summed
#: over positions by the backend's float16 convolution: they overflow on CPU, in timm alike.
GRAD_TOLERANCE = 5e-2
HIDDEN_CONSUMERS = ('mlp.fc2.', 'token_mixer.dwconv.', 'token_mixer.pwconv2.')
#: family: (arch, stage whose first block is tested: the family's token mixer)
FAMILY_BLOCKS = {'poolformer': ('poolformer_s12', 0), 'poolformerv2': ('poolformerv2_s12', 0),
                 'identityformer': ('identityformer_s12', 0), 'randformer': ('randformer_s12', 2),
                 'convformer': ('convformer_s18', 0), 'caformer': ('caformer_s18', 2)}
#: Weight gains that push a block's activations past float16's range: the MLP's and SepConv's
#: hidden pre-activations reach several hundred (their square, 1e5-1e6, overflows), the inputs
#: of the parameter-free mixers (pooling, identity, random mixing) ~1e4; the output layers are
#: scaled down so that the block's float32 output stays representable.
GAIN = dict(hidden=1000., out=1e-4, norm=3000.)


def amplify(block):
    """Scale ``block``'s weights by :data:`GAIN` (ours and timm's: same parameter names)."""
    params = dict(block.named_parameters())
    with torch.no_grad():
        for name, factor in [('mlp.fc1.weight', GAIN['hidden']), ('mlp.fc2.weight', GAIN['out']),
                             ('token_mixer.pwconv1.weight', GAIN['hidden']),
                             ('token_mixer.pwconv2.weight', GAIN['out'])]:
            if name in params:
                params[name].mul_(factor)
        if not any(n.startswith('token_mixer.') and p.requires_grad for n, p in params.items()):
            params['norm1.weight'].mul_(GAIN['norm'])
    return block


def family_blocks(family: str):
    """Our block and, where timm has the model, timm's, holding the same weights (timm's random
    init with the 1-D parameters moved off their init values), amplified."""
    arch, stage = FAMILY_BLOCKS[family]
    torch.manual_seed(0)
    ours = MetaFormer(arch=arch, out_norm=None)
    if not timm.is_model(arch):
        ours.init_weights()
        return amplify(ours.stages[stage].blocks[0]), None
    reference = timm.create_model(arch)
    with torch.no_grad():
        for param in reference.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.rand(param.shape) - 0.1)
    state, _ = convert_to_canonical(reference.state_dict())
    ours.load_state_dict({key[len('backbone.'):]: value for key, value in state.items()
                          if key.startswith('backbone.')})
    return amplify(ours.stages[stage].blocks[0]), amplify(reference.stages[stage].blocks[0])


def run_block(block, x, timm_layout: bool, fp16: bool, grad_out=None):
    """The block's output on a channels-last ``x`` (timm's blocks take NCHW, or tokens in the
    attention stages), and with ``grad_out`` the gradient of ``x`` and of every parameter."""
    x = x.clone().requires_grad_(grad_out is not None)
    block.zero_grad(set_to_none=True)
    B, H, W, C = x.shape
    with torch.autocast('cpu', dtype=torch.float16, enabled=fp16):
        if not timm_layout:
            out = block(x)
        elif hasattr(block.token_mixer, 'qkv'):
            out = block(x.reshape(B, H * W, C)).reshape(B, H, W, C)
        else:
            out = block(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    out = out.float()
    if grad_out is None:
        return out.detach(), {}
    out.backward(grad_out)
    grads = {'input': x.grad, **{name: p.grad for name, p in block.named_parameters()}}
    return out.detach(), grads


def check_close(fp16, fp32, what, tolerance=FP16_TOLERANCE):
    """``fp16`` finite wherever ``fp32`` is finite and representable in float16, and there
    within ``tolerance`` of it; returns how many elements were representable."""
    representable = torch.isfinite(fp32) & (fp32.abs() < FP16_MAX)
    assert torch.isfinite(fp16[representable]).all(), f'{what}: float16 overflow'
    if representable.any():
        error = (fp16 - fp32)[representable].abs().max().item()
        bound = tolerance * fp32[representable].abs().max().item() + FP16_TINY
        assert error <= bound, (what, error)
    return int(representable.sum())


@pytest.mark.parametrize('family', list(FAMILY_BLOCKS))
def test_fp16_block_with_overflowing_activations(family):
    """Each family's block under float16 autocast, forward and backward, with activations whose
    float16 square overflows: finite and close to float32. timm's block (same weights, same
    input) is run alongside; where it has no StarReLU (PoolFormer v1: GELU) it stays finite too,
    otherwise it overflows (README, "Mixed precision")."""
    ours, reference = family_blocks(family)
    dim = ours.norm1.weight.shape[0]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 8, dim, generator=gen)
    grad_out = torch.randn(x.shape, generator=gen)

    out32, grads32 = run_block(ours, x, False, False, grad_out)
    out16, grads16 = run_block(ours, x, False, True, grad_out)
    with torch.no_grad():  # the attack: the float32 StarReLU hidden passes float16's range
        hidden = ours.mlp.act(ours.mlp.fc1(ours.norm2(x)))
    starrelu = isinstance(ours.mlp.act, StarReLU)
    assert hidden.abs().max() > FP16_MAX or not starrelu
    assert check_close(out16, out32, f'{family} output') == out32.numel()
    for name, grad in grads32.items():
        if grad is not None and grad.numel() > 1 and not name.startswith(HIDDEN_CONSUMERS):
            check_close(grads16[name], grad, f'{family} gradient of {name}', GRAD_TOLERANCE)

    if reference is not None:
        timm32, _ = run_block(reference, x, True, False)
        timm16, _ = run_block(reference, x, True, True)
        assert (timm32 - out32).abs().max() <= 1e-4 * out32.abs().max()  # same network
        assert bool(torch.isfinite(timm16).all()) is not starrelu


def test_attention_fp16_logits_beyond_range():
    """CAFormer's attention with query and key weights scaled so that the logits pass 65504:
    under float16 autocast the output is finite, as SDPA's kernels compute the logits and the
    softmax in float32, and equals float32 attention over the same float16 q, k, v (the
    rounding of q and k to float16 alone moves logits of 1e5 by ~50: that is not compared)."""
    attn = Attention(64)
    with torch.no_grad():
        attn.qkv.weight[:128].mul_(300)
    x = torch.randn(2, 8, 8, 64, generator=torch.Generator().manual_seed(0))
    with torch.autocast('cpu', dtype=torch.float16):
        out = attn(x).float()
        q, k, v = attn.qkv(x).float().reshape(2, 64, 3, 2, 32).permute(2, 0, 3, 1, 4)
    assert (q @ k.transpose(-2, -1)).abs().max() * 32**-0.5 > FP16_MAX
    mixed = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    expected = attn.proj(mixed.transpose(1, 2).reshape(2, 8, 8, 64))
    assert check_close(out, expected, 'attention') == out.numel()


def test_starrelu_fp16_gradients_against_formula():
    """``forward_scaled`` in float16 with inputs up to 1000 (square 1e6): the output times
    ``unscale`` and the gradients of x, s and b equal ``s * relu(x) ** 2 + b`` and its
    derivatives computed in float64, within float16 rounding."""
    act = StarReLU(scale_value=0.7, bias_value=-0.2)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(4096, generator=gen) * 2000 - 1000).half().requires_grad_()
    grad = torch.randn(4096, generator=gen)
    out, unscale = act.forward_scaled(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert out.abs().max() <= FP16_HIDDEN_LIMIT and unscale.item() > 1
    assert unscale.item() == 2**round(torch.log2(unscale).item())  # a power of two: exact
    (out.float() * unscale * grad).sum().backward()

    s, b, x64, g = 0.7, -0.2, x.detach().double(), grad.double()
    relu = x64.clamp(min=0)
    expected = {'out': s * relu**2 + b, 'x': 2 * s * relu * g, 'scale': (g * relu**2).sum(),
                'bias': g.sum()}
    actual = {'out': out.double() * unscale.item(), 'x': x.grad.double(),
              'scale': act.scale.grad.double(), 'bias': act.bias.grad.double()}
    for key, value in expected.items():
        error = (actual[key] - value).abs().max().item()
        assert error <= 2e-3 * value.abs().max().item(), (key, error)


def test_starrelu_fp16_without_scaling():
    """StarReLU alone on float16: the float16 result of the float32 formula, inf only where
    that leaves float16's range; its parameter gradients (sums over all elements) finite."""
    act = StarReLU(inplace=True)
    x = torch.tensor([-3., 2., 255., 300., 1000.]).half().requires_grad_()
    out = act(x)
    expected = (x.detach().float().clamp(min=0)**2).half()
    assert torch.equal(out, expected) and torch.isinf(out[-2:]).all()
    y = torch.full((4096,), 200.).half().requires_grad_()  # sum of s-gradient terms: 1.6e8
    act(y).float().sum().backward()
    assert act.scale.grad.item() == pytest.approx(4096 * 200.**2, rel=1e-3)
    with torch.no_grad():  # in place, as in inference: not in float16 (the square overflows)
        z = x.detach().clone()
        assert torch.equal(act(z), expected) and torch.equal(z, x.detach())


def test_pooling_fp16_window_sums():
    """Pooling on a float16 tensor of values near 20000: the window sums of 9 such values pass
    65504, the result (average minus centre) does not; equal to float32's result in float16
    rounding. float32 is unchanged by the power-of-two window weight: timm's avg_pool2d."""
    pool = Pooling(4)
    gen = torch.Generator().manual_seed(0)
    x = 15000 + 5000 * torch.rand(2, 6, 7, 4, generator=gen)
    expected = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), 3, 1, 1,
                                              count_include_pad=False).permute(0, 2, 3, 1) - x
    assert torch.allclose(pool(x), expected, rtol=0, atol=1e-3)
    out = pool(x.half()).float()
    assert torch.isfinite(out).all()
    assert (out - expected).abs().max() <= 2e-3 * x.abs().max()


def test_amp_optim_wrapper_cpu():
    """``--amp`` on CPU: bfloat16 autocast of the backbone and neck, no loss scaling
    (AutocastOptimWrapper, which a runner builds from the config), the rest of the config kept;
    the neck's outputs come back in float32 for the heads, and the modules are restored."""
    cfg, line = amp_optim_wrapper(dict(type='AmpOptimWrapper', loss_scale=512.,
                                       optimizer=dict(type='SGD', lr=0.1),
                                       clip_grad=dict(max_norm=1.)), 'cpu')
    assert cfg == dict(type='mmmetaformer.AutocastOptimWrapper', dtype='bfloat16',
                       modules=['backbone', 'neck'], optimizer=dict(type='SGD', lr=0.1),
                       clip_grad=dict(max_norm=1.))
    assert 'bfloat16' in line and 'no loss scaling' in line
    from mmengine.optim import build_optim_wrapper
    model = torch.nn.Module()
    model.backbone, model.neck, model.head = (torch.nn.Sequential(torch.nn.Linear(4, 4))
                                              for _ in range(3))
    inner = []
    model.backbone[0].register_forward_hook(lambda module, args, out: inner.append(out.dtype))
    wrapper = build_optim_wrapper(model, cfg)
    assert isinstance(wrapper, AutocastOptimWrapper)
    with wrapper.optim_context(model):
        out = model.neck(model.backbone(torch.randn(3, 4)))
        assert out.dtype == torch.float32 and model.head(out).dtype == torch.float32
    assert inner == [torch.bfloat16] and 'forward' not in vars(model.backbone)


NUM_TRAIN = 8


@pytest.mark.e2e
@pytest.mark.slow
def test_train_amp_demo_maskrcnn(tmp_path):
    """``tools/train.py --amp`` trains the demo Mask R-CNN on CPU for one epoch: bfloat16
    autocast (logged, with a warning where the CPU emulates bfloat16), finite losses at every
    iteration, and a bbox mAP above 0."""
    from demo_data import write_coco_demo
    coco = tmp_path / 'coco'
    # small: without native bfloat16 (AVX512-BF16, AMX) the CPU emulates it, 10-40x slower
    write_coco_demo(str(coco), num_train=NUM_TRAIN, num_val=8, image_size=(128, 96))
    ann = f'{coco}/annotations/instances_val2017.json'
    work = tmp_path / 'work'
    options = [f'{split}_dataloader.dataset.data_root={coco}/'
               for split in ('train', 'val', 'test')] + [
        f'{split}_dataloader.dataset.pipeline.{i}.scale=(128,96)'
        for split, i in (('train', 2), ('val', 1), ('test', 1))] + [
        f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}',
        'train_cfg.max_epochs=1', 'train_cfg.val_interval=1', 'param_scheduler.0.end=2',
        'default_hooks.logger.interval=1',
        # after 4 iterations from scratch every score is low: keep them all for the evaluation
        'model.test_cfg.rcnn.score_thr=0.0']
    proc = interpreter.run(
        ['tools/train.py', 'configs/demo/caformer_s18_maskrcnn_demo.py', '--amp',
         '--work-dir', str(work), '--cfg-options', *options], cwd=ROOT, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert '--amp: bfloat16 autocast on cpu of the model' in output
    assert ('no native bfloat16' in output) == (not torch.ops.mkldnn._is_mkldnn_bf16_supported())
    logs = [json.loads(line) for line in
            next(work.glob('*/vis_data/scalars.json')).read_text().splitlines()]
    losses = [entry['loss'] for entry in logs if 'loss' in entry]
    assert len(losses) == NUM_TRAIN // 2 and all(torch.isfinite(torch.tensor(losses)))
    assert next(entry for entry in logs if 'coco/bbox_mAP' in entry)['coco/bbox_mAP'] > 0
