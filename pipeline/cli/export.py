"""``pipeline export [CONFIG] CHECKPOINT --format torchscript|onnx|state_dict --out PATH
[--register NAME] [key=value …]``: the checkpoint's inference form as a portable file.

The file is written only once its outputs on real validation images (the config's data) match
the trained model's (``pipeline/export/exporter.py``); prints one JSON line with max |Δ|.
``--register NAME`` (ONNX) logs it to the MLflow model registry with its signature and an input
example, for ``mlflow models serve``.
"""
from __future__ import annotations

import json
from pathlib import Path

from .options import add_checkpoint_args, paths_and_overrides


def run(args) -> int:
    from pipeline.config import ConfigError
    from pipeline.engine.artifacts import checkpoint_config, read_checkpoint
    from pipeline.export import export_checkpoint

    if args.register and args.format != "onnx":
        raise ConfigError("--register needs --format onnx (MLflow's onnx flavour serves it "
                          "without unpickling; its pytorch flavour refuses TorchScript files "
                          "unless pickle deserialisation is allowed)")
    config, path, overrides = paths_and_overrides(args.args)
    checkpoint = read_checkpoint(path)
    cfg = checkpoint_config(checkpoint, config, overrides)
    record = export_checkpoint(checkpoint, cfg, args.format, Path(args.out), args.images)
    batch, outputs = record.pop("batch"), record.pop("outputs")
    if args.register:
        from pipeline.tracking.model_registry import register_onnx

        record.update(register_onnx(Path(args.out), args.register, cfg.tracking.experiment,
                                    f"export-{cfg.name}", batch[:1].numpy(),
                                    outputs[:1].numpy(), {"checkpoint": str(Path(path).resolve()),
                                                          "model": cfg.model.name,
                                                          "method": cfg.method.name}))
    print(json.dumps({"event": "export", **record}), flush=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint's inference form as TorchScript, ONNX "
                                      "or exported.pt, checked on validation images")
    add_checkpoint_args(p, "as for eval: the config saved with the checkpoint unless CONFIG "
                           "is given")
    p.add_argument("--format", required=True, choices=["torchscript", "onnx", "state_dict"])
    p.add_argument("--out", required=True, help="the file to write (never overwritten)")
    p.add_argument("--images", type=int, default=8,
                   help="validation images the export is checked on (default 8)")
    p.add_argument("--register", metavar="NAME",
                   help="register the ONNX file in the MLflow model registry under NAME")
    p.set_defaults(func=run)
