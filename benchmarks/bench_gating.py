"""Channel gating benchmarks: training-step cost of the gates and losses, batch-1 latency of
skipping inference against the dense model at the measured dynamic-MAC ratio, and the
batch-shaping loss alone (the fused CPU kernel and the torch ops of the GPU path) against a
SciPy-on-host evaluation (the authors' way)."""
from __future__ import annotations

import numpy as np
import torch
from scipy.special import betainc
from scipy.stats import beta as beta_dist
from torch import nn

from benchmarks.common import emit, inference, median_seconds, train_step
from pipeline.methods import get_method
from pipeline.methods.extensions import cpu_extension
from pipeline.methods.batch_shaping import BetaCDF, batch_shaping_loss
from pipeline.methods.gating import ChannelGate, GatedComputeMeter, to_skipping
from pipeline.models.diagnostics import calibrate_batch_norm
from pipeline.models.registry import build_model
from pipeline.models.summary import count_macs


def bench_train_step(quick: bool) -> dict:
    batch, size = (32, 32) if quick else (128, 32)
    method = get_method("gated", gamma_end_epoch=2, lambda_start_epoch=0, lambda_end_epoch=1)
    torch.manual_seed(0)
    baseline = build_model("cifar_resnet20", 10)
    gated = build_model("cifar_resnet20", 10, method="gated")

    def losses(model: nn.Module) -> torch.Tensor:  # γ and λ both active (epoch 1)
        return sum(method.extra_losses(model, 1.0).values())

    times = median_seconds({"baseline": train_step(baseline, batch, size),
                            "gated": train_step(gated, batch, size, losses)},
                           repeats=5 if quick else 15)
    return {"bench": "gating/train_step", "model": "cifar_resnet20", "batch": batch,
            "image_size": size, "baseline_s": times["baseline"], "gated_s": times["gated"],
            "gated_over_baseline": times["gated"] / times["baseline"]}


def _open_half_per_image(model: nn.Module) -> None:
    """Image-dependent gates, about half open: logits from a random projection, no bias."""
    torch.manual_seed(0)
    for gate in model.modules():
        if isinstance(gate, ChannelGate):
            nn.init.normal_(gate.fc2.weight, 0.0, 1.0)
            nn.init.zeros_(gate.fc2.bias)


def bench_latency(arch: str, size: int, quick: bool) -> dict:
    torch.manual_seed(0)
    dense = calibrate_batch_norm(build_model(arch, 10), torch.randn(16, 3, size, size))
    gated = build_model(arch, 10, method="gated").eval()
    gated.load_state_dict(dense.state_dict(), strict=False)  # same convs, gates added
    _open_half_per_image(gated)
    images = torch.randn(16 if quick else 64, 3, size, size)
    meter = GatedComputeMeter()
    meter.attach(gated)
    with torch.no_grad():
        gated(images)
    meter.detach()
    compute = meter.summarize(meter.sums())
    dense_macs = count_macs(dense, size)
    skipping = to_skipping(gated)
    times = median_seconds({"dense": inference(dense, 1, size),
                            "masked": inference(gated, 1, size),
                            "skipping": inference(skipping, 1, size)},
                           repeats=5 if quick else 20)
    mac_ratio = compute["dynamic_macs"] / dense_macs
    latency_ratio = times["skipping"] / times["dense"]
    return {"bench": "gating/latency_batch1", "model": arch, "image_size": size,
            "threads": torch.get_num_threads(), "dense_macs": dense_macs,
            "dynamic_macs": compute["dynamic_macs"], "mac_ratio": mac_ratio,
            "dense_s": times["dense"], "masked_s": times["masked"],
            "skipping_s": times["skipping"], "latency_ratio": latency_ratio,
            # target ≥ 0.7: the share of the MAC saving that shows up as time saved
            "saving_realised": (1 - latency_ratio) / (1 - mac_ratio)}


def _scipy_on_host_loss(p: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """The reference: CDF and clipped density by SciPy on the host, gradient through them."""
    n, g = p.shape
    p_sorted, order = torch.sort(p, dim=0)
    host = p_sorted.detach().cpu().double().numpy()
    cdf = torch.tensor(beta_dist.cdf(host, a, b), dtype=p.dtype, device=p.device)
    pdf = torch.tensor(np.clip(beta_dist.pdf(host, a, b), 1e-3, 100), dtype=p.dtype,
                       device=p.device)
    ecdf = torch.arange(1, n + 1, dtype=p.dtype, device=p.device)[:, None] / (n + 1)
    # F(p) as a value with d/dp = clipped pdf: cdf + pdf·(p − p.detach())
    fitted = cdf + pdf * (p_sorted - p_sorted.detach())
    return ((ecdf - fitted) ** 2).sum() / (n * g)


def bench_loss(quick: bool) -> dict:
    prior = BetaCDF(0.6, 0.4)
    torch.manual_seed(0)
    p = torch.sigmoid(2 * torch.randn(256, 512)).requires_grad_()

    def ours() -> None:
        batch_shaping_loss(p, prior).backward()

    def torch_ops() -> None:   # the path that runs on GPU, here on CPU
        batch_shaping_loss(p, prior, fused=False).backward()

    def reference() -> None:
        _scipy_on_host_loss(p, 0.6, 0.4).backward()

    times = median_seconds({"ours": ours, "torch_ops": torch_ops, "scipy_host": reference},
                           repeats=10 if quick else 30)
    value, expected = batch_shaping_loss(p, prior).item(), _scipy_on_host_loss(p, 0.6, 0.4).item()
    cdf_error = (prior.cdf(p.detach()).double()
                 - torch.from_numpy(betainc(0.6, 0.4, p.detach().double().numpy()))).abs().max()
    return {"bench": "gating/batch_shaping_loss", "shape": [256, 512],
            "threads": torch.get_num_threads(), "ours_fwd_bwd_s": times["ours"],
            "kernel": "fused" if cpu_extension("batch_shaping") else "torch_ops",
            "torch_ops_fwd_bwd_s": times["torch_ops"],
            "scipy_host_fwd_bwd_s": times["scipy_host"],
            "speedup": times["scipy_host"] / times["ours"],
            "cdf_max_abs_error_vs_scipy": float(cdf_error),
            "loss_abs_error_vs_scipy": abs(value - expected)}


def run(quick: bool) -> list[dict]:
    records = [bench_loss(quick), bench_train_step(quick),
               bench_latency("cifar_resnet20", 32, quick),
               bench_latency("resnet18", 112 if quick else 224, quick)]
    return records


if __name__ == "__main__":
    import sys

    for record in run(quick="--quick" in sys.argv):
        emit(record)
