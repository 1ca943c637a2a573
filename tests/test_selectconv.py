"""Selective convolution: the unit, ECDM, dealloc/realloc, the epoch hook, export, models."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods import get_method
from pipeline.methods.extensions import cpu_extension
from pipeline.methods.channel_copy import CopySlots, FusedCopySlots, copy_slots
from pipeline.methods.selectconv import (SelectConv, SelectiveConv2d, effective_params,
                                         epoch_generator, selective_units)
from pipeline.models.cifar_densenet import CifarDenseNet
from pipeline.models.registry import build_model
from pipeline.models.selective_nets import (cifar_preact_resnet, selective_torchvision_densenet,
                                            selective_unit)
from pipeline.models.summary import count_params

pytestmark = pytest.mark.unit


def tiny_densenet() -> nn.Module:
    return CifarDenseNet(10, 4, 1.0, num_classes=10, unit=selective_unit)


def tiny_resnet() -> nn.Module:
    return cifar_preact_resnet(11, 10, selective_unit)


def train_steps(model: nn.Module, steps: int, seed: int, lr: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 16, 16, generator=generator)
        y = torch.randint(0, 10, (8,), generator=generator)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def close_at_random(model: nn.Module, fraction: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _, unit in selective_units(model):
        closing = torch.rand(unit.in_channels, generator=generator) < fraction
        unit.is_open[closing] = 0
        unit.ptr[closing] = -1
        unit.refresh_copies()


def reallocate_at_random(model: nn.Module, fraction: float, seed: int) -> None:
    close_at_random(model, fraction, seed)
    generator = epoch_generator(seed, 0)
    for _, unit in selective_units(model):
        unit.realloc(generator)


@pytest.mark.parametrize("name,method,params", [
    ("cifar_densenet40", None, 211_978), ("cifar_densenet40", "selectconv", 216_514),
    ("cifar_resnet164", None, 1_661_274), ("cifar_resnet164", "selectconv", 1_680_954),
])
def test_reference_parameter_counts(name, method, params):
    assert count_params(build_model(name, 10, method=method))[0] == params


def test_ecdm_matches_formula_on_hand_set_weights():
    unit = SelectiveConv2d(3, 2, 3, K=3)
    gamma, beta = [0.5, -2.0, 1.5], [0.3, 1.0, -0.7]
    with torch.no_grad():
        unit.norm.weight.copy_(torch.tensor(gamma))
        unit.norm.bias.copy_(torch.tensor(beta))
        unit.conv.weight.copy_(torch.arange(54, dtype=torch.float).view(2, 3, 3, 3) / 10 - 2.5)
    unit.is_open[2] = 0

    def expected(g, b):
        r = b / (abs(g) + 1e-8)
        return abs(g) * math.exp(-r * r / 2) / math.sqrt(2 * math.pi) \
            + b * 0.5 * (1 + math.erf(r / math.sqrt(2)))

    weights = unit.conv.weight.detach().double()
    want = torch.zeros(2, 3, dtype=torch.double)
    for o in range(2):
        for i in range(2):  # channel 2 is closed: its damage is 0
            want[o, i] = weights[o, i].sum() * expected(gamma[i], beta[i])
    nrm = want.abs() / (want.abs().sum(1, keepdim=True) + 1e-8)
    assert torch.allclose(unit.ecdm().double(), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(unit.ecdm(normalize=True).double(), nrm, rtol=1e-5, atol=1e-7)


def test_dealloc_closes_exactly_the_expected_channels():
    # γ = 1, β = 0: every E_i is φ(0), so nrm is the row-normalised W (rows below sum to 1).
    # max_o nrm orders the channels 1, 0, 2, 3, 4; the running sums of row 0 reach
    # 0.0003, 0.0005, 0.0011: channels 1 and 0 fit in γ_budget = 0.001, channel 2 does not.
    nrm = torch.tensor([[0.0002, 0.0003, 0.0006, 0.4, 0.5989],
                        [0.0004, 0.0001, 0.0003, 0.6, 0.3992]])
    unit = SelectiveConv2d(5, 2, 1, K=3)
    with torch.no_grad():
        unit.conv.weight.copy_(nrm.view(2, 5, 1, 1))
    unit.ptr[1] = 3  # a copy being closed forgets its source
    unit.refresh_copies()
    unit.dealloc(0.001)
    assert unit.is_open.tolist() == [0, 0, 1, 1, 1]
    assert unit.ptr.tolist() == [-1] * 5 and unit.num_copies == 0


def test_realloc_leaves_the_output_unchanged_exactly():
    torch.manual_seed(0)
    model = tiny_densenet()
    train_steps(model, 3, seed=1)
    close_at_random(model, 0.3, seed=2)
    x = torch.randn(4, 3, 16, 16)
    before_eval = model.eval()(x)
    before_train = copy.deepcopy(model).train()(x)
    generator = epoch_generator(0, 0)
    edits = {}
    for _, unit in selective_units(model):
        edits.update(unit.realloc(generator))
    copies = sum(u.num_copies for _, u in selective_units(model))
    assert copies > 0 and edits
    assert torch.equal(model.eval()(x), before_eval)
    assert torch.equal(copy.deepcopy(model).train()(x), before_train)
    for _, unit in selective_units(model):
        if unit.K == 0:
            continue
        dst, src = unit.copy_dst, unit.ptr[unit.copy_dst]
        assert (unit.conv.weight[:, dst] == 0).all() and (unit.is_open == 1).all()
        assert (unit.shift[dst].abs() <= 1.5).all()
        assert edits[unit.norm.weight].nonzero().flatten().tolist() == dst.tolist()
        assert (src >= 0).all() and (unit.ptr[src] == -1).all()  # sources are originals


def test_realloc_respects_n_max():
    unit = SelectiveConv2d(6, 4, 1, K=1)
    with torch.no_grad():
        unit.conv.weight.fill_(1.0)
        unit.norm.weight.copy_(torch.tensor([1.0, 1, 1, 5, 1, 1]))  # channel 3 scores highest
    unit.ptr[4], unit.ptr[5] = 3, 3
    unit.is_open[0] = 0
    unit.refresh_copies()
    unit.realloc(epoch_generator(0, 0), n_max=1)  # 3 has 2 > 1 copies: not a source
    assert unit.ptr[0].item() not in (3, 4, 5)
    assert unit.ptr[0].item() in (1, 2)


def test_integer_shift_moves_interior_pixels_by_that_many():
    H = W = 9
    unit = SelectiveConv2d(2, 2, 1, K=3).eval()
    with torch.no_grad():
        unit.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        # normalised offset = shift / ((H+W)/4), one pixel = 2 / (W-1) with align_corners=True
        pixels = torch.tensor([2.0, -1.0])  # (x, y)
        unit.shift[1] = pixels * 2 / (W - 1) * (H + W) / 4
    unit.ptr[1] = 0
    unit.refresh_copies()
    x = torch.rand(3, 2, H, W) + 0.1  # positive: the ReLU keeps everything
    out = unit(x) * math.sqrt(1 + unit.norm.eps)
    moved, source = out[:, 1], x[:, 0]
    # out(v, u) = source(v + dy, u + dx) with dx = 2, dy = -1, wherever that lies inside.
    assert torch.allclose(moved[:, 1:, : W - 2], source[:, : H - 1, 2:], atol=1e-5)
    assert torch.allclose(out[:, 0], x[:, 0], atol=1e-6)


def test_shift_receives_gradient_and_weight_decay_group():
    model = tiny_densenet()
    reallocate_at_random(model, 0.3, seed=0)
    for _, unit in selective_units(model):
        with torch.no_grad():  # realloc zeroes W[:, copies]; a trained W carries gradient
            unit.conv.weight[:, unit.copy_dst] = 0.1
    model.train()(torch.randn(4, 3, 16, 16)).sum().backward()
    shifts = [u.shift for _, u in selective_units(model) if u.shift is not None]
    assert any(s.grad is not None and s.grad.abs().sum() > 0 for s in shifts)
    groups = SelectConv().param_groups(model)
    assert groups[0]["weight_decay"] == 1e-5
    assert {id(p) for p in groups[0]["params"]} == {id(s) for s in shifts}


def _average(models: list[nn.Module]) -> None:
    """What data-parallel training keeps equal: parameters and the float buffers the engine
    averages before evaluation."""
    with torch.no_grad():
        for tensors in zip(*(m.state_dict().values() for m in models)):
            if tensors[0].is_floating_point():
                mean = sum(tensors) / len(tensors)
                for t in tensors:
                    t.copy_(mean)


def test_two_ranks_stay_identical_through_several_hooks():
    torch.manual_seed(0)
    ranks = [tiny_densenet(), None]
    with torch.no_grad():  # a dead channel (E = 0) per unit: the first hook moves it
        for _, unit in selective_units(ranks[0]):
            unit.norm.weight[0] = unit.norm.bias[0] = 0
    ranks[1] = copy.deepcopy(ranks[0])
    method = SelectConv(gamma=0.05)
    for epoch in range(4):
        for rank, model in enumerate(ranks):
            train_steps(model, 2, seed=10 * epoch + rank)  # each rank sees other data
        _average(ranks)
        edits = [method.on_epoch_end(model, epoch, 10, seed=7) for model in ranks]
        assert [[m.tolist() for m in e.values()] for e in edits[:1]] == \
            [[m.tolist() for m in e.values()] for e in edits[1:]]
        for (key, a), b in zip(ranks[0].state_dict().items(), ranks[1].state_dict().values()):
            assert torch.equal(a, b), key
        assert method.metrics(ranks[0]) == method.metrics(ranks[1])
    assert method.metrics(ranks[0])["moved_total"] > 0


def test_closed_k0_channels_stay_closed():
    torch.manual_seed(0)
    model = tiny_resnet()
    method = SelectConv(gamma=0.05)
    closed: dict[str, set[int]] = {}
    for epoch in range(4):
        train_steps(model, 2, seed=epoch)
        method.on_epoch_end(model, epoch, 10, seed=0)
        for name, unit in selective_units(model):
            if unit.K == 0:
                now = set((unit.is_open == 0).nonzero().flatten().tolist())
                assert closed.get(name, set()) <= now
                closed[name] = now
    assert sum(map(len, closed.values())) > 0
    assert method.metrics(model)["pruned_k0"] == sum(map(len, closed.values()))


def test_hook_stops_after_the_first_half():
    model = tiny_densenet()
    close_at_random(model, 0.5, seed=0)
    state = copy.deepcopy(model.state_dict())
    assert SelectConv(gamma=0.05).on_epoch_end(model, 5, 10, seed=0) == {}
    assert all(torch.equal(a, b) for a, b in zip(state.values(), model.state_dict().values()))


@pytest.mark.parametrize("build", [tiny_densenet, tiny_resnet])
def test_export_removes_closed_k0_channels_and_matches(build):
    torch.manual_seed(0)
    model = build()
    method = SelectConv(gamma=0.05)
    for epoch in range(3):
        train_steps(model, 3, seed=epoch)
        method.on_epoch_end(model, epoch, 10, seed=0)
    exported = method.export(model)
    assert not any(u.K == 0 for _, u in selective_units(exported))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(exported(x), model.eval()(x), atol=1e-5)
    assert count_params(exported)[0] < count_params(model)[0]
    unused_shifts = sum(2 * (u.in_channels - u.num_copies) for _, u in selective_units(exported))
    assert effective_params(model) == count_params(exported)[0] - unused_shifts
    assert method.metrics(model)["effective_params"] == effective_params(model)


def test_state_dict_round_trip_restores_copies():
    model = tiny_densenet()
    reallocate_at_random(model, 0.3, seed=0)
    fresh = tiny_densenet()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert [u.num_copies for _, u in selective_units(fresh)] == \
        [u.num_copies for _, u in selective_units(model)]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_torchvision_densenet_conversion_keeps_the_function():
    torch.manual_seed(0)
    selective = selective_torchvision_densenet("densenet121", 10).eval()
    torch.manual_seed(0)
    plain = build_model("densenet121", 10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(selective(x), plain(x), atol=1e-5)
    roles = [u.K for _, u in selective_units(selective)]
    assert roles.count(0) == 58 and roles.count(3) == 58 + 3


def test_options_are_validated():
    assert isinstance(get_method("selectconv", gamma=0.01, n_max=32), SelectConv)
    with pytest.raises(ValueError, match="gamma"):
        get_method("selectconv", gamma=2)
    with pytest.raises(ValueError, match="n_max"):
        get_method("selectconv", n_max=0)
    with pytest.raises(ValueError, match="K"):
        get_method("selectconv", K=3)


def needs_fused_kernels() -> None:
    if cpu_extension("copy_slots") is None:
        pytest.skip("the fused CPU kernels could not be built (no C++ compiler?)")


@pytest.mark.parametrize("function", [CopySlots, FusedCopySlots])
def test_copy_slots_gradient_matches_finite_differences(function):
    if function is FusedCopySlots:
        needs_fused_kernels()
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 7, dtype=torch.double, requires_grad=True)
    offset = (0.3 * torch.randn(3, 2, dtype=torch.double)).requires_grad_()
    dst, src = torch.tensor([1, 3, 4]), torch.tensor([0, 0, 2])   # a repeated source
    assert torch.autograd.gradcheck(function.apply, (x, offset, dst, src))


def assert_fused_copy_matches_grid_sample(x, offset, dst, src) -> None:
    """Output, ∂x and ∂offset of the fused kernels against grid_sample's, to float rounding."""
    grad = torch.randn_like(x)
    results = []
    for function in (CopySlots, FusedCopySlots):
        out = function.apply(x, offset, dst, src)
        results.append((out, *torch.autograd.grad(out, (x, offset), grad)))
    tol = 1e-5 if x.dtype == torch.float32 else 1e-12
    for reference, fused in zip(*results):
        torch.testing.assert_close(fused, reference, atol=tol * reference.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_copy_matches_grid_sample(dtype):
    needs_fused_kernels()
    torch.manual_seed(0)
    x = torch.randn(3, 7, 9, 11, dtype=dtype, requires_grad=True)
    dst, src = torch.tensor([1, 4, 5, 6]), torch.tensor([2, 2, 0, 3])
    # small shifts, and ones that leave the image (border padding, zero coordinate gradient)
    offset = torch.tensor([[0.13, -0.27], [1.61, 0.05], [-0.41, -1.83], [2.4, 2.2]], dtype=dtype,
                          requires_grad=True)
    assert_fused_copy_matches_grid_sample(x, offset, dst, src)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_copy_matches_grid_sample_at_whole_pixel_shifts(dtype):
    """A whole-pixel shift puts samples on the kinks of bilinear interpolation, where the shift
    gradient is a one-sided difference: both paths must take the side grid_sample's own
    coordinate falls on (H = 6, W = 9, shift_y = −1.5: −1 pixel, which float32 lands exactly on
    for some rows and just below for others)."""
    needs_fused_kernels()
    torch.manual_seed(0)
    H, W = 6, 9
    x = torch.randn(3, 7, H, W, dtype=dtype, requires_grad=True)
    dst, src = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 0, 6, 6, 0])
    # (x, y) shifts as SelectiveConv2d scales them: one pixel is 0.9375 along x, 1.5 along y;
    # the last lands on the far border (8 pixels) along both axes
    shift = torch.tensor([[0.0, -1.5], [0.9375, 1.5], [-1.875, 3.0], [2.8125, -3.0], [7.5, 7.5]],
                         dtype=dtype)
    offset = (shift / ((H + W) / 4)).requires_grad_()
    assert_fused_copy_matches_grid_sample(x, offset, dst, src)


def test_widening_shortcut_appends_the_zero_channels_after_x():
    block = build_model("cifar_resnet164", 10, method="selectconv").features[1][0]  # 16 → 64
    with torch.no_grad():
        block.unit3.conv.weight.zero_()  # the block's output is then its shortcut alone
    x = torch.randn(2, 16, 4, 4)
    out = block.eval()(x)
    assert out.shape == (2, 64, 4, 4)
    assert torch.equal(out[:, :16], x) and not out[:, 16:].any()


def test_copy_falls_back_to_grid_sample_without_a_compiler(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: g++ not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    cpu_extension.cache_clear()
    try:
        x = torch.randn(2, 4, 5, 5, requires_grad=True)
        offset, dst, src = torch.tensor([[0.2, -0.3]]), torch.tensor([3]), torch.tensor([1])
        out = copy_slots(x, offset, dst, src)
        assert "g++ not found" in caplog.text
        assert type(out.grad_fn).__name__ == "CopySlotsBackward"
    finally:
        cpu_extension.cache_clear()
