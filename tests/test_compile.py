"""``torch.compile`` of every family as one graph (``fullgraph=True``) that serves two input
sizes without a recompile (``dynamic=True``) and gives the eager outputs and gradients; and the
documented way of compiling the backbone inside a detector's training step.

Dynamo only (``backend='eager'``): capturing the graph is where the families differ; code
generation (inductor) runs in ``tools/benchmark.py --compile`` and ``tools/gpu_check.py``.
One block per stage keeps every layer of a family at a fraction of the tracing time.
"""
import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import benchmark
from mmmetaformer.archs import FAMILIES, S_DIMS
from mmmetaformer.models import MetaFormer

pytestmark = pytest.mark.slow  # not in `make test-quick`

SIZES = ((64, 96), (96, 128))  # stage 4: 2x3 and 3x4 tokens (a size of 1 would specialise)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny(family: str) -> MetaFormer:
    torch.manual_seed(0)
    model = MetaFormer(arch=dict(FAMILIES[family], depths=(1, 1, 1, 1), dims=(32, 32, 64, 64)))
    model.init_weights()
    return benchmark.perturb(model)


def compile_once(model):
    """``model`` compiled to one graph; the counter of its compiles."""
    counter = torch._dynamo.testing.CompileCounterWithBackend('eager')
    return torch.compile(model, backend=counter, fullgraph=True, dynamic=True), counter


def train_step(model, x):
    """The outputs and the parameter gradients of one forward and backward."""
    model.zero_grad(set_to_none=True)
    outs = model(x)
    sum(out.square().mean() for out in outs).backward()
    return outs, [p.grad for p in model.parameters() if p.grad is not None]


def assert_all_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_training_step_compiles_once(family, one_thread):
    """With gradients: the custom autograd functions are traced into the graph."""
    model = tiny(family).train()
    compiled, counter = compile_once(model)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for size in SIZES:
            x = torch.randn(2, 3, *size)
            outs, grads = train_step(compiled, x)
            ref_outs, ref_grads = train_step(model, x)
            assert_all_close(outs, ref_outs)
            assert_all_close(grads, ref_grads)
    assert counter.frame_count == 1


def test_inference_compiles_once(one_thread):
    """Without gradients the layers take their in-place paths (CAFormer has them all: StarReLU,
    squared ReLU; and attention, depthwise convolution)."""
    model = tiny('caformer').eval()
    compiled, counter = compile_once(model)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.inference_mode():
        for size in SIZES:
            x = torch.randn(2, 3, *size)
            assert_all_close(compiled(x), model(x))
    assert counter.frame_count == 1


def test_backbone_compiled_inside_a_detector(one_thread):
    """The documented way: ``backbone.compile(...)`` in place (its state dict keeps its keys),
    then mmdet's own training step, at two image sizes: the losses of the eager model, one
    compile. (Batches of 2: on CPU a batch of one small image takes other convolution kernels,
    and a compile of its own.)"""
    torch.manual_seed(0)
    detector = benchmark.build_dense('maskrcnn', 'caformer_s18', dict(
        type='mmmetaformer.CAFormer', arch=dict(depths=(1, 1, 1, 1), dims=S_DIMS),
        init_cfg=None))
    detector.init_weights()
    eager = copy.deepcopy(detector)
    keys = list(detector.state_dict())
    counter = torch._dynamo.testing.CompileCounterWithBackend('eager')
    detector.backbone.compile(backend=counter, fullgraph=True, dynamic=True)
    assert list(detector.state_dict()) == keys
    with torch._dynamo.config.patch(error_on_recompile=True):
        for size in ((96, 128), (128, 160)):
            batch = benchmark.dense_batch('maskrcnn', size, 2)
            losses = {}
            for name, model in (('compiled', detector), ('eager', eager)):
                torch.manual_seed(0)  # the RoI sampler draws
                data = model.data_preprocessor(copy.deepcopy(batch), True)
                losses[name] = model.parse_losses(model(**data, mode='loss'))[1]
            assert losses['compiled'].keys() == losses['eager'].keys()
            for key, value in losses['eager'].items():
                torch.testing.assert_close(losses['compiled'][key], value, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1
