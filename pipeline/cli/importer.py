"""``pipeline import KIND …``: weights trained elsewhere as the project's ``final.pt``.

``pipeline import csg CKPT --model NAME [--opt key=value …] --out final.pt`` converts one of the
CSG authors' released CIFAR-10 checkpoints (``pipeline/models/csg_import.py``). It writes
``final.pt`` as training does, ``{"model": state_dict, "config": the resolved config}``, and that
config as ``config.yaml`` beside it (the model, its method and options, the CIFAR recipe with the
authors' normalisation), so ``pipeline eval <dir>/config.yaml final.pt data.root=…`` evaluates
it. Prints one JSON line. Existing files are never overwritten.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import InputError

from .options import parse_opts


def released_config(model: str, method: str, opts: dict, num_classes: int):
    """The schema's defaults with the imported model and the authors' CIFAR-10 evaluation."""
    from omegaconf import OmegaConf

    from pipeline.config import Config
    from pipeline.models.csg_import import AUTHORS_MEAN, AUTHORS_STD

    cfg = OmegaConf.structured(Config)
    cfg.name = f"{model}-{method}-released"
    cfg.model.name, cfg.model.num_classes, cfg.model.opts = model, num_classes, opts
    cfg.method.name = method
    cfg.data.root = "data/cifar10"
    cfg.data.recipe, cfg.data.image_size = "cifar", 32
    cfg.data.mean, cfg.data.std = list(AUTHORS_MEAN), list(AUTHORS_STD)
    return cfg


def run_csg(args) -> int:
    import torch
    from omegaconf import OmegaConf

    from pipeline.config import to_yaml
    from pipeline.models.csg_import import convert
    from pipeline.models.summary import count_params

    out = Path(args.out)
    config_file = out.parent / "config.yaml"
    for target in (out, config_file):
        if target.exists():
            raise InputError(f"{target} exists: choose another --out")
    imported = convert(Path(args.checkpoint), args.model, parse_opts(args.opt))
    cfg = released_config(args.model, imported.method, imported.opts, imported.num_classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": imported.model.state_dict(),
                "config": OmegaConf.to_container(cfg, resolve=True)}, out)
    config_file.write_text(to_yaml(cfg))
    print(json.dumps({
        "event": "import", "kind": "csg", "checkpoint": args.checkpoint, "model": args.model,
        "method": imported.method, "opts": imported.opts, "num_classes": imported.num_classes,
        "params": count_params(imported.model)[0],
        "generator_copies": imported.generator_copies, "source_dtype": imported.source_dtype,
        "authors_top1": round(imported.authors_accuracy / 100, 6), "authors_epoch": imported.epoch,
        "out": str(out), "config": str(config_file)}), flush=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("import", help="convert weights trained elsewhere into a final.pt")
    kinds = p.add_subparsers(dest="kind", required=True)

    k = kinds.add_parser("csg", help="a CSG authors' released CIFAR-10 checkpoint "
                                     "(associativeconv Pretrained_Models/*.t7)")
    k.add_argument("checkpoint")
    k.add_argument("--model", required=True, help="our architecture, e.g. cifar_resnet56")
    k.add_argument("--opt", action="append", default=[], metavar="key=value",
                   help="model option (CSG: slice, code), as `pipeline summary --opt`")
    k.add_argument("--out", required=True, help="the final.pt to write (config.yaml beside it)")
    k.set_defaults(func=run_csg)
