"""The GPU check: what a GPU owner runs first (``benchmarks/gpu_check.sh``, ``make gpu-check``).

Writes a synthetic ImageNet-layout JPEG tree (1,000 classes, full-size images, enough for about
200 steps of one GPU at batch 256), then runs, each as a short timed job through the real loop
(``pipeline train`` in its own process, under torchrun with several GPUs; the ImageNet recipe
with DALI, bf16 autocast and channels_last), the ResNet-50 baseline, each method's ResNet-50 /
DenseNet-121 variant and the DenseNet-121 baseline. Every run prints one JSON line; a table
follows (``vs base``: images/s relative to the architecture's baseline).

    benchmarks/gpu_check.sh [--gpus N] [--batch 256] [--runs resnet50,resnet50_ce] [--out DIR]
                            [--warmup 20] [--steps 100] [--compile]
    benchmarks/gpu_check.sh --cpu     # dry run: tiny sizes on the CPU, the same code path (CI)

Per run (rank 0 prints it; the ranks are combined at the end of the timed window):

    batch_per_gpu   256, or the largest that fits: a run that runs out of GPU memory is
                    started again with the next smaller batch (256, 192, 128, 96, 64, …)
    images_per_s    images of all ranks in the window / the window's wall time (the GPU is
                    synchronised at both ends of the window and nowhere else)
    step_ms         wall time per optimizer step in the window
    stall_ms        per step, the time the loop waited for its next batch (inside the loader's
                    iterator), the slowest rank; stall_fraction = stall / step time
    peak_gb         torch.cuda.max_memory_allocated over the window, the largest rank

How: ``pipeline.cli.main`` runs ``pipeline train`` unchanged except that the run object is
wrapped (``Probe``): its loader's epoch iterator times each batch fetch, its method's
``on_step_end`` (called after every optimizer step) keeps the step clock. The first
``--warmup`` steps (cuDNN autotuning, DALI start-up) are not timed; the run ends after
``--warmup`` + ``--steps`` steps with its final evaluation, checkpoint and export (not timed).

The images are page-cache resident hard links to 512 distinct JPEGs (~50 MB of disk for 51,200
files): the check measures decoding and training, not the dataset's disk. Selective convolution
copies channels only after an epoch's re-allocation: on one GPU a run ends inside its first epoch
and its figure is the step before any copy (with N GPUs an epoch is 200/N steps).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import emit

REPO = Path(__file__).resolve().parents[1]
# name → (config, the baseline its images/s is compared with)
RUNS = {
    "resnet50": ("imagenet/resnet50.yaml", "resnet50"),
    "resnet50_ce": ("imagenet/resnet50_ce.yaml", "resnet50"),
    "resnet50_csg": ("imagenet/resnet50_csg.yaml", "resnet50"),
    "resnet50_gated": ("imagenet/resnet50_gated.yaml", "resnet50"),
    "densenet121": ("imagenet/densenet121.yaml", "densenet121"),
    "densenet121_selectconv": ("imagenet/densenet121_selectconv.yaml", "densenet121"),
}
BATCHES = (256, 192, 128, 96, 64, 48, 32, 16, 8, 4)
OOM_EXIT = 3
# (width, height) of the distinct images: ImageNet's common shapes
SHAPES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (640, 480))


# ----------------------------------------------------------------------------- the data
def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A photo-like JPEG: a smooth random field (bicubic from a coarse grid) with fine noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    coarse = (rng.random((height // 24 + 2, width // 24 + 2, 3)) * 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    noisy = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(noisy).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_tree(root: Path, classes: int, train_images: int, val_per_class: int,
               shapes: tuple[tuple[int, int], ...], distinct: int) -> dict:
    """ROOT/{train,val}/nXXXXXXXX/*.JPEG: ``distinct`` JPEGs under ``root/.sources``, every
    tree entry a hard link to one of them (a copy where links are refused). Written once: a
    tree whose manifest matches is reused."""
    spec = {"classes": classes, "train_images": train_images, "val_per_class": val_per_class,
            "shapes": [list(s) for s in shapes], "distinct": distinct}
    manifest, sources = root / "gpu_check_tree.json", root / ".sources"
    if manifest.is_file() and json.loads(manifest.read_text()) == spec:
        return spec
    if root.exists() and any(root.iterdir()):
        if not sources.is_dir():
            raise SystemExit(f"gpu_check: {root} exists and was not written by gpu_check; "
                             "choose another --out")
        for written in ("train", "val", ".sources"):  # an earlier tree of another size
            shutil.rmtree(root / written, ignore_errors=True)
        manifest.unlink(missing_ok=True)
    sources.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(min(os.cpu_count() or 1, 16)) as pool:
        blobs = list(pool.map(_jpeg, range(distinct),
                              [shapes[i % len(shapes)] for i in range(distinct)], chunksize=8))
    for i, blob in enumerate(blobs):
        (sources / f"{i:05d}.JPEG").write_bytes(blob)
    counts = {"train": [train_images // classes + (c < train_images % classes)
                        for c in range(classes)],
              "val": [val_per_class] * classes}
    k = 0
    for split, per_class in counts.items():
        for c, n in enumerate(per_class):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _link(sources / f"{k % distinct:05d}.JPEG", folder / f"n{c:08d}_{i}.JPEG")
                k += 1
    manifest.write_text(json.dumps(spec))
    return spec


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        target.write_bytes(source.read_bytes())


# ----------------------------------------------------------------------------- one run
class Probe:
    """Times the steps ``warmup`` < step ≤ ``warmup + steps`` of a ``Run`` (see module doc)."""

    def __init__(self, run, warmup: int, steps: int):
        import torch

        self.torch = torch
        self.first, self.last = warmup, warmup + steps
        # images per optimizer step and rank
        self.steps, self.batch_size = steps, run.cfg.data.batch_size * run.cfg.engine.grad_accum
        self.cuda = torch.cuda.is_available()
        self.timing, self.stall, self.started = False, 0.0, 0.0
        self.result: dict | None = None
        epoch, on_step_end = run.train_data.epoch, run.method.on_step_end

        def timed_epoch(*args):
            return self._timed(epoch(*args))

        def step_end(model, step: int) -> None:
            on_step_end(model, step)
            self._step_end(step)

        run.train_data.epoch, run.method.on_step_end = timed_epoch, step_end

    def _timed(self, batches):
        """The epoch's batches, with the wait for each one counted inside the window."""
        iterator = iter(batches)
        try:
            while True:
                start = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                if self.timing:
                    self.stall += time.perf_counter() - start
                yield batch
        finally:
            getattr(iterator, "close", lambda: None)()

    def _synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def _step_end(self, step: int) -> None:
        if step == self.first:
            self._synchronize()
            if self.cuda:
                self.torch.cuda.reset_peak_memory_stats()
            self.timing, self.stall, self.started = True, 0.0, time.perf_counter()
        elif step == self.last and self.timing:
            self._synchronize()
            self.timing = False
            self.result = self._combine(time.perf_counter() - self.started)

    def _combine(self, seconds: float) -> dict:
        """This window over all ranks: images summed, times and memory of the slowest rank."""
        torch = self.torch
        import torch.distributed as dist

        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else 0.0
        device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else None
        worst = torch.tensor([seconds, self.stall, peak], dtype=torch.float64, device=device)
        world = 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        seconds, stall, peak = worst.tolist()
        return {"gpus": world, "images_per_s": round(self.batch_size * world * self.steps
                                                     / seconds, 1),
                "step_ms": round(1000 * seconds / self.steps, 2),
                "stall_ms": round(1000 * stall / self.steps, 2),
                "stall_fraction": round(stall / seconds, 4), "peak_gb": round(peak, 2)}


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_one(args: argparse.Namespace) -> int:
    """One timed job (under torchrun): ``pipeline train`` with a Probe around the run."""
    import pipeline.engine
    from pipeline.cli.main import main
    from pipeline.engine.trainer import Run

    main_rank = int(os.environ.get("RANK", "0")) == 0
    record = {"event": "gpu_check", "run": args.name, "config": args.config,
              "batch_per_gpu": args.batch}

    def train(cfg) -> int:
        try:
            run = Run(cfg)
            probe = Probe(run, args.warmup, args.steps)
            code = run.execute()
        except Exception as err:
            if not _is_oom(err):
                raise
            emit({**record, "status": "oom", "error": str(err).splitlines()[0][:200]})
            return OOM_EXIT
        if code == 0 and main_rank:
            if probe.result is None:
                raise RuntimeError(f"{args.name}: the run ended before step {probe.last}")
            emit({**record, "status": "ok", "method": cfg.method.name, "model": cfg.model.name,
                  "precision": cfg.engine.precision, "compile": cfg.engine.compile,
                  "warmup": args.warmup, "steps": args.steps, **probe.result})
        return code

    pipeline.engine.train = train  # what `pipeline train` calls
    return main(["train", str(REPO / "configs" / args.config), *args.overrides])


# ----------------------------------------------------------------------------- the driver
def overrides(args: argparse.Namespace, root: Path, run_name: str, batch: int) -> list[str]:
    """The ImageNet recipe as a short timed job: the batch, the synthetic tree, no mid-run
    evaluation, no MLflow, its own run directory."""
    common = [f"data.root={root}", "data.backend=dali", f"data.batch_size={batch}",
              "engine.precision=bf16", "engine.channels_last=true",
              f"schedule.iterations={args.warmup + args.steps}",
              f"engine.eval_every_iterations={10**9}", "checkpoint.every_minutes=0",
              "tracking.enabled=false", f"output_dir={args.out / 'runs'}", f"name={run_name}"]
    if args.compile:
        common.append("engine.compile=true")
    if args.cpu:
        common += [f"data.image_size={args.image_size}", "data.workers=2",
                   f"model.num_classes={args.classes}"]
    return common


def launch(args: argparse.Namespace, root: Path, name: str, batch: int) -> tuple[dict, int]:
    """One run in its own process (torchrun with several GPUs), so that a run out of memory
    leaves the next one a clean GPU; its stderr goes to OUT/logs/<name>-b<batch>.log, its run directory (checkpoint,
    exported model) is removed afterwards."""
    run_name = f"{name}-b{batch}-{time.strftime('%Y%m%d-%H%M%S')}"
    # one GPU: a world of one, as `pipeline train` without torchrun
    launcher = ["-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.gpus}"] if args.gpus > 1 else []
    command = [sys.executable, *launcher, "-m", "benchmarks.gpu_check", "run",
               "--name", name, "--config", RUNS[name][0], "--batch", str(batch),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--",
               *overrides(args, root, run_name, batch)]
    log = args.out / "logs" / f"{name}-b{batch}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DS_ACCELERATOR="cpu" if args.cpu else "cuda",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a GPU machine
    failed = {"event": "gpu_check", "run": name, "batch_per_gpu": batch, "log": str(log)}
    with open(log, "w") as err:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err,
                                text=True, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return {**failed, "status": "timeout"}, 1
        finally:
            shutil.rmtree(args.out / "runs" / run_name, ignore_errors=True)
    records = [json.loads(line) for line in stdout.splitlines()
               if line.startswith("{") and '"gpu_check"' in line]
    if any(r.get("status") == "oom" for r in records):
        return records[0], OOM_EXIT
    if proc.returncode == 0 and records:
        return records[0], 0
    tail = log.read_text().strip().splitlines()[-1:] or [""]
    return {**failed, "status": "failed", "exit_code": proc.returncode,
            "error": tail[0][:300]}, 1


def _stop(proc: subprocess.Popen) -> None:
    """End a run past its time: torchrun and its ranks (the session it leads), TERM then KILL."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def measure(args: argparse.Namespace, root: Path, name: str) -> dict:
    """``name`` at ``--batch``, then at each smaller batch while it runs out of memory."""
    for batch in [b for b in BATCHES if b <= args.batch] or [args.batch]:
        record, code = launch(args, root, name, batch)
        if code != OOM_EXIT:
            return record
        print(f"gpu_check: {name} ran out of memory at batch {batch} per GPU", file=sys.stderr)
    return record


def table(records: list[dict]) -> str:
    """The runs side by side; ``vs base``: images/s relative to the architecture's baseline."""
    ok = {r["run"]: r for r in records if r.get("status") == "ok"}
    rows = ["| run | batch/GPU | GPUs | images/s | vs base | step ms | stall ms (share) "
            "| peak GB |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("status") != "ok":
            rows.append(f"| {r['run']} | {r.get('batch_per_gpu', '')} | | {r['status']} | | | | |")
            continue
        base = ok.get(RUNS[r["run"]][1])
        ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}×" if base else ""
        rows.append(f"| {r['run']} | {r['batch_per_gpu']} | {r['gpus']} | {r['images_per_s']:.1f} "
                    f"| {ratio} | {r['step_ms']:.1f} | {r['stall_ms']:.1f} "
                    f"({100 * r['stall_fraction']:.0f}%) | {r['peak_gb']:.2f} |")
    return "\n".join(rows)


def drive(args: argparse.Namespace) -> int:
    started = time.monotonic()
    args.out = args.out.resolve()
    names = args.runs.split(",") if args.runs else list(RUNS)
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        raise SystemExit(f"gpu_check: unknown run {unknown[0]!r} (expected some of {list(RUNS)})")
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device (torch.cuda.is_available() is False); "
                             "--cpu runs the dry run")
        args.gpus = args.gpus or torch.cuda.device_count()
    root = args.out / "imagenet-synth"
    spec = write_tree(root, args.classes, args.train_images or 200 * args.batch,
                      args.val_per_class, args.shapes, args.distinct)
    from pipeline.data.index import index_tree

    index_tree(str(root))  # listed and checked once; every run's start reads the index
    emit({"event": "gpu_check_data", "root": str(root), **spec,
          "seconds": round(time.monotonic() - started, 1)})
    records = []
    for name in names:
        record = measure(args, root, name)
        emit(record)
        records.append(record)
    print(table(records))
    print(f"gpu_check: {len(records)} runs in {time.monotonic() - started:.0f} s "
          f"(logs in {args.out / 'logs'})", file=sys.stderr)
    return 0 if all(r.get("status") == "ok" for r in records) else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true",
                        help="dry run on the CPU: tiny images, classes and batches")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs (torchrun ranks); 0 = all")
    parser.add_argument("--batch", type=int, help="largest batch per GPU tried (256)")
    parser.add_argument("--runs", default="", help=f"comma-separated subset of {list(RUNS)}")
    parser.add_argument("--warmup", type=int, help="untimed steps per run (20)")
    parser.add_argument("--steps", type=int, help="timed steps per run (100)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"),
                        help="data, runs and logs (default runs/gpu-check)")
    parser.add_argument("--timeout", type=float, help="seconds per run before it is stopped")
    parser.add_argument("--compile", action="store_true",
                        help="engine.compile=true (raise --warmup: compiling takes minutes)")
    parser.add_argument("--no-install", action="store_true",
                        help="(gpu_check.sh) skip `make venv`")
    args = parser.parse_args(argv)
    # full size on a GPU; tiny on the CPU, where every figure is only a smoke test
    sizes = dict(batch=4, warmup=1, steps=2, timeout=300, classes=10, val_per_class=1,
                 train_images=0, shapes=((48, 40), (40, 48)), distinct=8, image_size=32) \
        if args.cpu else \
        dict(batch=256, warmup=20, steps=100, timeout=300, classes=1000, val_per_class=1,
             train_images=0, shapes=SHAPES, distinct=512, image_size=224)
    for key, value in sizes.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.cpu:
        args.gpus = 1
    return args


def parse_run(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check run")
    parser.add_argument("--name", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        sys.exit(run_one(parse_run(sys.argv[2:])))
    sys.exit(drive(parse(sys.argv[1:])))
