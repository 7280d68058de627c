# Runtime shared by the ImageNet classification configs (mmpretrain).
# _scope_='mmpretrain' on the mmpretrain types a Runner builds from this file: they stay
# mmpretrain's where the file is inherited as 'mmmetaformer::imagenet/...', which mmengine
# reads under the scope mmmetaformer (docs/get_started.md, configs by scope).
custom_imports = dict(imports=['mmmetaformer'], allow_failed_imports=False)
default_scope = 'mmpretrain'
# the run components (docs/safety.md): checked loads and resume, crash-safe checkpoints
runner_type = 'mmmetaformer.SafeRunner'

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='mmmetaformer.SafeCheckpointHook', interval=1, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='VisualizationHook', enable=False, _scope_='mmpretrain'),
)
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='UniversalVisualizer', vis_backends=vis_backends, _scope_='mmpretrain')
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
