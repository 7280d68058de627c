"""Checkpoint layouts: each loads through ``init_cfg`` and ``tools/convert_checkpoint.py`` and
reproduces the features of the model it came from; bad files give clear errors.

Source models have random weights: timm's models, and for IdentityFormer/RandFormer (not in
timm) timm's generic ``MetaFormer`` with an identity / paper-defined random mixer. Files of the
official layouts are written with the inverse of timm's documented renaming.
"""
import os
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from mmengine.model import BaseModel
from mmengine.runner import Runner, load_checkpoint
from safetensors.torch import save_file
from timm.models.metaformer import GroupNorm1NoBias
from timm.models.metaformer import MetaFormer as TimmMetaFormer
from torch.utils.data import Dataset

import interpreter
import mmmetaformer.checkpoints as ckpt
from mmmetaformer.checkpoints import load_backbone_checkpoint
from mmmetaformer.sources import read_checkpoint
from mmmetaformer.trust import CheckpointError
from mmmetaformer.models import MetaFormer

ROOT = Path(__file__).resolve().parents[1]
import convert_checkpoint as convert_tool  # noqa: E402
from common import run_tool  # noqa: E402

S12 = dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512))


class RandomMixing(nn.Module):
    """RandFormer's mixer as the paper defines it: tokens mixed by frozen softmax(rand(N, N))."""
    num_tokens = 196

    def __init__(self, **kwargs):
        super().__init__()
        self.random_matrix = nn.Parameter(
            torch.softmax(torch.rand(self.num_tokens, self.num_tokens), dim=-1),
            requires_grad=False)

    def forward(self, x):  # NCHW, as timm's MetaFormer passes it
        B, C, H, W = x.shape
        x = torch.einsum('mn,bcn->bcm', self.random_matrix, x.reshape(B, C, H * W))
        return x.reshape(B, C, H, W)


class RandomMixing49(RandomMixing):
    num_tokens = 49


def inputs(name):
    size = 224 if name.startswith('randformer') else 64  # RandFormer: native matrices
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


@lru_cache(maxsize=None)
def source(name):
    """(reference model, its timm-layout state dict, its stage outputs) with random weights;
    norm weights and layer/res scales randomised too, so every tensor shows in the output."""
    torch.manual_seed(0)
    if name.startswith(('identityformer', 'randformer')):
        mixers = nn.Identity if name.startswith('identity') else [
            nn.Identity, nn.Identity, RandomMixing, RandomMixing49]
        model = TimmMetaFormer(**S12, token_mixers=mixers, norm_layers=GroupNorm1NoBias,
                               use_mlp_head=False)
    else:
        model = timm.create_model(name)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.dim() == 1 and p.requires_grad:
                p.normal_(0.5 if key.endswith(('weight', 'scale')) else 0., 0.2)
        feats = model.eval().forward_intermediates(inputs(name), intermediates_only=True)
    return model, model.state_dict(), feats


def to_official(state, v1=False):
    """Inverse of timm's ``checkpoint_filter_fn``: the official release layout."""
    out = {}
    for k, v in state.items():
        if v1:
            k = re.sub(r'^stem\.conv\.', 'patch_embed.proj.', k)
            k = re.sub(r'^stages\.(\d+)\.downsample\.conv\.',
                       lambda m: f'network.{2 * int(m[1]) - 1}.proj.', k)
            k = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.layer_scale(\d)\.scale$',
                       lambda m: f'network.{2 * int(m[1])}.{m[2]}.layer_scale_{m[3]}', k)
            k = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.',
                       lambda m: f'network.{2 * int(m[1])}.{m[2]}.', k)
        else:
            k = re.sub(r'^stem\.conv\.', 'downsample_layers.0.conv.', k)
            k = re.sub(r'^stem\.norm\.', 'downsample_layers.0.post_norm.', k)
            k = re.sub(r'^stages\.(\d+)\.downsample\.norm\.', r'downsample_layers.\1.pre_norm.', k)
            k = re.sub(r'^stages\.(\d+)\.downsample\.conv\.', r'downsample_layers.\1.conv.', k)
            k = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.', k)
            if re.search(r'(mlp\.fc[12]|pwconv[12])\.weight$', k) and v.dim() == 4:
                v = v.reshape(v.shape[:2])  # official Linear weights are 2-D
        k = re.sub(r'^head\.norm\.', 'norm.', k)
        k = re.sub(r'^head\.fc\.', 'head.', k)
        out[k] = v.clone()
    return out


def backbone(name, **init_cfg):
    model = MetaFormer(arch=name, out_norm=None,
                       init_cfg=dict(type='Pretrained', **init_cfg) if init_cfg else None)
    if init_cfg:
        model.init_weights()
    return model.eval()


def assert_features(model, name, expected=None):
    expected = source(name)[2] if expected is None else expected
    with torch.no_grad():
        got = model(inputs(name))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and (g - e).abs().max() <= 1e-5


def assert_converts(name, src, tmp_path, arch=None, expected=None):
    """tools/convert_checkpoint.py writes a file that init_cfg (with and without
    prefix='backbone.') and mmengine's load_from loader both load."""
    dst = tmp_path / 'converted.pth'
    meta = convert_tool.convert(str(src), str(dst), arch)
    assert meta['arch'] == name
    saved = torch.load(dst, weights_only=True)  # plain tensors: any loader reads it
    assert saved['meta'] == meta
    assert_features(backbone(name, checkpoint=str(dst), prefix='backbone.'), name, expected)
    assert_features(backbone(name, checkpoint=str(dst)), name, expected)
    wrapper = nn.Module()
    wrapper.backbone = backbone(name)
    load_checkpoint(wrapper, str(dst), map_location='cpu', strict=False)
    assert set(wrapper.state_dict()) <= set(saved['state_dict'])
    assert_features(wrapper.backbone, name, expected)
    return saved


@pytest.fixture
def logs(monkeypatch):
    messages = []
    monkeypatch.setattr(ckpt, 'print_log', lambda msg, **kw: messages.append(msg))
    return messages


# --- every layout ----------------------------------------------------------------------------

@pytest.mark.parametrize('name,filename', [
    ('poolformer_s12', 'pytorch_model.bin'), ('poolformerv2_s12', 'model.safetensors'),
    ('convformer_s18', 'pytorch_model.bin'), ('caformer_s18', 'model.safetensors')])
def test_timm_file(name, filename, tmp_path, logs):
    state = source(name)[1]
    path = tmp_path / filename
    if filename.endswith('.safetensors'):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    reference = timm.create_model(name, features_only=True, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        expected = reference(inputs(name))
    assert_features(backbone(name, checkpoint=str(path)), name, expected)
    assert 'timm' in logs[-1] and 'ignored classifier head' in logs[-1]
    arch = name if name.startswith('poolformerv2') else None  # same layout as identityformer
    saved = assert_converts(name, path, tmp_path, arch, expected)
    assert saved['meta']['source_format'] == 'timm'
    assert all(saved['state_dict'][k].equal(v) for k, v in state.items() if k.startswith('head.'))


@pytest.mark.parametrize('name', ['poolformerv2_s12', 'identityformer_s12', 'randformer_s12',
                                  'convformer_s18', 'caformer_s18'])
def test_official_metaformer_file(name, tmp_path, logs):
    state = to_official(source(name)[1])
    if name == 'caformer_s18':  # the in21k release: 21841 classes
        state['head.fc2.weight'] = torch.randn(21841, 2048)
        state['head.fc2.bias'] = torch.randn(21841)
    path = tmp_path / (f'{name}_in21k.pth' if name == 'caformer_s18' else f'{name}.pth')
    torch.save(state, path)
    assert_features(backbone(name, checkpoint=str(path)), name)
    assert 'official MetaFormer-baselines layout' in logs[-1]
    assert 'ignored classifier head' in logs[-1]
    converted = assert_converts(name, path, tmp_path)  # arch from layout and file name
    saved = converted['state_dict']
    assert converted['meta']['num_classes'] == (21841 if name == 'caformer_s18' else 1000)
    if name == 'randformer_s12':
        assert saved['backbone.stages.2.blocks.0.token_mixer.random_matrix'].shape == (196, 196)
        assert saved['backbone.stages.3.blocks.1.token_mixer.random_matrix'].equal(
            state['stages.3.1.token_mixer.random_matrix'])
    head = {('head.' + k if k.startswith('norm.') else 'head.fc.' + k[len('head.'):]): v
            for k, v in state.items() if k.startswith(('norm.', 'head.'))}
    assert head.keys() == {k for k in saved if k.startswith('head.')}
    assert all(saved[k].equal(v) for k, v in head.items())


def test_official_poolformer_file(tmp_path, logs):
    name = 'poolformer_s12'
    state = to_official(source(name)[1], v1=True)
    assert state['network.0.0.mlp.fc1.weight'].shape == (256, 64, 1, 1)  # 1x1 conv, as released
    path = tmp_path / 'poolformer_s12.pth.tar'
    torch.save(state, path)
    assert_features(backbone(name, checkpoint=str(path)), name)
    assert 'official PoolFormer v1 layout' in logs[-1]
    saved = assert_converts(name, path, tmp_path)
    assert saved['state_dict']['head.norm.weight'].equal(state['norm.weight'])
    assert saved['state_dict']['head.fc.weight'].equal(state['head.weight'])


def test_mmpretrain_poolformer_file(tmp_path, logs):
    from mmpretrain.models.backbones import PoolFormer as MMPretrainPoolFormer
    torch.manual_seed(0)
    model = MMPretrainPoolFormer(arch='s12')  # classifier config: out_indices=-1, norm6
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.5, 0.2)
    head = nn.Linear(512, 1000)
    state = {**{f'backbone.{k}': v for k, v in model.state_dict().items()},
             **{f'head.fc.{k}': v for k, v in head.state_dict().items()}}
    path = tmp_path / 'poolformer-s12_3rdparty_32xb128_in1k.pth'
    torch.save(dict(meta=dict(mmpretrain_version='1.2.0'), state_dict=state), path)
    model.out_indices = [0, 2, 4, 6]  # the raw stage outputs as reference
    for i in model.out_indices:
        setattr(model, f'norm{i}', nn.Identity())
    model.eval()
    with torch.no_grad():
        expected = model(inputs('poolformer_s12'))
    assert_features(backbone('poolformer_s12', checkpoint=str(path)), 'poolformer_s12', expected)
    assert 'mmpretrain PoolFormer' in logs[-1]
    saved = assert_converts('poolformer_s12', path, tmp_path, expected=expected)['state_dict']
    assert saved['head.norm.weight'].equal(state['backbone.norm6.weight'])
    assert saved['head.fc.weight'].equal(state['head.fc.weight'])


class _Detector(BaseModel):
    def __init__(self):
        super().__init__()
        self.backbone = MetaFormer(arch='caformer_s18', out_norm='default')
        self.neck = nn.Conv2d(512, 8, 1)

    def forward(self, inputs, data_samples=None, mode='loss'):
        feats = self.backbone(inputs)
        return dict(loss=self.neck(feats[-1]).mean() + sum(f.mean() for f in feats))


class _Images(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return dict(inputs=torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(i)))


def test_runner_checkpoint(tmp_path, logs):
    """A detector-like model saved by mmengine's Runner (message hub, optimizer, EMAHook
    copy, neck, output norms)."""
    torch.manual_seed(0)
    model = _Detector()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.5, 0.2)
    runner = Runner(model=model, work_dir=str(tmp_path / 'work'),
                    train_dataloader=dict(dataset=_Images(), batch_size=1,
                                          sampler=dict(type='DefaultSampler', shuffle=False),
                                          collate_fn=dict(type='default_collate')),
                    train_cfg=dict(by_epoch=False, max_iters=1),
                    optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.)),
                    default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1,
                                                       by_epoch=False)),
                    custom_hooks=[dict(type='EMAHook')])
    runner.train()
    path = tmp_path / 'work' / 'iter_1.pth'
    with torch.no_grad():
        expected = model.backbone.eval()(inputs('caformer_s18'))
    loaded = MetaFormer(arch='caformer_s18', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    loaded.init_weights()
    assert_features(loaded.eval(), 'caformer_s18', expected)  # output norms loaded too
    assert 'EMA' in logs[-1] and 'ignored other model parts: neck.weight' in logs[-1]
    raw = backbone('caformer_s18')
    raw.load_state_dict(model.backbone.state_dict(), strict=False)
    with torch.no_grad():
        raw_expected = raw(inputs('caformer_s18'))
    assert_converts('caformer_s18', path, tmp_path, expected=raw_expected)


def test_ema_copies_and_module_prefix(logs):
    name = 'poolformerv2_s12'
    raw = {k: torch.full_like(v, 1.) for k, v in backbone(name).state_dict().items()}
    ema = {k: torch.full_like(v, 2.) for k, v in raw.items()}

    def loaded(checkpoint, **kw):
        model = backbone(name)
        load_backbone_checkpoint(model, checkpoint, **kw)
        return model.stem.conv.weight.flatten()[0].item()

    mmengine_ema = dict(state_dict={f'backbone.{k}': v for k, v in ema.items()},
                        ema_state_dict={**{f'module.backbone.{k}': v for k, v in raw.items()},
                                        'steps': torch.tensor(1)})
    assert loaded(mmengine_ema) == 2.  # mmengine's EMAHook saves the EMA weights as state_dict
    assert "raw weights in 'ema_state_dict' are ignored" in logs[-1]
    timm_ema = dict(state_dict=raw, state_dict_ema=ema)
    assert loaded(timm_ema) == 1. and 'ignored EMA copy: state_dict_ema.*' in logs[-1]
    assert loaded(timm_ema, use_ema=True) == 2.
    mmcv_ema = {**{f'backbone.{k}': v for k, v in raw.items()},
                **{'ema_backbone_' + k.replace('.', '_'): v for k, v in ema.items()}}
    assert loaded(mmcv_ema) == 1. and 'ignored EMA copy: ema_backbone_' in logs[-1]
    assert loaded(mmcv_ema, use_ema=True) == 2.
    assert loaded(dict(state_dict={f'module.backbone.{k}': v for k, v in raw.items()})) == 1.


@pytest.mark.slow  # a child interpreter
def test_convert_cli(tmp_path):
    path = tmp_path / 'poolformer_s12.pth.tar'
    torch.save(to_official(source('poolformer_s12')[1], v1=True), path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = interpreter.run(['tools/convert_checkpoint.py', str(path), str(tmp_path / 'out.pth')],
                          cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1].startswith(f"wrote {tmp_path / 'out.pth'}: poolformer_s12, ")
    assert 'linear head with 1000 classes' in run.stdout
    assert torch.load(tmp_path / 'out.pth', weights_only=True)['meta']['arch'] == 'poolformer_s12'


# --- errors ----------------------------------------------------------------------------------

def test_wrong_arch_file(tmp_path):
    path = tmp_path / 'poolformer_s12.pth.tar'
    torch.save(to_official(source('poolformer_s12')[1], v1=True), path)
    with pytest.raises(CheckpointError, match=r'has stage depths \[2, 2, 6, 2\].*\(looks like '
                       r'poolformer_s12\) but the backbone is poolformer_s24 \(stage depths '
                       r'\[4, 4, 12, 4\]'):
        backbone('poolformer_s24', checkpoint=str(path))
    with pytest.raises(CheckpointError, match='looks like poolformer_s12'):
        convert_tool.convert(str(path), str(tmp_path / 'out.pth'), 'poolformer_s24')


def test_wrong_arch_named_by_its_shapes():
    with torch.device('meta'):
        layout = timm.create_model('convformer_m36').state_dict()
    state = to_official({k: torch.empty(v.shape) for k, v in layout.items()})
    with pytest.raises(CheckpointError) as err:
        load_backbone_checkpoint(backbone('caformer_s18'), state)
    message = str(err.value)
    assert ('dims [96, 192, 384, 576]' in message and '(looks like convformer_m36) but the '
            'backbone is caformer_s18 (stage depths [3, 3, 9, 3], dims [64, 128, 320, 512]'
            in message)
    assert 'wrong shape: stem.conv.weight: checkpoint (96, 3, 7, 7), backbone (64, 3, 7, 7)' \
        in message and 'Nothing was loaded' in message


def test_extra_and_missing_tensors():
    state = to_official(source('caformer_s18')[1])
    state['stages.0.0.token_mixer.extra.weight'] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"looks like caformer_s18, the backbone's arch, "
                       r"but its tensors do not fit:\n  unexpected 1 tensors: "
                       r"stages.0.blocks.0.token_mixer.extra.weight \(checkpoint key "
                       r"'stages.0.0.token_mixer.extra.weight'\)"):
        load_backbone_checkpoint(backbone('caformer_s18'), state)
    del state['stages.0.0.token_mixer.extra.weight'], state['stages.3.2.mlp.fc2.weight']
    with pytest.raises(CheckpointError, match='missing 1 tensors: stages.3.blocks.2.mlp.fc2'):
        load_backbone_checkpoint(backbone('caformer_s18'), state)


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_truncated_file(suffix, tmp_path):
    state = {k: v.contiguous() for k, v in source('poolformerv2_s12')[1].items()}
    path = tmp_path / f'model{suffix}'
    save_file(state, str(path)) if suffix == '.safetensors' else torch.save(state, path)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match='may be truncated.*download it again'):
        backbone('poolformerv2_s12', checkpoint=str(path))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save(dict(state_dict=source('poolformerv2_s12')[1], extra=_Exploit(str(marker))), path)
    with pytest.raises(CheckpointError) as err:
        backbone('poolformerv2_s12', checkpoint=str(path))
    assert not marker.exists()
    assert 'could run arbitrary Python code' in str(err.value)
    assert 'nothing from it was built or executed' in str(err.value)
    command = next(line for line in str(err.value).splitlines() if 'python -c' in line)
    assert shlex.split(command)[:2] == ['python', '-c'] and (
        f"torch.load({str(path)!r}, map_location='cpu', weights_only=False)"
        in shlex.split(command)[2])
    torch.load(path, weights_only=False)  # the exploit is real: unpickling it runs mkdir
    assert marker.exists()


def test_unknown_layout_and_prefix():
    with pytest.raises(CheckpointError, match='checkpoint file not found: missing.pth'):
        read_checkpoint('missing.pth')
    with pytest.raises(CheckpointError, match='unrecognised checkpoint layout'):
        load_backbone_checkpoint(backbone('poolformerv2_s12'), {'encoder.weight': torch.zeros(1)})
    state = to_official(source('poolformerv2_s12')[1])
    with pytest.raises(CheckpointError, match="no keys under prefix 'backbone.'"):
        load_backbone_checkpoint(backbone('poolformerv2_s12'), state, prefix='backbone.')


def test_ambiguous_arch_needs_flag(tmp_path):
    path = tmp_path / 'model.pth'
    torch.save(to_official(source('identityformer_s12')[1]), path)
    with pytest.raises(SystemExit, match='could be any of poolformerv2_s12, identityformer_s12 '
                       r'\(identical tensor layouts\); pass --arch'):
        run_tool(lambda: convert_tool.main([str(path), str(tmp_path / 'out.pth')]))


def test_remote_names(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hf'))
    with pytest.raises(CheckpointError, match=r'(?s)cannot fetch timm://caformer_s18.sail_in22k_'
                       r'ft_in1k .*repo timm/caformer_s18.sail_in22k_ft_in1k.*offline'):
        read_checkpoint('timm://caformer_s18.sail_in22k_ft_in1k')
    with pytest.raises(CheckpointError, match='timm has no pretrained weights'):
        read_checkpoint('timm://identityformer_s12')

    def offline(url, dst, *args, **kwargs):
        raise OSError('Name or service not known')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    url = 'https://huggingface.co/sail/dl/resolve/main/poolformerv2/poolformerv2_s12.pth'
    with pytest.raises(CheckpointError, match='cannot download .*offline') as err:
        backbone('poolformerv2_s12', checkpoint=url)
    cached = re.search(r'copy it to (\S+) or pass', str(err.value))[1]  # as the message says
    assert cached.startswith(str(tmp_path / 'hub' / 'checkpoints'))
    torch.save(to_official(source('poolformerv2_s12')[1]), cached)
    assert_features(backbone('poolformerv2_s12', checkpoint=url), 'poolformerv2_s12')


# --- round two, 3: two source keys for one tensor ---------------------------------------------

@pytest.mark.parametrize('twin', [
    lambda state: {**{f'backbone.{k}': v for k, v in state.items()},
                   'backbone.stem.conv.weight': torch.zeros_like(state['patch_embed.proj.weight'])},
    lambda state: {**state,
                   'stem.conv.weight': torch.zeros_like(state['patch_embed.proj.weight'])}],
    ids=['mmpretrain-and-canonical', 'official-and-timm'])
def test_two_keys_for_one_tensor_are_refused(twin):
    state = twin(to_official(source('poolformer_s12')[1], v1=True))
    names = [k for k in state if k.endswith(('patch_embed.proj.weight', 'stem.conv.weight'))]
    model = backbone('poolformer_s12')
    before = model.stem.conv.weight.clone()
    with pytest.raises(CheckpointError) as err:
        load_backbone_checkpoint(model, state)
    assert all(repr(name) in str(err.value) for name in names), str(err.value)
    assert 'backbone.stem.conv.weight' in str(err.value) and model.stem.conv.weight.equal(before)
