"""benchmarks/gpu_check.sh: its dry run end to end on the CPU (what CI runs), and its parts —
the synthetic tree, the timed window, the batch fallback — with a fake clock and fake runs."""
from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pytest

from benchmarks import gpu_check
from conftest import REPO


@pytest.mark.e2e
def test_dry_run_times_every_model_through_the_real_loop(tmp_path):
    out_dir = tmp_path / "gpu-check"
    # --no-install: the suite runs inside the venv that `make test` has just brought up to date
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--no-install",
                           "--out", str(out_dir)], cwd=REPO, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    data = [r for r in records if r["event"] == "gpu_check_data"]
    runs = [r for r in records if r["event"] == "gpu_check"]
    assert len(data) == 1 and data[0]["classes"] == 10
    assert [r["run"] for r in runs] == list(gpu_check.RUNS)
    for r in runs:
        assert r["status"] == "ok", r
        assert (r["batch_per_gpu"], r["gpus"], r["warmup"], r["steps"]) == (4, 1, 1, 2)
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["stall_ms"] >= 0
        assert 0 <= r["stall_fraction"] <= 1 and r["precision"] == "bf16"
    assert {r["method"] for r in runs} == {"baseline", "ce", "csg", "gated", "selectconv"}
    table = done.stdout[done.stdout.index("| run |"):]
    assert all(f"| {name} | 4 | 1 |" in table for name in gpu_check.RUNS)
    assert list((out_dir / "runs").iterdir()) == []  # checkpoints and exports removed
    assert len(list((out_dir / "logs").iterdir())) == len(gpu_check.RUNS)


@pytest.mark.unit
def test_tree_is_imagenet_shaped_links_and_written_once(tmp_path):
    root = tmp_path / "tree"
    spec = gpu_check.write_tree(root, classes=3, train_images=10, val_per_class=2,
                                shapes=((40, 30),), distinct=4)
    train = sorted(p for p in (root / "train").rglob("*.JPEG"))
    assert [d.name for d in sorted((root / "train").iterdir())] == \
        ["n00000000", "n00000001", "n00000002"]
    assert len(train) == 10 and len(list((root / "val").rglob("*.JPEG"))) == 6
    assert len({p.stat().st_ino for p in train}) == 4  # hard links to the distinct images
    assert train[0].read_bytes()[:2] == b"\xff\xd8"  # JPEG
    before = train[0].stat().st_mtime_ns
    assert gpu_check.write_tree(root, 3, 10, 2, ((40, 30),), 4) == spec
    assert train[0].stat().st_mtime_ns == before  # the same tree is not written again
    gpu_check.write_tree(root, 2, 4, 1, ((40, 30),), 4)  # another size replaces it
    assert len(list((root / "train").rglob("*.JPEG"))) == 4

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not gpu_check's")
    with pytest.raises(SystemExit, match="not written by gpu_check"):
        gpu_check.write_tree(foreign, 3, 10, 2, ((40, 30),), 4)
    assert (foreign / "mine.txt").is_file()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.unit
def test_probe_times_only_the_window_and_the_waits_for_batches(monkeypatch):
    """A fetch takes 3 clock units, a step 10: the window (steps 2 < s ≤ 5) holds 3 steps of
    13 units, 3 of them waiting for a batch each."""
    clock = Clock()
    monkeypatch.setattr(gpu_check.time, "perf_counter", clock)

    def batches(epoch, start=0):
        for i in range(4):
            clock.now += 3
            yield i

    cfg = SimpleNamespace(data=SimpleNamespace(batch_size=8),
                          engine=SimpleNamespace(grad_accum=1))
    run = SimpleNamespace(cfg=cfg,
                          train_data=SimpleNamespace(epoch=batches),
                          method=SimpleNamespace(on_step_end=lambda model, step: None))
    probe = gpu_check.Probe(run, warmup=2, steps=3)
    probe.cuda = False
    step = 0
    for epoch in range(2):  # the loop's shape: epochs of batches, a hook after every step
        for _ in run.train_data.epoch(epoch):
            clock.now += 10
            step += 1
            run.method.on_step_end(None, step)
    assert probe.result == {"gpus": 1, "images_per_s": round(8 * 3 / 39, 1),
                            "step_ms": 13000.0, "stall_ms": 3000.0,
                            "stall_fraction": round(9 / 39, 4), "peak_gb": 0.0}


@pytest.mark.unit
def test_a_run_out_of_memory_is_tried_again_with_smaller_batches(monkeypatch, tmp_path):
    tried = []

    def launch(args, root, name, batch):
        tried.append(batch)
        if batch > 96:
            return {"run": name, "status": "oom", "batch_per_gpu": batch}, gpu_check.OOM_EXIT
        return {"run": name, "status": "ok", "batch_per_gpu": batch}, 0

    monkeypatch.setattr(gpu_check, "launch", launch)
    args = gpu_check.parse(["--out", str(tmp_path)])
    assert gpu_check.measure(args, tmp_path, "resnet50")["batch_per_gpu"] == 96
    assert tried == [256, 192, 128, 96]
