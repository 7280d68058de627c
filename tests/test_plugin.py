"""``import mmmetaformer`` only registers: no function, method or module attribute of the host
packages is replaced or added, and what it registers reaches every way mmengine loads."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import interpreter

ROOT = Path(__file__).resolve().parents[1]

HOSTS = ('mmengine', 'mmcv', 'mmdet', 'mmseg', 'mmpretrain', 'timm', 'torch', 'numpy')

# Run in an interpreter that has not imported mmmetaformer (tests/interpreter.py): import the
# host packages, record the attributes of their loaded
# modules and of the classes those define, import mmmetaformer, compare. A module the import
# loads for the first time has no record; binding it as an attribute of its package is the
# import system's doing, not a change.
SNAPSHOT = '''
import importlib, json, sys, types
HOSTS = %r
for name in ('mmengine.runner', 'mmengine.hooks', 'mmengine.fileio', 'mmengine.config',
             'mmengine.model', 'mmcv.cnn', 'mmcv.transforms', 'mmdet.models', 'mmseg.models',
             'mmpretrain.models', 'timm.layers', 'numpy', 'torch'):
    importlib.import_module(name)

def snapshot():
    state = {}
    for name, module in list(sys.modules.items()):
        if name.split('.')[0] not in HOSTS or module is None:
            continue
        for attr, value in list(vars(module).items()):
            state[(name, attr)] = value
            if isinstance(value, type) and value.__module__ == name:
                for key, member in list(vars(value).items()):
                    state[(name, f'{attr}.{key}')] = member
    return state

before = snapshot()
import mmmetaformer  # noqa
after = snapshot()
known = {name for name, _ in before}
changed = sorted('.'.join(k) for k in before.keys() & after.keys() if before[k] is not after[k])
added = sorted('.'.join(k) for k in after.keys() - before.keys()
               if k[0] in known and not isinstance(after[k], types.ModuleType))
print(json.dumps(dict(changed=changed, added=added, modules=len(known))))
''' % (HOSTS, )

# What a registration itself rebinds: mmengine's register_scheme rebuilds its (sorted) table.
REGISTRATIONS = {'mmengine.runner.checkpoint.CheckpointLoader._schemes'}


@pytest.mark.slow  # a child interpreter
def test_import_replaces_or_adds_no_host_attribute():
    run = interpreter.run(['-c', SNAPSHOT], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result['modules'] > 500  # the host packages were loaded before the import
    assert set(result['changed']) - REGISTRATIONS == set()
    assert result['added'] == []


@pytest.mark.slow  # a new interpreter
def test_import_leaves_classification_and_timm_unloaded():
    """A detector's or segmentor's run does not pay for what only a classifier or a timm://
    download needs: mmpretrain, timm and torchvision load when a config builds the head or
    a timm:// checkpoint is read."""
    code = ('import sys, mmmetaformer; print(sorted({m.split(".")[0] for m in sys.modules} & '
            '{"mmpretrain", "timm", "torchvision"}))')
    run = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-1] == '[]'


def test_every_mmengine_checkpoint_scheme_reads_by_the_trust_rule():
    from mmengine.runner import CheckpointLoader

    import mmmetaformer.sources as sources
    for path in ('x.pth', '/abs/x.pth', 'http://h/x.pth', 'https://h/x.pth', 'timm://a.b',
                 'torchvision://resnet50', 'modelzoo://resnet50', 'open-mmlab://x',
                 'openmmlab://x', 'mmcls://x', 's3://b/x.pth', 'cluster:s3://b/x.pth',
                 'petrel://b/x.pth'):
        loader = CheckpointLoader._get_checkpoint_loader(path)
        assert loader.__module__ == sources.__name__, path


def test_config_scope_and_file_backend_are_registered():
    from mmengine.config.utils import MODULE2PACKAGE
    from mmengine.fileio import get_file_backend

    import mmmetaformer  # noqa: F401
    from mmmetaformer.engine.hooks import AtomicLocalBackend
    assert MODULE2PACKAGE['mmmetaformer'] == 'mmmetaformer.registry'
    assert isinstance(get_file_backend('x', backend_args=dict(backend='mmmetaformer_local')),
                      AtomicLocalBackend)


@pytest.mark.parametrize('name', ['torchvision://no_such_model', 'mmcls://no_such_model'])
def test_unknown_model_zoo_names_are_one_clear_error(name):
    from mmengine.runner import CheckpointLoader

    from mmmetaformer.trust import CheckpointError
    with pytest.raises(CheckpointError, match='lists no model'):
        CheckpointLoader.load_checkpoint(name)


@pytest.mark.slow  # a child interpreter
def test_train_test_and_infer_do_not_import_the_export_code():
    code = ('import sys; sys.argv = ["x"]; sys.path.insert(0, "tools"); import train, test, '
            'infer; print(sorted(m for m in sys.modules if m.startswith(("mmmetaformer.deploy", '
            '"onnx"))))')
    run = interpreter.run(['-c', code], cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-1] == '[]'


def test_model_code_imports_no_download_code():
    """The backbone reads checkpoints through mmengine's CheckpointLoader, whose schemes the
    package registers: the model code and the load path import neither the sources module nor
    a downloader."""
    import ast
    for path in [*(ROOT / 'mmmetaformer' / 'models').glob('*.py'),
                 ROOT / 'mmmetaformer' / 'checkpoints.py']:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add('.' * node.level + (node.module or ''))
        assert not {n for n in names if n.split('.')[-1] in ('sources', 'hub', 'huggingface_hub',
                                                              'request', 'urllib')}, path
