"""Whole-model files load whole or not at all, through every entry: the tools (test, infer,
export), mmdet's init_detector and mmengine's load_checkpoint. The attacks: a file in the
project's own training layout with the mask head and backbone stage 3 removed, and a file of
the same model trained for 5 classes given to the 3-class demo config."""
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import load_checkpoint

from mmmetaformer.trust import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import export_onnx  # noqa: E402
import infer  # noqa: E402
from common import run_tool  # noqa: E402

DEMO = str(ROOT / 'configs' / 'demo' / 'caformer_s18_maskrcnn_demo.py')


def _demo_model(num_classes=3):
    cfg = Config.fromfile(DEMO)
    cfg.model.backbone.init_cfg = None
    cfg.model.roi_head.bbox_head.num_classes = cfg.model.roi_head.mask_head.num_classes = \
        num_classes
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(cfg.model)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """(demo config's model state, a partial own-layout file, a 5-class file), beside the demo
    data the demo config reads (data/demo/coco)."""
    from demo_data import write_coco_demo
    root = tmp_path_factory.mktemp('files')
    write_coco_demo(str(root / 'data' / 'demo' / 'coco'), num_train=1, num_val=1)
    state = _demo_model().state_dict()
    partial = {k: v for k, v in state.items()
               if not k.startswith(('roi_head.mask_head.', 'backbone.stages.3.'))}
    meta = dict(epoch=3, iter=192, dataset_meta=dict(classes=('circle', 'square', 'triangle')))
    torch.save(dict(meta=meta, state_dict=partial), root / 'epoch_3.pth')
    torch.save(dict(meta=dict(meta, dataset_meta=dict(classes=tuple('abcde'))),
                    state_dict=_demo_model(5).state_dict()), root / 'five.pth')
    return state, root / 'epoch_3.pth', root / 'five.pth'


def test_init_detector_refuses_a_partial_file(files):
    from mmdet.apis import init_detector
    _, partial, _ = files
    with pytest.raises(CheckpointError, match=r'(?s)missing 33 tensors: stages\.3\..*Nothing '
                       'was loaded'):  # the backbone's part, by the backbone's load hook
        init_detector(DEMO, str(partial), device='cpu')


def test_init_detector_refuses_a_file_of_other_classes(files):
    from mmdet.apis import init_detector
    _, _, five = files
    with pytest.raises(CheckpointError) as err:
        init_detector(DEMO, str(five), device='cpu')
    message = str(err.value)
    assert message.startswith(f'checkpoint {five} did not fit the model')
    assert 'wrong shape' in message and 'roi_head.bbox_head.fc_cls.weight' in message


def test_mmengine_load_checkpoint_then_eval_refuses_a_partial_head(files, tmp_path):
    """mmengine loads what fits and warns; the model refuses evaluation, naming the rest."""
    state, _, _ = files
    path = tmp_path / 'headless.pth'
    torch.save(dict(state_dict={k: v for k, v in state.items()
                                if not k.startswith('roi_head.mask_head.')}), path)
    model = _demo_model()
    load_checkpoint(model, str(path))
    with pytest.raises(CheckpointError, match=r'missing \d+ tensors: roi_head\.mask_head\.'):
        model.eval()
    load_checkpoint(model, str(path))
    model.train()  # training after such a load is a fine-tune, as mmengine takes it
    model.eval()


def _error_of(tool_main):
    with pytest.raises(SystemExit) as exit_:
        run_tool(tool_main)
    message = str(exit_.value.code)
    assert message.startswith('error: ') and 'Traceback' not in message
    return message


@pytest.mark.parametrize('tool', ['test', 'infer', 'export'])
def test_tools_refuse_a_partial_file_naming_what_is_missing(tool, files, tmp_path,
                                                            monkeypatch):
    _, partial, _ = files
    monkeypatch.chdir(partial.parent)  # where the demo config finds data/demo/coco
    if tool == 'test':
        import test as test_tool
        monkeypatch.setattr(sys, 'argv', ['test.py', DEMO, str(partial), '--work-dir',
                                          str(tmp_path / 'work')])
        main = test_tool.main
    elif tool == 'infer':
        image = next((partial.parent / 'data' / 'demo' / 'coco' / 'val2017').iterdir())
        main = lambda: infer.main([str(image), DEMO, '--weights', str(partial),  # noqa: E731
                                   '--out-dir', str(tmp_path / 'out')])
    else:
        main = lambda: export_onnx.main([DEMO, str(partial),  # noqa: E731
                                         '--out', str(tmp_path / 'det.onnx')])
    message = _error_of(main)
    assert f'{partial} (two-stage detector) does not fit the Mask R-CNN' in message
    assert 'roi_head.mask_head' in message and 'backbone.stages.3.' in message
    assert not (tmp_path / 'det.onnx').exists() and not (tmp_path / 'out' / 'vis').exists()
