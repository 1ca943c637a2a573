"""Device discipline of the GPU path, checked on machines without a GPU.

The training step (``train_step`` + ``accumulate`` + ``on_step_end``) and the evaluation
(``evaluate`` with the task meter and the method meters) of every method's digits model (32×32)
run with their tensors on a device the loop did not create them on, in two ways:

* **Fake CUDA** (``FakeTensorMode``): model and batches are fake CUDA tensors (shapes, dtypes and
  devices; no memory, no kernels), the forward under bf16 autocast and channels_last as on a
  GPU. A tensor the loop or a method makes on the CPU and mixes into the step raises as on a GPU
  ("FakeTensor is wrapped to wrong device", FakeTensorDeviceMismatchError), and so does every
  host read-back (``.item()``, ``.tolist()``, ``int(t)``, ``float(t)``, ``nonzero``, ``unique``, a
  boolean mask): a fake tensor has no value to read. Autograd does not run on fake CUDA tensors
  without a CUDA context (pytorch#92627), so the stand-in engine's ``backward`` checks the loss
  and stops there.
* **Read-backs on the CPU, forward and backward**: the same steps on real CPU tensors through
  the methods' GPU code paths (no fused CPU kernels), a real backward and optimizer step, under
  a dispatch mode that fails on every operator that reads a value back to the host on CUDA (the
  operator tags ``data_dependent_output`` / ``dynamic_output_shape`` that FakeTensor uses, and
  indexing with a boolean mask) and on ``Tensor.tolist``.

An evaluation may read values back once, after its one all-reduce: both checks end there
(``all_reduce_sum`` is the boundary; it also asserts that every sum is on the run's device).
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import pipeline.engine.evaluate as evaluation
from conftest import config_path
from pipeline.config import load_config
from pipeline.engine.evaluate import eval_meters, evaluate, memory_format
from pipeline.engine.trainer import accumulate, train_step
from pipeline.methods import Method, get_method
from pipeline.methods.selectconv import SelectiveConv2d
from pipeline.models import build_model
from pipeline.tasks import Classification, Segmentation

METHODS = ["baseline", "ce", "csg", "gated", "selectconv"]
CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
BATCH = 4
# gated (configs/digits/gated.yaml): batch-shaping is on before epoch 3, the L0 loss after it
EPOCHS = (0.5, 5.0)
aten = torch.ops.aten


# ------------------------------------------------------------------------------ the two guards
class FakeCuda:
    """Fake CUDA for the ``with`` block: factories with ``device="cuda"`` give fake tensors,
    autocast on "cuda" is live (torch would otherwise disable it without a GPU)."""

    def __enter__(self) -> FakeCuda:
        self.stack = ExitStack()
        patch = self.stack.enter_context(pytest.MonkeyPatch.context())
        # what torch.autocast("cuda") asks before it turns itself on
        patch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
        patch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
        self.stack.callback(torch.__future__.set_overwrite_module_params_on_conversion,
                            torch.__future__.get_overwrite_module_params_on_conversion())
        # Module.to swaps parameters in place by default, which fake tensors do not allow.
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.mode.__enter__()
        self.active = True
        return self

    def release(self) -> None:
        """Leave fake mode early (at the evaluation's host boundary)."""
        if self.active:
            self.active = False
            self.mode.__exit__(None, None, None)

    def __exit__(self, *exc) -> None:
        self.release()
        self.stack.close()


class HostReadBack(AssertionError):
    pass


def _reads_back(func, args) -> bool:
    """Whether the operator reads a device value back to the host (a CUDA sync)."""
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                aten._index_put_impl_.default):
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in args[1] if i is not None)
    return torch.Tag.data_dependent_output in func.tags or \
        torch.Tag.dynamic_output_shape in func.tags


class _ReadBackOperators(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _reads_back(func, args):
            raise HostReadBack(f"{func} reads a value back to the host inside the step")
        return func(*args, **(kwargs or {}))


class _ToList(TorchFunctionMode):
    """``Tensor.tolist`` reads CPU memory without an operator, so only this level sees it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            raise HostReadBack("Tensor.tolist reads values back to the host inside the step")
        return func(*args, **(kwargs or {}))


class NoReadBack:
    """Fails on the first operation that would read a value back to the host on CUDA."""

    def __enter__(self) -> NoReadBack:
        self.modes = [_ToList(), _ReadBackOperators()]
        for mode in self.modes:
            mode.__enter__()
        self.active = True
        return self

    def release(self) -> None:
        if self.active:
            self.active = False
            for mode in reversed(self.modes):
                mode.__exit__(None, None, None)

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------ the run's parts
class StandInEngine:
    """What train_step needs of DeepSpeed's engine: called like the model (under autocast, as
    DeepSpeed's torch_autocast), ``backward(loss)`` and ``step()``. ``optimizer=None``: the
    fake-CUDA form, which checks the loss and runs no autograd."""

    def __init__(self, model: nn.Module, device: torch.device, autocast: torch.dtype | None,
                 optimizer: torch.optim.Optimizer | None = None):
        self.model, self.device, self.autocast, self.optimizer = model, device, autocast, optimizer
        self.steps = 0

    def __call__(self, images: torch.Tensor):
        with torch.autocast(self.device.type, dtype=self.autocast,
                            enabled=self.autocast is not None):
            return self.model(images)

    def backward(self, loss: torch.Tensor) -> None:
        assert loss.device == self.device and loss.dim() == 0, (loss.device, loss.shape)
        if self.optimizer is not None:
            loss.backward()

    def step(self) -> None:
        self.steps += 1
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


class TinySegmenter(nn.Module):
    """A segmentation model's output contract: {"out", "aux"} logits at the input size."""

    def __init__(self, classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.out, self.aux = nn.Conv2d(8, classes, 1), nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        up = lambda t: F.interpolate(t, size=x.shape[-2:], mode="bilinear",  # noqa: E731
                                     align_corners=False)
        out = {"out": up(self.out(h))}
        if self.training:
            out["aux"] = up(self.aux(h))
        return out


@dataclass
class Case:
    """One model, task and method as a run builds them (on the CPU), and its input size."""
    cfg: DictConfig
    model: nn.Module
    task: Classification | Segmentation
    method: Method
    size: int
    classes: int


def case_of(name: str, copies: bool = True) -> Case:
    """``digits/<method>`` and ``imagenet/<config>``: a config as ``pipeline train`` builds it;
    ``segmentation``: TinySegmenter, slide inference, baseline method. ``copies``: give a
    selective model copied channels first (so that the copy runs in the step)."""
    if name == "segmentation":
        cfg = load_config(config_path("digits/baseline.yaml"))
        task = Segmentation([f"c{i}" for i in range(10)], val_mode="slide", crop=(24, 24),
                            stride=(16, 16))
        return Case(cfg, TinySegmenter(10), task, get_method("baseline"), 32, 10)
    cfg = load_config(config_path(f"{name}.yaml"))
    classes = cfg.model.num_classes
    model = build_model(cfg.model.name, classes, method=cfg.method.name, **cfg.model.opts)
    if copies and cfg.method.name == "selectconv":
        get_method("selectconv", gamma=0.3).on_epoch_end(model, 0, 2, cfg.engine.seed)
        assert any(getattr(m, "num_copies", 0) for m in model.modules())
    return Case(cfg, model, Classification(classes, cfg.engine.label_smoothing),
                get_method(cfg.method.name, **cfg.method.opts), cfg.data.image_size, classes)


def batch(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(BATCH, 3, case.size, case.size, device=device)
    segmentation = isinstance(case.task, Segmentation)
    shape = (BATCH, case.size, case.size) if segmentation else (BATCH,)
    target = torch.randint(0, case.classes, shape, device=device)
    if segmentation:
        target[:, :4] = 255  # ignored pixels
    return images, target


def train_steps(engine, case: Case, device, fmt) -> dict[str, torch.Tensor]:
    """Two optimizer steps as the loop runs them; the summed train values."""
    sums: dict[str, torch.Tensor] = {}
    for epoch in EPOCHS:
        images, target = batch(case, device)
        values, extras = train_step(engine, case.model, case.task, case.method, images, target,
                                    epoch, fmt)
        sums = accumulate(sums, values)
        case.method.on_step_end(case.model, engine.steps)
        for name, value in {**values, **extras}.items():
            assert value.device == device, (name, value.device)
    return sums


def evaluation_until_reduce(guard, case: Case, device, fmt, autocast,
                            monkeypatch) -> dict[str, float]:
    """evaluate() over two batches; at its all-reduce the sums must be on ``device`` and
    ``guard`` ends (the one place an evaluation reads values back)."""
    reduced = {}

    def boundary(tensors, reduce_device):
        wrong = {k: t.device for k, t in tensors.items() if t.device != device}
        assert reduce_device == device and not wrong, wrong
        reduced.update(tensors)
        guard.release()
        if device.type == "cpu":
            return all_reduce_sum(tensors, reduce_device)
        # fake tensors hold no values: ones stand for the reduced sums
        return {k: torch.ones(t.shape, dtype=torch.float64) for k, t in tensors.items()}

    all_reduce_sum = evaluation.all_reduce_sum
    monkeypatch.setattr(evaluation, "all_reduce_sum", boundary)
    batches = [batch(case, device) for _ in range(2)]
    meters = eval_meters(case.cfg, case.method, case.model)
    result = evaluate(case.model, batches, case.task, device, meters, autocast, fmt)
    assert reduced, "evaluate never reached its all-reduce"
    return result


# ------------------------------------------------------------------------------ the tests
DIGITS = [f"digits/{method}" for method in METHODS]
# The ResNet-50 models of benchmarks/gpu_check.py: a fake tensor costs the same at 224² as at
# 32², but every operator costs milliseconds (DenseNet-121's selective units take a minute;
# their layer is the digits model's).
IMAGENET = ["imagenet/resnet50", "imagenet/resnet50_ce", "imagenet/resnet50_csg",
            "imagenet/resnet50_gated"]


@pytest.mark.unit
@pytest.mark.parametrize("name", [*DIGITS, "segmentation", *IMAGENET])
def test_step_and_evaluation_on_fake_cuda(name, monkeypatch):
    case = case_of(name)
    fmt = memory_format(case.cfg, CUDA)
    assert fmt is torch.channels_last  # the default with CUDA
    with FakeCuda() as fake:
        case.model.to(CUDA, memory_format=fmt)
        engine = StandInEngine(case.model, CUDA, torch.bfloat16)
        sums = train_steps(engine, case, CUDA, fmt)
        assert sums and {v.device for v in sums.values()} == {CUDA}
        result = evaluation_until_reduce(fake, case, CUDA, fmt, torch.bfloat16, monkeypatch)
    assert set(case.task.final_keys) <= set(result)


@pytest.mark.unit
@pytest.mark.parametrize("name", [*DIGITS, "segmentation"])
def test_step_and_evaluation_read_nothing_back(name, monkeypatch):
    """Real CPU tensors through the GPU code paths (no fused CPU kernels), backward and
    optimizer step included. A device branch takes its CPU side here: selective convolution's
    copy backward sums repeated sources with ``unique`` on the CPU only, so its copies are
    checked by the fake-CUDA test (forward) and tests/test_cuda.py (on a GPU)."""
    from pipeline.methods import batch_shaping, channel_copy

    for module in (batch_shaping, channel_copy):
        monkeypatch.setattr(module, "cpu_extension", lambda name: None)
    torch.manual_seed(0)
    case = case_of(name, copies=False)
    optimizer = torch.optim.SGD(case.model.parameters(), lr=0.01, momentum=0.9)
    engine = StandInEngine(case.model, CPU, None, optimizer)
    fmt = torch.contiguous_format
    with NoReadBack():
        sums = train_steps(engine, case, CPU, fmt)
    with NoReadBack() as guard:
        result = evaluation_until_reduce(guard, case, CPU, fmt, None, monkeypatch)
    assert sums["count"].item() == BATCH * len(EPOCHS) == result["samples"]
    assert set(case.task.final_keys) <= set(result)


@pytest.mark.unit
def test_selective_unit_cumulative_batch_norm_stays_on_the_device():
    """BN momentum None (nn.BatchNorm2d's cumulative average, as calibrate_batch_norm sets it):
    the running statistics of nn.BatchNorm2d, with no read-back of the batch count."""
    torch.manual_seed(0)
    unit = SelectiveConv2d(6, 4, 1, K=3)
    unit.norm.momentum = None
    reference = nn.BatchNorm2d(6, momentum=None)
    reference.load_state_dict(unit.norm.state_dict())
    for i in range(3):
        x = torch.randn(5, 6, 4, 4) * (i + 1) + i
        with NoReadBack():
            unit(x)
        reference(x)  # nn.BatchNorm2d itself reads the count back
    # running statistics of order 10 after three batches: float32 rounding of a few ulps
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(unit.norm, name), getattr(reference, name),
                                   rtol=1e-6, atol=1e-6)
    with FakeCuda():
        unit.to(CUDA)
        unit(torch.randn(5, 6, 4, 4, device=CUDA))
