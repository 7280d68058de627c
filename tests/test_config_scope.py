"""A config anywhere on disk inherits the project's configs by scope, as ``mmdet::`` works:
``_base_ = 'mmmetaformer::coco/...'`` (ade20k/, imagenet/) loads the same settings as the file
in configs/ and builds under the scope a Runner would use."""
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

import mmmetaformer  # noqa: F401  (registers the scope, as tools/train.py's import does)

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


def without_scopes(value):
    """The settings without mmengine's ``_scope_`` marks, which depend on how a base is named."""
    if isinstance(value, dict):
        return {k: without_scopes(v) for k, v in value.items() if k != '_scope_'}
    if isinstance(value, (list, tuple)):
        return type(value)(without_scopes(v) for v in value)
    return value


@pytest.mark.parametrize('name', ['coco/mask-rcnn_caformer-s18_fpn_1x_coco.py',
                                  'ade20k/upernet_caformer-s18_8xb2-160k_ade20k-512x512.py',
                                  'imagenet/caformer_s18_in1k.py'])
def test_config_elsewhere_inherits_by_scope(name, tmp_path, monkeypatch):
    user = tmp_path / 'mine' / 'my_config.py'
    user.parent.mkdir()
    user.write_text(f"_base_ = 'mmmetaformer::{name}'\nwork_dir = 'work_dirs/mine'\n")
    monkeypatch.chdir(tmp_path)
    cfg = Config.fromfile(str(user))

    assert cfg.pop('work_dir') == 'work_dirs/mine'
    assert without_scopes(cfg.to_dict()) == without_scopes(
        Config.fromfile(str(CONFIGS / name)).to_dict())
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model)
    assert type(model.backbone).__name__ == cfg.model.backbone.type.split('.')[-1]
    assert type(model.backbone).__module__.startswith('mmmetaformer.')


def test_unknown_config_names_the_path(tmp_path):
    user = tmp_path / 'my_config.py'
    user.write_text("_base_ = 'mmmetaformer::coco/no-such-config.py'\n")
    with pytest.raises(FileNotFoundError, match=r'\.mim/configs/coco/no-such-config\.py'):
        Config.fromfile(str(user))
