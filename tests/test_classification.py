"""ImageNet classification: the configs of configs/imagenet build, official and timm checkpoints
give the official logits through tools/convert_checkpoint.py, and tools/train.py + tools/test.py
run on demo ImageNet-format data."""
import re
from functools import lru_cache
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.dataset import Compose
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmengine.runner import load_checkpoint
from mmpretrain.registry import MODELS
from timm.models.metaformer import GroupNorm1NoBias
from timm.models.metaformer import MetaFormer as TimmMetaFormer

import interpreter
import mmmetaformer  # noqa: F401
from demo_data import write_imagenet_demo
from mmmetaformer.models import ARCHS

import convert_checkpoint as convert_tool  # tools/ is on sys.path (setup.cfg)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / 'configs' / 'imagenet').glob('*.py'))
SMALLEST = ['poolformer_s12', 'poolformerv2_s12', 'identityformer_s12', 'randformer_s12',
            'convformer_s18', 'caformer_s18']


def test_one_config_per_model_and_variant():
    names = {p.stem for p in CONFIGS}
    conv = [n for n in ARCHS if n.startswith(('convformer', 'caformer'))]
    assert names == ({f'{n}_in1k' for n in ARCHS} | {f'{n}_384_in1k' for n in conv}
                     | {f'{n}_in21k' for n in conv})


@pytest.mark.slow
@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path):
    """Model, optimizer wrapper (with its no-decay groups) and pipelines build."""
    cfg = Config.fromfile(str(path))
    assert cfg.custom_imports.imports == ['mmmetaformer'] and cfg.default_scope == 'mmpretrain'
    init_default_scope('mmpretrain')
    with torch.device('meta'):  # shapes only: no memory, no init
        model = MODELS.build(cfg.model)
        wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        logits = model.head.fc(torch.zeros(1, model.head.in_channels))
    name = path.stem.rsplit('_', 1)[0].replace('_384', '')
    assert model.backbone.arch_settings == ARCHS[name] and model.neck is None
    assert logits.shape[1] == (21841 if path.stem.endswith('in21k') else 1000)
    accumulative = cfg.optim_wrapper.accumulative_counts
    assert cfg.train_dataloader.batch_size * 8 * accumulative == cfg.auto_scale_lr.base_batch_size
    for group in wrapper.optimizer.param_groups:
        param = group['params'][0]
        assert group['weight_decay'] == (0. if param.ndim == 1 else 0.05)
    Compose(cfg.train_dataloader.dataset.pipeline)
    if cfg.test_dataloader is not None:
        Compose(cfg.test_dataloader.dataset.pipeline)


# --- logits of official / timm checkpoints -----------------------------------------------

class RandomMixing(nn.Module):
    """RandFormer's token mixer as defined officially, on NCHW tensors: a frozen
    W = softmax(rand(N, N)), out[m] = sum_n W[m, n] x[n] over the tokens."""
    num_tokens = None

    def __init__(self, dim, **kwargs):
        super().__init__()
        self.random_matrix = nn.Parameter(
            torch.softmax(torch.rand(self.num_tokens, self.num_tokens), dim=-1),
            requires_grad=False)

    def forward(self, x):
        B, C, H, W = x.shape
        return torch.einsum('mn,bcn->bcm', self.random_matrix, x.flatten(2)).reshape(B, C, H, W)


def reference_backbone(name):
    """timm's model (== the official backbone); IdentityFormer and RandFormer from timm's
    generic MetaFormer class."""
    if not name.startswith(('identityformer', 'randformer')):
        return timm.create_model(name)
    arch = ARCHS[name]
    mixers = [nn.Identity] * 4
    if name.startswith('randformer'):
        mixers[2:] = [type(f'RandomMixing{n}', (RandomMixing, ), dict(num_tokens=n))
                      for n in (196, 49)]
    return TimmMetaFormer(depths=arch['depths'], dims=arch['dims'], token_mixers=mixers,
                          norm_layers=GroupNorm1NoBias, use_mlp_head=False)


def official_logits(model, name, x):
    """The official classifier on the reference model's last feature map, with its weights:
    PoolFormer v1: GroupNorm(1, eps 1e-5) on the map, mean, Linear; the others: mean,
    LayerNorm(eps 1e-6), then Linear or MlpHead (Linear, SquaredReLU, LayerNorm eps 1e-5,
    Linear)."""
    feat, norm, fc = model.forward_features(x), model.head.norm, model.head.fc
    if name.startswith('poolformer_'):
        pooled = F.group_norm(feat, 1, norm.weight, norm.bias, 1e-5).mean((2, 3))
    else:
        pooled = F.layer_norm(feat.mean((2, 3)), norm.weight.shape, norm.weight, norm.bias, 1e-6)
    if isinstance(fc, nn.Linear):
        return fc(pooled)
    hidden = F.relu(fc.fc1(pooled)).square()
    return fc.fc2(F.layer_norm(hidden, fc.norm.weight.shape, fc.norm.weight, fc.norm.bias, 1e-5))


def official_layout(state, name):
    """timm's names back to the official ones (the inverse of timm's checkpoint_filter_fn),
    with the official tensor shapes (2-D Linear weights, except PoolFormer v1's 1x1 convs)."""
    if name.startswith('poolformer_'):
        rules = [(r'^stem\.conv\.', 'patch_embed.proj.'),
                 (r'^stages\.(\d+)\.downsample\.conv\.',
                  lambda m: f'network.{2 * int(m[1]) - 1}.proj.'),
                 (r'^stages\.(\d+)\.blocks\.(\d+)\.(.*)layer_scale(\d)\.scale$',
                  lambda m: f'network.{2 * int(m[1])}.{m[2]}.{m[3]}layer_scale_{m[4]}'),
                 (r'^stages\.(\d+)\.blocks\.(\d+)\.', lambda m: f'network.{2 * int(m[1])}.{m[2]}.')]
    else:
        rules = [(r'^stem\.conv\.', 'downsample_layers.0.conv.'),
                 (r'^stem\.norm\.', 'downsample_layers.0.post_norm.'),
                 (r'^stages\.(\d+)\.downsample\.norm\.', r'downsample_layers.\1.pre_norm.'),
                 (r'^stages\.(\d+)\.downsample\.conv\.', r'downsample_layers.\1.conv.'),
                 (r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.')]
    rules += [(r'^head\.norm\.', 'norm.'), (r'^head\.fc\.', 'head.')]
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        if not name.startswith('poolformer_') and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value.flatten(1)
        out[key] = value
    return out


@lru_cache(maxsize=None)
def reference(name):
    """A reference model with random weights (1-D tensors moved off their init values)."""
    torch.manual_seed(0)
    model = reference_backbone(name)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if 'random_matrix' in key:
                continue
            if param.ndim == 1:
                param.add_(0.4 * (torch.rand_like(param) - 0.5))
            else:
                param.normal_(0, 0.02)
    return model.eval()


@pytest.mark.parametrize('layout', ['official', 'timm'])
@pytest.mark.parametrize('name', SMALLEST)
def test_checkpoint_gives_official_logits(name, layout, tmp_path):
    model = reference(name)
    state = model.state_dict()
    if layout == 'official':
        state = official_layout(state, name)
    src, dst = tmp_path / f'{layout}.pth', tmp_path / 'converted.pth'
    torch.save(state, src)
    convert_tool.convert(str(src), str(dst), arch=name)

    cfg = Config.fromfile(str(ROOT / 'configs' / 'imagenet' / f'{name}_in1k.py'))
    classifier = MODELS.build(cfg.model).eval()
    load_checkpoint(classifier, str(dst), strict=True)  # what the Runner does for load_from
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = official_logits(model, name, x)
        actual = classifier(x, mode='tensor')
    assert actual.shape == (1, 1000)
    assert (actual - expected).abs().max().item() <= 1e-5


# --- tools/train.py and tools/test.py -------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
def test_train_then_test_on_demo_imagenet(tmp_path):
    """A few iterations of the real recipe (RandAugment, erasing, mixup/cutmix, LAMB), then
    top-1/top-5 of the checkpoint on the val split."""
    data = tmp_path / 'imagenet'
    write_imagenet_demo(str(data), num_train_per_class=2, num_val_per_class=1)
    config = 'configs/imagenet/caformer_s18_in1k.py'
    options = ['optim_wrapper.accumulative_counts=1', 'train_cfg.max_epochs=1',
               'default_hooks.logger.interval=1']
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        options += [f'{loader}.dataset.data_root={data}', f'{loader}.batch_size=4',
                    f'{loader}.num_workers=0', f'{loader}.persistent_workers=False']

    def run(*args):
        result = interpreter.run([*args, '--cfg-options', *options], cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    work_dir = tmp_path / 'work'
    log = run('tools/train.py', config, '--work-dir', str(work_dir))
    assert 'batch augmentations are enabled' in log and 'Epoch(train) [1][2/2]' in log
    log = run('tools/test.py', config, str(work_dir / 'epoch_1.pth'),
              '--work-dir', str(tmp_path / 'test'))
    metrics = re.search(r'Epoch\(test\).*accuracy/top1: ([\d.]+)\s+accuracy/top5: ([\d.]+)', log)
    assert metrics, log[-3000:]
    assert all(0 <= float(v) <= 100 for v in metrics.groups())
