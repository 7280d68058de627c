"""The OpenMMLab model index (``model-index.yml`` and a ``metafile.yml`` per family), read with
the loaders mim and mmengine use: every config listed once, the official weights as
docs/model_zoo.md links them, and the figures the papers publish."""
import re
import runpy
from pathlib import Path

import pytest
from mim.commands.search import convert2df
from modelindex.load_model_index import load

ROOT = Path(__file__).resolve().parents[1]
GENERATE = runpy.run_path(str(ROOT / 'configs' / 'generate.py'))
DIRS = ('imagenet', 'coco', 'ade20k')
# the papers' MACs (G) at 384x384 (MetaFormer baselines, table of the 384 models)
MACS_384 = {'caformer_s18': 13.4, 'caformer_s36': 26.0, 'caformer_m36': 42.0,
            'caformer_b36': 72.2, 'convformer_s18': 11.6, 'convformer_s36': 22.4,
            'convformer_m36': 37.7, 'convformer_b36': 66.5}


@pytest.fixture(scope='module')
def table():
    """The index as ``mim search`` reads it: one row per model, named as mim names them."""
    index = load(str(ROOT / 'model-index.yml'))
    assert index.check(silent=True) == []
    return convert2df(index)


def metric(table, name, column):
    value = table.loc[name].get(column)
    return None if value != value else value  # NaN: no such field


def test_index_files_match_generator():
    generated = GENERATE['index_files']()
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / 'configs').glob('*/metafile.yml')}
    assert on_disk | {'model-index.yml'} == set(generated), 'run python configs/generate.py'
    for path, text in generated.items():
        assert (ROOT / path).read_text() == text, f'{path}: run python configs/generate.py'
    # the installed package's index (mmengine, and mim for a regular install) is this file
    assert (ROOT / 'mmmetaformer' / '.mim' / 'model-index.yml').resolve() == \
        ROOT / 'model-index.yml'


def test_every_config_is_listed(table):
    configs = {p.relative_to(ROOT).as_posix()
               for d in DIRS for p in (ROOT / 'configs' / d).glob('*.py')}
    assert set(table['config']) == configs
    assert table.index.is_unique
    # each entry is named after its config, except the official ImageNet-21K pretrained
    # weights fine-tuned on ImageNet-1K, which the ImageNet-1K config of their resolution runs
    renamed = {name: config for name, config in table['config'].items()
               if Path(config).stem != name}
    assert len(renamed) == 16
    for name, config in renamed.items():
        model, _, resolution = re.fullmatch(r'(\w+?_\w\d+)_((384)_)?in21ft1k', name).groups()
        assert config == f'configs/imagenet/{model}_{resolution + "_" if resolution else ""}in1k.py'


def official_links():
    """``{entry name: URL}`` of the official ImageNet weights in docs/model_zoo.md's tables."""
    text = (ROOT / 'docs' / 'model_zoo.md').read_text()
    text = text.split('## ImageNet weights', 1)[1].split('\n## ', 1)[0]
    entry = {'in1k 224': '{}_in1k', 'in1k 384': '{}_384_in1k', 'in21k → in1k 224': '{}_in21ft1k',
             'in21k → in1k 384': '{}_384_in21ft1k', 'in21k (21841 classes)': '{}_in21k'}
    links, header = {}, None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if cells[0] == 'model':
            header = cells
        elif header and len(cells) == len(header) and re.fullmatch(r'[a-z0-9]+_[sbm]\d+', cells[0]):
            for column, cell in zip(header[1:], cells[1:]):
                url = re.search(r'\[official\]\((\S+)\)', cell)
                if url:
                    links[entry[column].format(cells[0])] = url[1]
    return links


def test_weights_are_the_official_files(table):
    links = official_links()
    assert len(links) == 28 + 8 * 4
    weights = table['weight'].dropna().to_dict()
    assert weights == links
    # the dense-prediction configs: no published weights mim can download (see docs)
    assert all(not c.startswith('configs/imagenet/') for c in table[table['weight'].isna()]
               ['config'])


def readme_figures():
    """``{model: (params M, MACs G, top-1)}`` of the README's table of the 28 models."""
    rows = re.findall(r'^\| (\w+_[sbm]\d+) \| ([\d.]+)M \| ([\d.]+)G \| ([\d.]+) \|',
                      (ROOT / 'README.md').read_text(), re.M)
    return {model: tuple(map(float, figures)) for model, *figures in rows}


def test_imagenet_figures(table):
    figures = readme_figures()
    assert len(figures) == 28
    for model, (params, macs, top1) in figures.items():
        for name in (f'{model}_in1k', f'{model}_in21ft1k'):
            if name not in table.index:
                continue
            row = table.loc[name]
            assert round(row['parameters'] / 1e6, 2) == params, name
            assert round(row['flops'] / 1e9, 2) == macs, name
        assert metric(table, f'{model}_in1k', 'imagenet-1k/top_1_accuracy') == top1
    for model, macs in MACS_384.items():
        name = f'{model}_384_in1k'
        assert abs(table.loc[name, 'flops'] / 1e9 / macs - 1) < 0.01, name
        assert table.loc[name, 'parameters'] == table.loc[f'{model}_in1k', 'parameters']
        # the published top-1 the config names in its first line
        paper = re.search(r'\(paper: ([\d.]+) top-1\)',
                          (ROOT / table.loc[name, 'config']).read_text())
        assert metric(table, name, 'imagenet-1k/top_1_accuracy') == float(paper[1])
    for name in table.index[table.index.str.endswith('in21k')]:
        assert metric(table, name, 'imagenet-1k/top_1_accuracy') is None  # pretraining only


def test_dense_results_are_the_poolformer_papers(table):
    """Only the configs of the PoolFormer paper's protocol have published results, and they
    are the ones docs/model_zoo.md reports from the paper."""
    text = (ROOT / 'docs' / 'model_zoo.md').read_text()
    text = ' '.join(text.split('Reported in the PoolFormer paper', 1)[1].split('\n\n')[0].split())
    retina = re.search(r'RetinaNet AP ([\d. /]+) and', text)[1].split(' / ')
    box_mask = re.findall(r'([\d.]+)/([\d.]+)', re.search(r'box/mask (.+?) for', text)[1])
    miou = re.search(r'mIoU ([\d. /]+) for', text)[1].split(' / ')
    expected = {}
    for size, ap, (box, mask) in zip(('s12', 's24', 's36'), retina, box_mask):
        expected[f'retinanet_poolformer-{size}_fpn_1x_coco'] = {'coco/box_ap': float(ap)}
        expected[f'mask-rcnn_poolformer-{size}_fpn_1x_coco'] = {
            'coco/box_ap': float(box), 'coco/mask_ap': float(mask)}
    for size, value in zip(('s12', 's24', 's36', 'm36', 'm48'), miou):
        expected[f'fpn_poolformer-{size}_8xb4-40k_ade20k-512x512'] = {'ade20k/miou': float(value)}
    columns = ['coco/box_ap', 'coco/mask_ap', 'ade20k/miou']
    dense = table[~table['config'].str.startswith('configs/imagenet/')]
    assert len(dense) == 100
    found = {name: {c: v for c, v in row.items() if v == v}
             for name, row in dense[columns].iterrows() if row.notna().any()}
    assert found == expected


def model_pattern(name):
    """The config name with the model taken out: ``mask-rcnn_{}_fpn_1x_coco``."""
    return re.sub(r'[a-z0-9]+[_-][sbm]\d+', '{}', name, count=1)


def test_metadata_follows_the_configs(table):
    """Training data, schedule and total batch of one config per recipe, read from the
    config itself."""
    from mmengine.config import Config
    datasets = {'ImageNet': 'imagenet-1k', 'ImageNet21k': 'imagenet-21k', 'CocoDataset': 'coco',
                'ADE20KDataset': 'ade20k'}
    named = table[[Path(c).stem == n for n, c in table['config'].items()]]
    recipes = {model_pattern(name): name for name in sorted(named.index, reverse=True)}
    assert len(recipes) == 3 + 6
    for name in recipes.values():
        row, cfg = table.loc[name], Config.fromfile(str(ROOT / table.loc[name, 'config']))
        dataset = cfg.train_dataloader.dataset
        while 'dataset' in dataset:  # RepeatDataset and other wrappers
            dataset = dataset.dataset
        assert row['training_data'] == datasets[dataset.type], name
        assert row['batch_size'] == cfg.auto_scale_lr.base_batch_size, name
        schedule = 'epochs' if 'max_epochs' in cfg.train_cfg else 'iterations'
        assert row[schedule] == cfg.train_cfg.get('max_epochs', cfg.train_cfg.get('max_iters'))


def test_mmengine_finds_weights_by_config():
    """mmengine's hub reads the installed package's index: the config of a listed model with
    its weights, and an unlisted base config by its path."""
    from mmengine.hub import get_config
    cfg = get_config('mmmetaformer::imagenet/caformer_s18_in1k.py', pretrained=True)
    assert cfg.model_path == 'https://huggingface.co/sail/dl/resolve/main/caformer/caformer_s18.pth'
    assert cfg.model.backbone.arch == 's18'
    base = get_config('mmmetaformer::_base_/mask-rcnn_metaformer_fpn_1x_coco.py')
    assert base.model.type == 'MaskRCNN'
