"""The GPU path on a GPU: skipped without CUDA (tests/conftest.py), run first on a GPU machine.

* every method's step and evaluation (tests/test_device.py's, on real CUDA tensors) under
  ``torch.cuda.set_sync_debug_mode("error")``: any operation that waits for the GPU (a read-back,
  a blocking host copy) raises, in the forward, the backward and the optimizer step;
* every method through ``pipeline train``: DALI ``mixed`` decoding, bf16 autocast, ZeRO 1, two
  steps, a checkpoint on request, a resume, evaluation, the final record;
* SyncBatchNorm over NCCL with 2 ranks (torchrun): the statistics of the global batch, and a
  ``pipeline train`` run with ``engine.sync_bn=true``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import config_path
from test_device import BATCH, DIGITS, METHODS, StandInEngine, case_of, \
    evaluation_until_reduce, train_steps

pytestmark = pytest.mark.cuda


def gpu() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


class SyncDebug:
    """``torch.cuda.set_sync_debug_mode("error")`` until ``release()`` (the evaluation's host
    boundary) or the end of the ``with`` block."""

    def __enter__(self) -> SyncDebug:
        torch.cuda.set_sync_debug_mode("error")
        return self

    def release(self) -> None:
        torch.cuda.set_sync_debug_mode(0)

    def __exit__(self, *exc) -> None:
        self.release()


@pytest.mark.parametrize("name", [*DIGITS, "segmentation"])
def test_step_and_evaluation_never_wait_for_the_gpu(name, monkeypatch):
    device = gpu()
    case = case_of(name)  # selective convolution with copied channels
    fmt = torch.channels_last
    case.model.to(device, memory_format=fmt)
    optimizer = torch.optim.SGD(case.model.parameters(), lr=0.01, momentum=0.9)
    engine = StandInEngine(case.model, device, torch.bfloat16, optimizer)
    train_steps(engine, case, device, fmt)  # warm-up: cuDNN plans, one-time device tables
    with SyncDebug():
        sums = train_steps(engine, case, device, fmt)
    with SyncDebug() as guard:
        result = evaluation_until_reduce(guard, case, device, fmt, torch.bfloat16, monkeypatch)
    assert sums["count"].item() == 2 * BATCH
    assert set(case.task.final_keys) <= set(result)


def test_dali_decodes_onto_the_gpu(digits_root):
    from pipeline.config import load_config
    from pipeline.data import build_loaders

    cfg = load_config(config_path("digits/baseline.yaml"), [f"data.root={digits_root}"])
    device = gpu()
    train, val = build_loaders(cfg.data, rank=0, world_size=1, seed=0, device=device)
    images, labels = next(iter(train.epoch(0, 0)))
    assert images.device == labels.device == device
    assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_checkpoints_and_resumes_on_the_gpu(method, pipeline_cli, digits_root,
                                                          tmp_path):
    stop_file = tmp_path / "stop-requested"
    args = ["train", config_path(f"digits/{method}.yaml"), f"data.root={digits_root}",
            "data.backend=dali", "engine.precision=bf16", "engine.zero_stage=1",
            "schedule.epochs=2", "engine.max_steps_per_epoch=2", "engine.sync_every=2",
            "data.batch_size=32", "checkpoint.every_minutes=0"]
    stop_file.write_text("stop_file\n")  # honoured at the first sync point: step 2
    first = pipeline_cli.run(*args, PIPELINE_STOP_FILE=str(stop_file))
    assert first.returncode == 75, first.stderr[-3000:]
    assert not stop_file.exists()
    second = pipeline_cli.run(*args, PIPELINE_STOP_FILE=str(stop_file))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    final = pipeline_cli.final(second.stdout)
    assert final["epochs"] == 2 and 0.0 <= final["val_top1"] <= 1.0


_SYNC_BN_SCRIPT = textwrap.dedent("""
    import json, os, torch, torch.distributed as dist
    from torch import nn

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    bn = nn.SyncBatchNorm(3, momentum=1.0).cuda()  # momentum 1: running = this batch
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(rank)).cuda() * (rank + 1)
    bn(x)
    everything = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(everything, x)
    whole = torch.cat(everything)
    expected_mean = whole.mean((0, 2, 3))
    expected_var = whole.var((0, 2, 3), unbiased=True)
    ok = (torch.allclose(bn.running_mean, expected_mean, rtol=1e-5, atol=1e-6)
          and torch.allclose(bn.running_var, expected_var, rtol=1e-5, atol=1e-6))
    print(json.dumps({"rank": rank, "ok": bool(ok)}), flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_sync_batch_norm_reduces_over_two_ranks_on_nccl(tmp_path, pipeline_cli, digits_root):
    script = tmp_path / "sync_bn.py"
    script.write_text(_SYNC_BN_SCRIPT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(script)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["ok"] for r in ranks)

    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2")
    proc = pipeline_cli.popen("train", config_path("digits/baseline.yaml"),
                              f"data.root={digits_root}", "engine.sync_bn=true",
                              "engine.precision=bf16", "schedule.epochs=1",
                              "engine.max_steps_per_epoch=4", "data.batch_size=32",
                              "checkpoint.every_minutes=0", launcher=launcher)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert pipeline_cli.final(stdout)["epochs"] == 1
