"""Channel Equilibrium: the block against a direct transcription of the reference forward, its
whitening behaviour, gradients, running statistics, eval independence, placement and parameter
counts, export, the inhibited-channel meter, and buffer sync across two ranks."""
from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from conftest import config_path
from pipeline.methods import get_method
from pipeline.methods.ce import ChannelEquilibrium, ExportedCE, NormCE, newton_schulz_whitening
from pipeline.models import build_model
from pipeline.models.diagnostics import InhibitedChannels
from pipeline.models.summary import count_params


def reference_ce(ce: ChannelEquilibrium, x: torch.Tensor):
    """The reference training forward (CENet's CE_module.py), transcribed op by op."""
    n, c, h, w = x.shape
    z = x.transpose(0, 1).reshape(ce.groups, ce.d, -1)
    m = z.shape[-1]
    zc = z - z.mean(-1, keepdim=True)
    eye = torch.eye(ce.d, dtype=x.dtype)
    sigma = zc @ zc.transpose(1, 2) / m + ce.eps * eye
    sigma_n = sigma / (sigma * eye).sum((1, 2), keepdim=True)
    p = eye.expand(ce.groups, ce.d, ce.d)
    for _ in range(ce.iterations):
        p = 1.5 * p - 0.5 * (p @ p @ p) @ sigma_n
    bd = (p @ z).view(c, n, h, w).transpose(0, 1)
    var = x.view(n, c, -1).var(-1)
    scale = var.mean().sqrt()
    ir = x * (ce.gate(var) / scale).view(n, c, 1, 1)
    lam = torch.sigmoid(ce.theta)
    return lam * bd + (1 - lam) * ir, p, scale


def correlated(n: int, c: int, hw: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Channels sharing one strong common factor (mean |correlation| ≈ 0.8), offset by 2."""
    g = torch.Generator().manual_seed(seed)
    own = torch.randn(n, c, hw, hw, generator=g, dtype=dtype)
    common = torch.randn(n, 1, hw, hw, generator=g, dtype=dtype)
    return own + 2 * common + 2


def covariance(y: torch.Tensor) -> torch.Tensor:
    flat = y.transpose(0, 1).flatten(1)
    flat = flat - flat.mean(1, keepdim=True)
    return flat @ flat.T / flat.shape[1]


@pytest.mark.unit
def test_matches_reference_forward_backward_and_running_statistics():
    torch.manual_seed(0)
    ce = ChannelEquilibrium(32, group_size=16).double()
    ce.theta.data.fill_(0.3)
    ref = copy.deepcopy(ce)
    x = correlated(4, 32, 6).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = ce(x)
    y_ref, whiten, kappa = reference_ce(ref, x_ref)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    (y * grad).sum().backward()
    (y_ref * grad).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for p, q in zip(ce.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    # running ← 0.9 running + 0.1 batch value, from I and 0
    eye = torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(ce.running_whiten, 0.9 * eye + 0.1 * whiten.detach())
    torch.testing.assert_close(ce.running_kappa, 0.1 * kappa.detach().view(1))
    ce(x)
    torch.testing.assert_close(ce.running_kappa, 0.19 * kappa.detach().view(1), rtol=1e-3,
                               atol=0)


@pytest.mark.unit
def test_more_iterations_with_trace_rescaling_whiten():
    x = correlated(8, 16, 8)
    assert covariance(x)[0, 1] > 3  # far from the identity before
    # T = 10, not more: the reference's uncoupled iteration amplifies rounding errors
    # (≈ 30× per step here) and diverges beyond about 12 steps
    ce = ChannelEquilibrium(16, group_size=16, iterations=10, trace_rescale=True).double()
    ce.theta.data.fill_(40.0)  # λ = 1: BD alone
    torch.testing.assert_close(covariance(ce(x).detach()), torch.eye(16, dtype=torch.float64),
                               atol=1e-3, rtol=0)


@pytest.mark.unit
def test_reference_t3_partially_whitens_and_amplifies():
    x = correlated(8, 16, 8)
    sigma = covariance(x) + 1e-5 * torch.eye(16, dtype=torch.float64)
    whiten = newton_schulz_whitening(sigma[None], 3, trace_rescale=False)[0]
    # P_3 is a polynomial in Σ/tr(Σ), whose eigenvalues lie in (0, 1]: every eigenvalue ≥ 1
    assert torch.linalg.eigvalsh(whiten).min() >= 1 - 1e-9
    assert torch.linalg.eigvalsh(whiten).max() > 2
    out = whiten @ sigma @ whiten.T
    corr = out / out.diagonal().sqrt().outer(out.diagonal().sqrt())
    corr_in = sigma / sigma.diagonal().sqrt().outer(sigma.diagonal().sqrt())
    off = ~torch.eye(16, dtype=torch.bool)
    assert corr[off].abs().mean() < 0.5 * corr_in[off].abs().mean()  # decorrelated …
    assert not torch.allclose(out, torch.eye(16, dtype=torch.float64), atol=0.1)  # … partly


@pytest.mark.unit
@pytest.mark.parametrize("through_bn", [False, True])
def test_gradcheck_float64(through_bn):
    torch.manual_seed(0)
    # two groups of 4 channels: every coupling (within a group, across the batch, through the
    # BN) is exercised with a sixth of the inputs that numerical differences perturb one by one
    block = NormCE(nn.BatchNorm2d(8), group_size=4) if through_bn else \
        ChannelEquilibrium(8, group_size=4)
    block.double()
    x = correlated(2, 8, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, *params: block(x), (x, *block.parameters()))


@pytest.mark.unit
def test_eval_before_training_is_finite_and_sample_independent():
    model = build_model("cifar_resnet8", 10, method="ce").eval()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        out = model(x)
        alone = model(x[:1])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(alone, out[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_statistics_in_fp32_under_autocast():
    model = build_model("cifar_resnet8", 10, method="ce").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 3, 16, 16))
    out.float().sum().backward()
    ce = next(m for m in model.modules() if isinstance(m, ChannelEquilibrium))
    assert ce.running_whiten.dtype == torch.float32 and torch.isfinite(ce.running_whiten).all()
    assert ce.theta.grad is not None and torch.isfinite(ce.theta.grad).all()


@pytest.mark.unit
def test_resnet50_parameter_count_and_placement():
    model = build_model("resnet50", 1000, method="ce")
    assert count_params(model)[0] == 29_331_926
    ces = {name: m for name, m in model.named_modules() if isinstance(m, ChannelEquilibrium)}
    assert len(ces) == 1 + 3 + 4 + 6 and not any(n.startswith("layer4") for n in ces)
    assert ces["bn1.ce"].groups == 1 and ces["bn1.ce"].d == 64
    assert ces["layer3.5.bn3.ce"].d == 16 and ces["layer3.5.bn3.ce"].groups == 64


@pytest.mark.unit
@pytest.mark.parametrize("arch,count", [("mobilenet_v2", 17), ("shufflenet_v2_x1_0", 16),
                                        ("resnet18", 7), ("cifar_resnet20", 10)])
def test_placement_counts(arch, count):
    model = build_model(arch, 10, method="ce")
    assert sum(isinstance(m, ChannelEquilibrium) for m in model.modules()) == count


@pytest.mark.unit
def test_structural_options_and_bad_input():
    model = build_model("cifar_resnet8", 10, method="ce", group_size=8, iterations=5,
                        trace_rescale=True)
    ce = model.layer3[0].bn2.ce
    assert (ce.d, ce.groups, ce.iterations, ce.trace_rescale) == (8, 8, 5, True)
    with pytest.raises(ValueError, match="group_sizes"):
        build_model("cifar_resnet8", 10, method="ce", group_sizes=8)
    with pytest.raises(ValueError, match="group size"):
        build_model("cifar_resnet8", 10, method="ce", group_size=0)
    with pytest.raises(ValueError, match="does not support"):
        build_model("densenet121", 10, method="ce")


def _train_a_little(model: nn.Module, size: int, steps: int = 3) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(step))
        loss = nn.functional.cross_entropy(model(x), torch.arange(8) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.unit
@pytest.mark.parametrize("arch,size", [("cifar_resnet8", 16), ("resnet18", 48),
                                       ("mobilenet_v2", 48), ("shufflenet_v2_x1_0", 48)])
def test_export_matches_eval_outputs(arch, size):
    torch.manual_seed(0)
    model = _train_a_little(build_model(arch, 10, method="ce"), size)
    exported = get_method("ce").export(model)
    assert not any(isinstance(m, ChannelEquilibrium) for m in exported.modules())
    assert any(isinstance(m, ExportedCE) for m in exported.modules())
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_export_folds_resnet_bns_into_their_convs():
    exported = get_method("ce").export(_train_a_little(build_model("cifar_resnet8", 10,
                                                                   method="ce"), 16))
    block = exported.layer1[0]
    assert isinstance(block.bn2.norm, nn.Identity) and block.conv2.bias is not None
    assert block.bn2.bd.groups == 1 and block.bn2.bd.weight.shape == (16, 16, 1, 1)


@pytest.mark.unit
def test_method_metrics_report_lambda():
    metrics = get_method("ce").metrics(build_model("cifar_resnet8", 10, method="ce"))
    assert metrics == {"lambda_mean": 0.5, "lambda_min": 0.5, "lambda_max": 0.5}


class _TwoCalls(nn.Module):
    """One ReLU module used twice (as torchvision blocks do) and a 2-D ReLU that must not count."""

    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, 4, 1))
        self.relu = nn.ReLU()
        self.fc_relu = nn.ReLU()

    def forward(self, x):
        a = self.relu(self.layer1(x))
        b = self.relu(-a - 1)   # all zero after ReLU: 4 inhibited channels
        self.fc_relu(a.mean((2, 3)))
        return a + b


@pytest.mark.unit
def test_inhibited_channels_counts_each_call_and_stage():
    model = _TwoCalls()
    with torch.no_grad():
        model.layer1[0].weight.fill_(1.0)
        model.layer1[0].bias.copy_(torch.tensor([0.0, 1.0, -5.0, 2.0]))
    meter = InhibitedChannels(threshold=1e-2)
    meter.attach(model)
    for _ in range(2):  # inputs in [0, 1): channel 2 (bias −5) is dead too
        model(torch.rand(3, 1, 4, 4))
    sums = meter.sums()
    meter.detach()
    assert sums["channel_sums"].numel() == 8 and sums["counts"].tolist() == [96, 96]
    summary = meter.summarize(sums)
    assert summary["inhibited/all"] == pytest.approx(5 / 8)
    assert summary["inhibited/res4x4"] == pytest.approx(5 / 8)


@pytest.mark.unit
def test_inhibited_channels_stages_of_resnet50_are_not_double_counted():
    model = build_model("resnet50", 10).eval()
    meter = InhibitedChannels()
    meter.attach(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    sums = meter.sums()
    # stem 64 + per bottleneck (p, p, 4p) post-ReLU channels
    blocks = {64: 3, 128: 4, 256: 6, 512: 3}
    assert sums["channel_sums"].numel() == 64 + sum(6 * p * k for p, k in blocks.items())
    assert set(meter.summarize(sums)) == {"inhibited/all", "inhibited/res16x16",  # the stem
                                          *(f"inhibited/layer{i}" for i in range(1, 5))}


@pytest.mark.e2e
def test_two_rank_run_keeps_ce_buffers_identical(pipeline_cli, digits_root, tmp_path):
    """torchrun, 2 ranks, `pipeline train configs/digits/ce.yaml`: after each step the ranks'
    CE buffers differ (different batches); after the engine's sync they are identical."""
    script = tmp_path / "train_and_dump.py"
    script.write_text(_DUMP_SCRIPT)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", str(script))
    proc = pipeline_cli.popen("train", config_path("digits/ce.yaml"),
                              f"data.root={digits_root}", "model.name=cifar_resnet8",
                              "schedule.epochs=1", "engine.max_steps_per_epoch=3",
                              "data.batch_size=16", "checkpoint.every_minutes=0",
                              launcher=launcher, CE_DUMP=str(tmp_path))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["synced"].keys() == ranks[1]["synced"].keys()
    assert any("running_whiten" in k for k in ranks[0]["synced"])
    for key, value in ranks[0]["synced"].items():
        torch.testing.assert_close(value, ranks[1]["synced"][key], rtol=0, atol=0)
    assert any(not torch.equal(ranks[0]["step"][k], ranks[1]["step"][k])
               for k in ranks[0]["step"])
    assert all(float(v) > 0 for k, v in ranks[0]["synced"].items() if "kappa" in k)


# Runs `pipeline train` under torchrun, recording every rank's CE buffers after its last
# optimizer step (before the engine's sync) and at the evaluation's method metrics (after it:
# every rank evaluates).
_DUMP_SCRIPT = """
import os, sys, torch
from pipeline.cli.main import main
from pipeline.methods.ce import ChannelEquilibriumMethod

def buffers(model):
    return {k: v.detach().clone() for k, v in model.named_buffers()
            if "running_whiten" in k or "running_kappa" in k}

seen = {}
def on_step_end(self, model, step):
    seen["step"] = buffers(model)
def metrics(self, model):
    rank = os.environ["RANK"]
    torch.save({"step": seen["step"], "synced": buffers(model)},
               os.path.join(os.environ["CE_DUMP"], f"rank{rank}.pt"))
    return original(self, model)

original = ChannelEquilibriumMethod.metrics
ChannelEquilibriumMethod.on_step_end = on_step_end
ChannelEquilibriumMethod.metrics = metrics
sys.exit(main(sys.argv[3:]))  # argv: <script> -m pipeline train …
"""
