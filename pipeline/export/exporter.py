"""One saved model → one inference file, refused unless it computes what the trained model does.

The check runs the written file (``formats.run_file``: TorchScript loaded back, ONNX in
onnxruntime, exported.pt through ``artifacts.load_saved``) on a batch of real validation images
of the config's data and compares it with the trained model (exported.pt: its exported form)
in eval mode, as evaluation runs it:

    max |Δ| = max over the batch and outputs of |file(x) − model(x)|
    refused when max |Δ| > RELATIVE_TOLERANCE · max |model(x)|

Why 1e-4 of the output scale: both sides compute in float32 (unit roundoff u = 2⁻²⁴ ≈ 6e-8), and
an export only reorders the arithmetic (BN folded into conv weights, kernels materialised, another
runtime's convolution algorithm): each layer's rounding, of order u·√(fan-in) relative, grows
through the depth of the network, measured here at up to 5e-6 of the logits' scale (1.8e-4 on
logits of ~40, CSG's MobileNetV2). 1e-4 (~1,700 u) clears that twentyfold, while a real export
fault (a dropped or misplaced channel, an unfolded BN, a gate taken the wrong way) moves the
outputs by a sizeable fraction of their scale. The batch holds more images than the capture's
example, so a graph that baked in the example's batch size fails the check instead of passing it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.config import ConfigError
from pipeline.data import build_val_loader
from pipeline.engine import artifacts
from pipeline.engine.artifacts import Checkpoint
from pipeline.engine.evaluate import val_classes
from pipeline.methods import get_method
from pipeline.models.summary import count_params

from .formats import FORMATS, run_file, write_onnx, write_torchscript
from .forms import Form, inference_forms, main_output

RELATIVE_TOLERANCE = 1e-4
EXAMPLE_IMAGES = 2   # the capture's example: torch.export specialises a batch of 1
WRITERS = {"torchscript": write_torchscript, "onnx": write_onnx}
log = logging.getLogger("pipeline.export")


def validation_batch(cfg: DictConfig, images: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``images`` validation images of the config's data (CPU), and the class names
    of its val split."""
    data = OmegaConf.merge(cfg.data, {"val_batch_size": images})
    val = build_val_loader(data, rank=0, world_size=1, device="cpu")
    batch, _ = next(iter(val))
    if batch.shape[0] <= EXAMPLE_IMAGES:
        raise ConfigError(f"export checks on more than {EXAMPLE_IMAGES} validation images: "
                          f"{cfg.data.root} gave {batch.shape[0]}")
    return batch.float().contiguous(), val_classes(val)


def _write_first_form(fmt: str, forms: list[Form], example: torch.Tensor, out: Path,
                      source: str, hint: str = "") -> tuple[Form, str]:
    """Write the first form ``fmt`` captures; that form and how it was captured."""
    failures = []
    for form in forms:
        try:
            return form, WRITERS[fmt](form.module, example, out)
        except Exception as err:  # torch.export / TorchScript / ONNX raise many kinds
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            log.warning("the %s form does not export to %s: %s", form.name, fmt, reason)
            failures.append(f"{form.name} form: {reason}")
    raise ConfigError(f"{source}: no form of this model exports to {fmt} ("
                      + "; ".join(failures) + ")" + hint)


def _write(fmt: str, checkpoint: Checkpoint, cfg: DictConfig, model: torch.nn.Module,
           num_classes: int, classes: list[str], example: torch.Tensor, out: Path
           ) -> tuple[Form, str]:
    """Write ``model`` (as loaded from ``checkpoint``) as ``fmt``; the form written and how."""
    method = get_method(cfg.method.name, **cfg.method.opts)
    if fmt != "state_dict":
        hint = "; export the final.pt instead: its trained form is a candidate too" \
            if checkpoint.exported else ""
        return _write_first_form(fmt, inference_forms(model, method, checkpoint.exported, example),
                                 example, out, str(checkpoint.path), hint)
    if checkpoint.exported:
        exported, buffers = model, checkpoint.buffers
    else:
        exported, buffers = method.export(model), artifacts.trained_buffers(model)
    config = artifacts.config_record(cfg, num_classes)
    torch.save(artifacts.exported_record(exported, buffers, config, classes), out)
    return Form("exported", exported), "exported.pt"


def export_checkpoint(checkpoint: Checkpoint, cfg: DictConfig, fmt: str, out: Path,
                      images: int = 8) -> dict:
    """Write ``checkpoint`` as ``fmt`` to ``out`` once it passes the check; the export record
    (max |Δ|, tolerance, form, …) plus ``batch`` / ``outputs`` for registering it."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    if out.exists():
        raise ConfigError(f"{out} exists: choose another --out")
    batch, found = validation_batch(cfg, images)
    num_classes = artifacts.num_classes_of(cfg, checkpoint, len(found))
    model = artifacts.build_saved_model(checkpoint, cfg, num_classes)
    with torch.no_grad():
        reference = main_output(model(batch)).float()
    partial = out.with_name(f".{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        form, how = _write(fmt, checkpoint, cfg, model, num_classes, checkpoint.classes or found,
                           batch[:EXAMPLE_IMAGES], partial)
        outputs = run_file(fmt, partial)(batch).float()
        delta = (outputs - reference).abs().max().item()
        scale = reference.abs().max().item()
        tolerance = RELATIVE_TOLERANCE * scale
        if not delta <= tolerance:   # NaN fails too
            raise ConfigError(f"export refused: the {fmt} file's outputs differ from the trained "
                              f"model's by max |Δ| = {delta:.3g} on {batch.shape[0]} validation "
                              f"images, above {tolerance:.3g} ({RELATIVE_TOLERANCE:g} of their "
                              f"scale {scale:.3g})")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return {"format": fmt, "out": str(out), "form": form.name, "captured": how,
            "images": int(batch.shape[0]), "max_abs_delta": delta, "tolerance": tolerance,
            "output_scale": scale, "params": count_params(form.module)[0],
            "batch": batch, "outputs": outputs}
