"""Associative convolution (CSG): slice layout, dead codes, one shared generator, binary CSG,
exact export, gradients from every generated layer."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.methods import get_method
from pipeline.methods.csg import (ConvSliceGenerator, GeneratedConv2d, _GenerateKernels,
                                  generated_convs)
from pipeline.models import build_model
from pipeline.models.diagnostics import calibrate_batch_norm
from pipeline.models.summary import count_params

pytestmark = pytest.mark.unit


def padded_flat_index(out_channels: int, in_channels: int, slice_size: int,
                      k: int) -> torch.Tensor:
    """Index of each kernel entry (o, i, a, b) in the padded kernel
    [⌈out/S⌉·S, ⌈in/S⌉·S, k, k] flattened row-major."""
    cols = math.ceil(in_channels / slice_size) * slice_size
    index = torch.empty(out_channels, in_channels, k, k, dtype=torch.long)
    for o, i, a, b in itertools.product(range(out_channels), range(in_channels), range(k),
                                        range(k)):
        index[o, i, a, b] = ((o * cols + i) * k + a) * k + b
    return index


# (in, out, S, k, groups): exact fit, row padding with a dead code (16→16, S=12), slices that
# cover a fraction of a row (20 → 6 with S=2), 1×1, grouped.
SHAPES = [(12, 24, 12, 3, 1), (16, 16, 12, 3, 1), (20, 6, 2, 3, 1), (10, 7, 4, 1, 1),
          (8, 12, 4, 3, 2)]


@pytest.mark.parametrize("in_ch,out_ch,s,k,groups", SHAPES)
def test_each_code_generates_its_row_major_run_of_the_padded_kernel(in_ch, out_ch, s, k, groups):
    torch.manual_seed(0)
    csg = ConvSliceGenerator(s, k, code_size=5)
    conv = GeneratedConv2d(in_ch, out_ch, k, groups=groups, generator=csg)
    index = padded_flat_index(out_ch, in_ch // groups, s, k)
    length = s * s * k * k
    slices = conv.codes.detach() @ csg.weight.detach().T          # [n, S·S·k·k]
    with torch.no_grad():
        kernel = conv.kernel()
    assert kernel.shape == (out_ch, in_ch // groups, k, k)
    # entry (o, i, a, b) is entry index % length of the slice of code index // length; the two
    # products (live codes only vs all) may round differently in the last bits, a misplaced
    # entry differs by O(1)
    torch.testing.assert_close(kernel, slices[index // length, index % length])


def dead_codes(conv: GeneratedConv2d) -> set[int]:
    s = conv.generator.slice_size
    k = conv.kernel_size[0]
    index = padded_flat_index(conv.out_channels, conv.in_channels // conv.groups, s, k)
    live = (index // (s * s * k * k)).unique().tolist()
    return set(range(conv.codes.shape[0])) - set(live)


def test_dead_codes_are_those_entirely_in_the_crop_and_get_no_gradient():
    torch.manual_seed(0)
    conv = GeneratedConv2d(16, 16, 3, padding=1, generator=ConvSliceGenerator(12, 3, 8))
    # padded 24×24: each of the 4 codes generates 6 whole rows; rows 18–23 are all cropped
    assert dead_codes(conv) == {3}
    assert dead_codes(GeneratedConv2d(16, 32, 3, generator=conv.generator)) == set()
    conv(torch.randn(2, 16, 5, 5)).square().sum().backward()
    grad_norms = conv.codes.grad.norm(dim=1)
    assert grad_norms[3] == 0
    assert (grad_norms[:3] > 0).all()


def test_batched_generation_has_the_gradient_of_the_plain_product():
    torch.manual_seed(0)
    csg = ConvSliceGenerator(4, 3, code_size=3).double()
    convs = [GeneratedConv2d(i, o, 3, groups=g, generator=csg).double()
             for i, o, _, _, g in [(5, 6, 0, 0, 1), (8, 12, 0, 0, 2), (4, 3, 0, 0, 1)]]

    def kernels(weight, *codes):
        return _GenerateKernels.apply(weight, convs, *codes)

    inputs = (csg.weight.detach().clone().requires_grad_(),
              *(c.codes.detach().clone().requires_grad_() for c in convs))
    assert torch.autograd.gradcheck(kernels, inputs)
    # and the same kernels as the crop of the unbatched product
    for conv, kernel in zip(convs, kernels(*inputs)):
        flat = conv.codes @ csg.weight.T
        torch.testing.assert_close(kernel, flat.view(conv.padded_shape)[
            : conv.out_channels, : conv.in_channels // conv.groups])


def test_the_model_holds_one_csg_and_every_generated_conv_uses_it():
    model = build_model("cifar_resnet8", 10, method="csg", slice=8, code=16)
    state = model.state_dict()
    csg_entries = [k for k, v in state.items() if v.shape == model.csg.weight.shape]
    assert csg_entries == ["csg.weight"]
    convs = generated_convs(model)
    assert len(convs) == 6 and all(c.generator is model.csg for c in convs)
    assert not any("generator" in k for k in state)
    # a reloaded state_dict reproduces the model
    other = build_model("cifar_resnet8", 10, method="csg", slice=8, code=16)
    other.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    model.eval(), other.eval()
    torch.testing.assert_close(model(x), other(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", [None, "csg", "gated", "ce"])
def test_option_a_shortcut_appends_the_zero_channels_after_x(method):
    # as the authors' DownsampleA, cat(x, x·0): a padded block adds its input to the first
    # channels of the branch
    model = build_model("cifar_resnet8", 10, method=method)
    for stage, channels in ((model.layer2, 16), (model.layer3, 32)):
        x = torch.randn(2, channels, 8, 8)
        out = stage[0].downsample(x)
        assert out.shape == (2, 2 * channels, 4, 4)
        assert torch.equal(out[:, :channels], x[:, :, ::2, ::2])
        assert not out[:, channels:].any()


def test_reference_parameter_counts():
    counts = {("cifar_resnet56", 12, 72): 160_450, ("cifar_resnet56", 16, 128): 347_162,
              ("cifar_resnet20", 16, 128): 312_218}
    for (arch, s, c), want in counts.items():
        assert count_params(build_model(arch, 10, method="csg", slice=s, code=c))[0] == want
    assert count_params(build_model("cifar_resnet56", 10))[0] == 853_018
    assert count_params(build_model("resnet18", 1000, method="csg", slice=16,
                                    code=128))[0] == 7_527_976


def train_steps(model: nn.Module, steps: int, size: int = 16) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_binary_csg_stays_half_sign_and_frozen_while_codes_train():
    torch.manual_seed(0)
    model = build_model("cifar_resnet8", 10, method="csg", slice=8, code=16, binary=True)
    weight = model.csg.weight.detach().clone()
    codes = generated_convs(model)[0].codes.detach().clone()
    assert set(weight.unique().tolist()) == {-0.5, 0.5}
    assert not model.csg.weight.requires_grad
    assert count_params(model)[1] == count_params(model)[0] - weight.numel()
    train_steps(model, 3)
    assert torch.equal(model.csg.weight, weight)
    assert not torch.equal(generated_convs(model)[0].codes.detach(), codes)


# Export generates each kernel once instead of in the forward's batched product: float32 sums in
# another order, whose rounding (eps 1.2e-7 per operation) grows through the depth of the net —
# measured up to 4.5e-6 of the largest logit (cifar_mobilenet_v2, 1.8e-4 on logits of ~40). A
# misplaced slice or code moves the logits by a sizeable fraction of their magnitude.
EXPORT_RTOL = 1000 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("arch,size", [("cifar_resnet8", 8), ("cifar_densenet_bc_40_36", 8),
                                       ("cifar_mobilenet_v2", 8), ("cifar_shufflenet_v2_x0_5", 8),
                                       ("resnet50", 32)])
def test_export_materialises_plain_convs_with_the_same_outputs(arch, size):
    torch.manual_seed(0)
    model = build_model(arch, 10, method="csg")
    calibrate_batch_norm(model, torch.randn(4, 3, size, size))
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    exported = get_method("csg").export(model)
    assert not generated_convs(exported) and not hasattr(exported, "csg")
    assert not exported._forward_pre_hooks
    baseline = build_model(arch, 10)
    assert exported.state_dict().keys() == baseline.state_dict().keys()
    assert count_params(exported)[0] == count_params(baseline)[0]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, got = model(x), exported(x)
    assert (expected - got).abs().max() <= EXPORT_RTOL * expected.abs().max()
    # the CSG model is untouched by the export: its generator, codes and statistics as before
    assert generated_convs(model) and hasattr(model, "csg")
    assert model.state_dict().keys() == trained.keys()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_gradients_reach_the_csg_from_every_generated_layer():
    torch.manual_seed(0)
    model = build_model("cifar_resnet8", 10, method="csg", slice=8, code=16)
    kernels: dict[GeneratedConv2d, torch.Tensor] = {}

    def capture(conv: GeneratedConv2d, args) -> None:
        # the model's pre-hook generated this kernel in its one batched matmul
        assert conv.pending_kernel is not None
        conv.pending_kernel.retain_grad()
        kernels[conv] = conv.pending_kernel

    for conv in generated_convs(model):
        conv.register_forward_pre_hook(capture)
    nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)),
                                torch.randint(0, 10, (4,))).backward()
    assert len(kernels) == len(generated_convs(model))
    expected = torch.zeros_like(model.csg.weight)
    for conv, kernel in kernels.items():
        grad_flat = torch.zeros(conv.padded_shape)
        grad_flat[: conv.out_channels, : conv.in_channels] = kernel.grad
        contribution = grad_flat.view(conv.codes.shape[0], -1).T @ conv.codes.detach()
        assert contribution.abs().sum() > 0
        expected += contribution
    torch.testing.assert_close(model.csg.weight.grad, expected)


def test_bad_options_are_config_errors_naming_the_option():
    with pytest.raises(ConfigError, match="slice"):
        build_model("cifar_resnet8", 10, method="csg", slice=0)
    with pytest.raises(ConfigError, match="'model.opts.binary': expected true or false"):
        build_model("cifar_resnet8", 10, method="csg", binary="yes")
    with pytest.raises(ConfigError, match="unknown model option 'slices'"):
        build_model("cifar_resnet8", 10, method="csg", slices=8)
    with pytest.raises(ValueError, match="kernel_size"):
        GeneratedConv2d(4, 4, 1, generator=ConvSliceGenerator(4, 3, 4))
    with pytest.raises(ValueError, match="does not support"):
        build_model("cifar_densenet40", 10, method="csg")
