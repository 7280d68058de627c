"""The Python snippets of the README and of docs/ work as written, pasted where the text says.

A snippet to test is marked by an HTML comment on the line before its ```python fence:

* ``<!-- snippet-test: config PATH -->``: a whole config, saved as PATH (e.g.
  ``configs/my_config.py``) in a copy of the repository layout, built and trained one step;
* ``<!-- snippet-test: merge TARGET ... -->``: a fragment pasted at the end of each TARGET (the
  PATH of a config snippet of any page, a config of the repository, or an
  ``mmdet::``/``mmseg::`` config), then built and trained one step;
* ``<!-- snippet-test: run -->``: Python code, run from that copy of the repository; the
  ``.pth`` checkpoints and images it names are made up first (random weights of the config
  the snippet names; under ``data/demo/`` the demo datasets, which must hold the named image;
  elsewhere a random image).

Every other Python block must at least compile. Training steps use tiny inputs and pretrained
loading off (nothing is downloaded); the loss must reach every trainable backbone parameter,
as DDP requires.
"""
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

import mmmetaformer  # noqa: F401
from demo_data import write_all

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r'(?:<!-- snippet-test: (?P<tag>[^>]*?) -->\n\s*)?```python\n(?P<code>.*?)```',
                   re.S)


def pages():
    """The README and the pages of docs/ (not the scratch folders starting with ``_``)."""
    docs = sorted(p for p in (ROOT / 'docs').rglob('*.md')
                  if not any(part.startswith('_') for part in p.relative_to(ROOT).parts))
    return [ROOT / 'README.md'] + docs


def snippets():
    """(page:line, tag words or None, code) of every Python block of every page."""
    found = []
    for page in pages():
        text = page.read_text()
        name = page.relative_to(ROOT).as_posix()
        found += [(f"{name}:{text[:m.start('code')].count(chr(10))}",
                   m['tag'].split() if m['tag'] else None, m['code'])
                  for m in BLOCK.finditer(text)]
    return found


SNIPPETS = snippets()
CONFIGS = {tag[1]: code for _, tag, code in SNIPPETS if tag and tag[0] == 'config'}
CASES = [(f'{where}-{tag[0]}', tag, code) for where, tag, code in SNIPPETS if tag]
CASES = [(f'{name}-{target}', ['merge', target], code)
         for name, tag, code in CASES if tag[0] == 'merge' for target in tag[1:]] + \
    [case for case in CASES if case[1][0] != 'merge']


pytestmark = [pytest.mark.usefixtures('one_thread'), pytest.mark.slow]


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """A directory whose configs/ holds links to the repository's configs (so that relative
    ``_base_`` paths resolve) and where snippets may add files; the working directory."""
    (tmp_path / 'configs').mkdir()
    for entry in (ROOT / 'configs').iterdir():
        (tmp_path / 'configs' / entry.name).symlink_to(entry)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_python_block_compiles():
    readme = [tag for where, tag, _ in SNIPPETS if where.startswith('README.md:') and tag]
    assert {'config', 'run'} <= {tag[0] for tag in readme}
    for where, _, code in SNIPPETS:
        compile(code, where, 'exec')


def config_text(target):
    """The text of a merge target: a config snippet, a repository config or a toolbox one."""
    if target in CONFIGS:
        return CONFIGS[target]
    if '::' in target:
        return f'_base_ = {target!r}\n'
    return (ROOT / target).read_text()


def write_config(root, path, text):
    file = root / path
    if file.is_symlink():
        file.unlink()
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)
    return Config.fromfile(str(file))


def dummy_batch(scope, size=128):
    """Two images with one annotated object (detection), label maps (segmentation) or class
    labels (classification), as the model's data preprocessor takes them."""
    inputs = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8) for _ in range(2)]
    meta = dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                scale_factor=(1.0, 1.0))
    samples = []
    for _ in inputs:
        if scope == 'mmdet':
            from mmdet.structures import DetDataSample
            from mmdet.structures.mask import BitmapMasks
            from mmengine.structures import InstanceData
            masks = np.zeros((1, size, size), np.uint8)
            masks[0, 20:80, 30:100] = 1
            sample = DetDataSample(metainfo=meta)
            sample.gt_instances = InstanceData(
                bboxes=torch.tensor([[30., 20., 100., 80.]]), labels=torch.tensor([0]),
                masks=BitmapMasks(masks, size, size))
        elif scope == 'mmseg':
            from mmengine.structures import PixelData
            from mmseg.structures import SegDataSample
            sample = SegDataSample(metainfo=meta)
            sample.gt_sem_seg = PixelData(data=torch.randint(0, 4, (1, size, size)))
        else:
            from mmpretrain.structures import DataSample
            sample = DataSample(metainfo=meta).set_gt_label(0)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def train_one_step(cfg):
    """Build the config's model (pretrained loading off), optimizer and lr schedulers, run one
    training step on tiny inputs; the backbone's weights must change, and the loss must reach
    every trainable one (an unused one stops DDP)."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS
    scope = cfg.default_scope
    cfg.model.backbone.init_cfg = None
    cfg.model.pop('pretrained', None)
    if scope == 'mmseg':
        cfg.model.data_preprocessor.size = (128, 128)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(cfg.model).train()
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        trainable = {name: p for name, p in model.backbone.named_parameters() if p.requires_grad}
        before = [p.detach().clone() for p in trainable.values()]
        reached = set()  # what backward reaches, as DDP's unused-parameter check sees it
        for name, p in trainable.items():
            p.register_hook(lambda grad, name=name: reached.add(name))
        log_vars = model.train_step(dummy_batch(scope), optim_wrapper)
        for scheduler in cfg.get('param_scheduler') or []:
            PARAM_SCHEDULERS.build(dict(scheduler, optimizer=optim_wrapper))
    assert torch.isfinite(log_vars['loss'])
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable.values()))
    unused = sorted(set(trainable) - reached)
    assert not unused, f'backbone parameters the loss does not reach: {unused}'
    assert type(model.backbone).__module__.startswith('mmmetaformer.')


def make_files(root, code):
    """Random-weight checkpoints of the config the snippet names, and demo images, at the
    paths the snippet names."""
    config = re.search(r"'(configs/[^']+\.py)'", code)[1]
    for name in re.findall(r"'([^']+\.pth)'", code):
        cfg = Config.fromfile(str(ROOT / config))
        cfg.model.backbone.init_cfg = None
        with DefaultScope.overwrite_default_scope(cfg.default_scope):
            model = MODELS.build(cfg.model)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(state_dict=model.state_dict(), meta=dict()), root / name)
    for name in re.findall(r"'([^']+\.(?:jpg|png))'", code):
        if name.startswith('data/demo/'):  # must be a file the demo data writers write
            write_all(str(root / 'data' / 'demo'))
            assert (root / name).is_file(), f'{name}: not written by the demo data writers'
            continue
        import cv2
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), np.random.default_rng(0).integers(
            0, 256, (256, 320, 3), dtype=np.uint8))


@pytest.mark.parametrize('name,tag,code', CASES, ids=[case[0] for case in CASES])
def test_snippet(name, tag, code, repo_copy):
    kind = tag[0]
    if kind == 'config':
        train_one_step(write_config(repo_copy, tag[1], code))
    elif kind == 'merge':
        train_one_step(write_config(repo_copy, 'configs/snippet_merged.py',
                                    config_text(tag[1]) + '\n' + code))
    elif kind == 'run':
        make_files(repo_copy, code)
        script = repo_copy / 'snippet.py'
        script.write_text(code)
        runpy.run_path(str(script), run_name='__main__')
    else:
        pytest.fail(f'unknown snippet-test kind {kind!r} (config, merge or run)')
