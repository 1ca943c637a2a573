"""The model registry: ``build_model(name, num_classes, method=None, **opts)``.

An architecture registers its baseline builder with ``@register_model("name")``. A method
registers, per architecture, the builder of its variant with
``@register_model("name", method="ce")``; that builder takes the same arguments plus the
method's structural options (``opts``), and decides the exact placement of the method's layers.

A builder's keyword parameters, with their type annotations, are its options (``model.opts``):
``check_model_options`` refuses an option it does not take or a value of another type, naming
``model.opts.<key>``. A builder that takes ``**opts`` to pass them on to the builder of another
architecture with the same method registers with ``extends=`` that architecture, whose options
it then also accepts.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from importlib import import_module

from torch import nn

from pipeline.config import ConfigError, check_options, declared_options

Builder = Callable[..., nn.Module]
_BUILDERS: dict[tuple[str, str], Builder] = {}
_EXTENDS: dict[tuple[str, str], str] = {}

# Modules that register builders on import; method modules add themselves here.
_MODEL_MODULES = ["cifar_resnet", "cifar_densenet", "torchvision_models", "cifar_mobilenet",
                  "cifar_shufflenet", "csg_nets", "gated_nets", "selective_nets", "ce_nets",
                  "segmentation"]


def register_model(name: str, method: str = "baseline",
                   extends: str | None = None) -> Callable[[Builder], Builder]:
    def wrap(builder: Builder) -> Builder:
        key = (name, method)
        if key in _BUILDERS:
            raise ValueError(f"model {name!r} with method {method!r} is registered twice")
        _BUILDERS[key] = builder
        if extends is not None:
            _EXTENDS[key] = extends
        return builder

    return wrap


def _import_all() -> None:
    for module in _MODEL_MODULES:
        import_module(f"{__package__}.{module}")


def model_names(method: str | None = None) -> list[str]:
    _import_all()
    method = method or "baseline"
    return sorted(name for name, m in _BUILDERS if m == method)


def _builder(name: str, method: str) -> Builder:
    if (name, "baseline") not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r} (expected one of {model_names()})")
    builder = _BUILDERS.get((name, method))
    if builder is None:
        supported = model_names(method)
        if not supported:
            methods = sorted({m for _, m in _BUILDERS})
            raise ConfigError(f"unknown method {method!r} (expected one of {methods})")
        raise ConfigError(f"method {method!r} does not support model {name!r} "
                          f"(it supports {supported})")
    return builder


def model_options(name: str, method: str | None = None) -> dict[str, inspect.Parameter]:
    """The options (``model.opts``) of architecture ``name`` converted by ``method``, with their
    annotations; a ConfigError for an unknown model or a method that does not support it."""
    _import_all()
    method = method or "baseline"
    options = declared_options(_builder(name, method), skip=("num_classes",))
    if (name, method) in _EXTENDS:
        options = {**model_options(_EXTENDS[name, method], method), **options}
    return options


def check_model_options(name: str, method: str | None, opts: Mapping) -> None:
    """``opts`` are options of ``name`` with ``method``, of their types (else a ConfigError
    naming ``model.opts.<key>`` and the options the builder takes)."""
    method = method or "baseline"
    check_options(model_options(name, method), opts, "model.opts",
                  f"{name!r} with method {method!r}")


def build_model(name: str, num_classes: int, method: str | None = None, **opts) -> nn.Module:
    """Build architecture ``name`` with ``num_classes`` outputs, converted by ``method``.

    Raises ConfigError naming the problem for an unknown architecture, a method that does not
    support it, or an option the builder does not take.
    """
    method = method or "baseline"
    check_model_options(name, method, opts)
    if num_classes < 1:
        raise ConfigError(f"a model needs at least one class, got num_classes={num_classes}")
    return _BUILDERS[name, method](num_classes=num_classes, **opts)
