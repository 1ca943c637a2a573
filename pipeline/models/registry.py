"""The model registry: ``build_model(name, num_classes, method=None, **opts)``.

An architecture registers its baseline builder with ``@register_model("name")``. A method
registers, per architecture, the builder of its variant with
``@register_model("name", method="ce")``; that builder takes the same arguments plus the
method's structural options (``opts``), and decides the exact placement of the method's layers.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib import import_module

from torch import nn

Builder = Callable[..., nn.Module]
_BUILDERS: dict[tuple[str, str], Builder] = {}

# Modules that register builders on import; method modules add themselves here.
_MODEL_MODULES = ["cifar_resnet", "cifar_densenet", "torchvision_models", "cifar_mobilenet",
                  "cifar_shufflenet", "csg_nets", "gated_nets", "selective_nets", "ce_nets",
                  "segmentation"]


def register_model(name: str, method: str = "baseline") -> Callable[[Builder], Builder]:
    def wrap(builder: Builder) -> Builder:
        key = (name, method)
        if key in _BUILDERS:
            raise ValueError(f"model {name!r} with method {method!r} is registered twice")
        _BUILDERS[key] = builder
        return builder

    return wrap


def _import_all() -> None:
    for module in _MODEL_MODULES:
        import_module(f"{__package__}.{module}")


def model_names(method: str | None = None) -> list[str]:
    _import_all()
    method = method or "baseline"
    return sorted(name for name, m in _BUILDERS if m == method)


def build_model(name: str, num_classes: int, method: str | None = None, **opts) -> nn.Module:
    """Build architecture ``name`` with ``num_classes`` outputs, converted by ``method``.

    Raises ValueError naming the problem for an unknown architecture, a method that does not
    support it, or an option the builder does not take.
    """
    _import_all()
    method = method or "baseline"
    if (name, "baseline") not in _BUILDERS:
        raise ValueError(f"unknown model {name!r} (expected one of {model_names()})")
    builder = _BUILDERS.get((name, method))
    if builder is None:
        supported = model_names(method)
        if not supported:
            raise ValueError(f"unknown method {method!r}")
        raise ValueError(f"method {method!r} does not support model {name!r} "
                         f"(it supports {supported})")
    accepted = inspect.signature(builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(opts) - set(accepted))
        if unknown:
            options = sorted(set(accepted) - {"num_classes"})
            raise ValueError(f"unknown model option {unknown[0]!r} for {name!r} with method "
                             f"{method!r} (accepted: {options})")
    return builder(num_classes=num_classes, **opts)
