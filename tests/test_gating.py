"""Channel gating with batch-shaping: the loss against SciPy, the gates, compute accounting and
skipping inference against the masked model."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from scipy.stats import beta as beta_dist
from torch import nn

from pipeline.methods import get_method
from pipeline.methods.extensions import cpu_extension
from pipeline.methods.batch_shaping import BetaCDF, batch_shaping_loss
from pipeline.methods.gating import ChannelGate, GatedComputeMeter, binary_concrete, to_skipping
from pipeline.models.registry import build_model
from pipeline.models.summary import count_macs

pytestmark = pytest.mark.unit

A, B = 0.6, 0.4


@pytest.fixture(scope="module")
def prior() -> BetaCDF:
    return BetaCDF(A, B)


def reference_loss(p: np.ndarray) -> float:
    """L_bs computed independently with SciPy (float64)."""
    n, g = p.shape
    ecdf = np.arange(1, n + 1)[:, None] / (n + 1)
    return float(((ecdf - beta_dist.cdf(np.sort(p, axis=0), A, B)) ** 2).sum() / (n * g))


def test_beta_cdf_matches_scipy(prior):
    x = np.concatenate([np.random.default_rng(0).random(20000), [0.0, 1e-30, 1e-7, 0.5,
                        1 - 1e-7, 1.0], np.logspace(-12, -1, 50), 1 - np.logspace(-7, -1, 50)])
    for dtype, tol in ((torch.float64, 1e-7), (torch.float32, 1e-6)):
        ours = prior.cdf(torch.tensor(x, dtype=dtype)).double().numpy()
        assert np.abs(ours - beta_dist.cdf(x.astype(np.float32 if dtype == torch.float32
                                                    else np.float64), A, B)).max() < tol
    pdf = prior.pdf(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).numpy()
    assert np.allclose(pdf, beta_dist.pdf([0.1, 0.5, 0.9], A, B), rtol=1e-10)


# fused: the CPU kernel of csrc/batch_shaping.cpp; False: the torch ops that run on GPU
PATHS = pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])


def needs_kernel(fused: bool) -> None:
    if fused and cpu_extension("batch_shaping") is None:
        pytest.skip("the fused CPU kernel could not be built (no C++ compiler?)")


@PATHS
def test_loss_value_and_gradient(prior, fused):
    needs_kernel(fused)
    rng = np.random.default_rng(1)
    p_np = rng.uniform(0.05, 0.95, size=(24, 7))  # densities inside the clip range
    p = torch.tensor(p_np, dtype=torch.float32, requires_grad=True)
    loss = batch_shaping_loss(p, prior, fused=fused)
    assert loss.item() == pytest.approx(reference_loss(p.detach().double().numpy()), abs=1e-6)
    loss.backward()
    # Central finite differences of the independent loss.
    eps = 1e-6
    numeric = np.zeros_like(p_np)
    base = p.detach().double().numpy()
    for idx in np.ndindex(*p_np.shape):
        up, down = base.copy(), base.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (reference_loss(up) - reference_loss(down)) / (2 * eps)
    assert np.abs(p.grad.double().numpy() - numeric).max() < 1e-5


@PATHS
def test_loss_gradient_uses_clipped_density(prior, fused):
    needs_kernel(fused)
    p = torch.tensor([[1e-12], [0.3], [0.7], [1.0 - 1e-7]], requires_grad=True)
    batch_shaping_loss(p, prior, fused=fused).backward()
    sorted_p = p.detach().double().numpy()[:, 0]
    error = np.arange(1, 5) / 5 - beta_dist.cdf(sorted_p, A, B)
    density = np.clip(beta_dist.pdf(sorted_p, A, B), 1e-3, 100)
    expected = -2 / 4 * density * error
    assert np.allclose(p.grad.numpy()[:, 0], expected, rtol=1e-4, atol=1e-7)


def test_fused_and_torch_losses_agree_with_ties_and_ends(prior):
    needs_kernel(True)
    torch.manual_seed(0)
    p = torch.sigmoid(2 * torch.randn(256, 64))
    p[:5, 0], p[5:9, 1], p[10:20, 2] = 1.0, 0.0, 0.3     # the ends, and ties
    results = []
    for fused in (True, False):
        leaf = p.clone().requires_grad_()
        loss = batch_shaping_loss(leaf, prior, fused=fused)
        loss.backward()
        results.append((loss.item(), leaf.grad))
    (fused_loss, fused_grad), (torch_loss, torch_grad) = results
    assert fused_loss == pytest.approx(torch_loss, rel=1e-5)
    torch.testing.assert_close(fused_grad, torch_grad, rtol=1e-4,
                               atol=1e-4 * torch_grad.abs().max().item())


def test_gate_probability_is_sigmoid_of_logit():
    torch.manual_seed(0)
    logits = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0])
    samples = binary_concrete(logits.expand(200_000, -1))
    assert set(samples.unique().tolist()) <= {0.0, 1.0}
    frequency = samples.mean(0)
    # 5 standard errors of a Bernoulli mean over 200k draws is at most 0.0056
    assert torch.allclose(frequency, torch.sigmoid(logits), atol=0.006)


def test_straight_through_gradient_reaches_logits():
    torch.manual_seed(0)
    logits = torch.zeros(64, 3, requires_grad=True)
    binary_concrete(logits).sum().backward()
    assert (logits.grad > 0).all()


def test_gate_is_deterministic_at_inference():
    gate = ChannelGate(8, 4).eval()
    nn.init.constant_(gate.fc2.bias, 0.0)
    x = torch.randn(5, 8, 4, 4)
    g = gate(x)
    assert torch.equal(g, (gate.logits > 0).float())
    assert torch.equal(g, gate(x))


def test_minimising_the_loss_alone_reaches_the_prior(prior):
    torch.manual_seed(0)
    logits = torch.randn(128, 4, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        batch_shaping_loss(torch.sigmoid(logits), prior).backward()
        opt.step()
    p = torch.sigmoid(logits.detach()).double().numpy()
    ecdf = np.arange(1, 129) / 129
    gap = np.abs(beta_dist.cdf(np.sort(p, axis=0), A, B) - ecdf[:, None]).max()
    start = torch.sigmoid(torch.randn(128, 4)).double().numpy()
    assert gap < 0.05
    assert reference_loss(p) < 0.05 * reference_loss(start)


def _set_gates(model: nn.Module, bias: float, scale: float = 0.0, seed: int = 0) -> None:
    """Gate logits = bias + scale · random projection of the hidden units."""
    torch.manual_seed(seed)
    for gate in model.modules():
        if isinstance(gate, ChannelGate):
            nn.init.normal_(gate.fc2.weight, 0.0, scale)
            nn.init.constant_(gate.fc2.bias, bias)


def _randomise_bn(model: nn.Module) -> None:
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)


@pytest.mark.parametrize("arch,opts,size", [("cifar_resnet8", {}, 16),
                                            ("resnet18", {}, 32),
                                            ("resnet50", {"gate_3x3": True}, 32)])
def test_skipping_inference_matches_masked(arch, opts, size):
    model = build_model(arch, 10, method="gated", **opts).eval()
    _randomise_bn(model)
    _set_gates(model, bias=0.0, scale=2.0)
    first = next(m for m in model.modules() if isinstance(m, ChannelGate))
    nn.init.constant_(first.fc2.bias, -1e3)  # one gate with every channel closed
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        masked = model(x)
        fast = to_skipping(model)
        skipped = fast(x)
        buffer = io.BytesIO()
        torch.save(fast, buffer)
        buffer.seek(0)
        reloaded = torch.load(buffer, weights_only=False)(x)
    assert torch.allclose(masked, skipped, atol=1e-4)
    assert torch.equal(skipped, reloaded)


def _measure(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    meter = GatedComputeMeter()
    meter.attach(model.eval())
    with torch.no_grad():
        model(x)
    meter.detach()
    return meter.summarize(meter.sums())


def test_dynamic_macs_all_open_equal_static():
    model = build_model("cifar_resnet8", 10, method="gated")
    _set_gates(model, bias=10.0)
    result = _measure(model, torch.randn(4, 3, 32, 32))
    assert result["dynamic_macs"] == result["macs"] == count_macs(model, 32)
    assert result["gates_always_on"] == 1.0 and result["gates_conditional"] == 0.0


def test_dynamic_macs_with_known_closed_channels():
    model = build_model("cifar_resnet8", 10, method="gated")
    _set_gates(model, bias=10.0)
    block = model.layer1[0]
    block.gates["0"].fc2.bias.data[:8] = -10.0  # 8 of conv1's 16 output channels closed
    result = _measure(model, torch.randn(4, 3, 32, 32))
    # conv1 loses 8 outputs, conv2 8 inputs: 2 · (32·32 positions · 8 · 16 · 3·3) MACs.
    assert result["macs"] - result["dynamic_macs"] == 2 * 32 * 32 * 8 * 16 * 9
    gates = 16 + 32 + 64
    assert result["gates_always_off"] == pytest.approx(8 / gates)
    assert result["open/layer1.0.conv1"] == 0.5 and result["open/layer2.0.conv1"] == 1.0


def test_conditional_gates_are_counted():
    model = build_model("cifar_resnet8", 10, method="gated")
    _set_gates(model, bias=10.0)
    gate = model.layer3[0].gates["0"]
    nn.init.zeros_(gate.fc2.weight)
    gate.fc2.weight.data[0, 0] = 100.0  # channel 0 follows hidden unit 0: image-dependent
    gate.fc2.bias.data[0] = 0.0
    x = torch.randn(64, 3, 32, 32)
    hidden = []
    handle = gate.fc1.register_forward_hook(lambda m, args, out: hidden.append(out[:, 0]))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    gate.bn.running_mean[0] = hidden[0].median()  # unit 0 is positive for about half the images
    result = _measure(model, x)
    assert result["gates_conditional"] == pytest.approx(1 / (16 + 32 + 64))


def test_method_schedules_and_param_groups():
    method = get_method("gated", gamma=0.75, gamma_end_epoch=10, lambda_max=0.5,
                        lambda_start_epoch=10, lambda_end_epoch=30)
    assert [method.gamma_at(e) for e in (0, 5, 10, 20)] == [0.75, 0.375, 0.0, 0.0]
    assert [method.lambda_at(e) for e in (0, 10, 20, 30, 40)] == [0.0, 0.0, 0.25, 0.5, 0.5]
    model = build_model("cifar_resnet8", 10, method="gated")
    (group,) = method.param_groups(model)
    gate_params = {id(p) for m in model.modules() if isinstance(m, ChannelGate)
                   for p in m.parameters()}
    assert group["weight_decay"] == 0.0 and {id(p) for p in group["params"]} == gate_params


def test_extra_losses_follow_the_schedule():
    method = get_method("gated", gamma_end_epoch=2, lambda_max=1.0, lambda_start_epoch=2,
                        lambda_end_epoch=4)
    model = build_model("cifar_resnet8", 10, method="gated").train()
    model(torch.randn(8, 3, 16, 16))
    early, late = method.extra_losses(model, 0.0), method.extra_losses(model, 5.0)
    assert early["batch_shaping"] > 0 and early["l0"] == 0
    assert late["batch_shaping"] == 0 and 0 < late["l0"] < 1
    late["l0"].backward()
    assert model.layer1[0].gates["0"].fc2.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("opts,name", [({"gamma": -1}, "gamma"),
                                       ({"lambda_start_epoch": 5, "lambda_end_epoch": 5},
                                        "lambda_end_epoch"),
                                       ({"prior_a": 0}, "prior_a"),
                                       ({"tau": 1}, "tau")])
def test_bad_method_options(opts, name):
    with pytest.raises(ValueError, match=name):
        get_method("gated", **opts)


def test_bad_model_options():
    with pytest.raises(ValueError, match="gate_3x3"):
        build_model("resnet18", 10, method="gated", gate_3x3=True)
    with pytest.raises(ValueError, match="gate_hidden"):
        build_model("cifar_resnet20", 10, method="gated", gate_hidden=0)
    with pytest.raises(ValueError, match="gated"):
        build_model("densenet121", 10, method="gated")


def test_bottleneck_gates_3x3_only_when_asked():
    plain = build_model("resnet50", 10, method="gated")
    both = build_model("resnet50", 10, method="gated", gate_3x3=True)
    assert list(plain.layer1[0].gates) == ["0"] and list(both.layer1[0].gates) == ["0", "1"]
