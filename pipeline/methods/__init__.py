"""Channel methods: each module holds a method's layers, its losses or schedules, its export.

``get_method(name, **opts)`` returns the method's hook object (see ``base.Method``). A method's
``__init__`` keyword parameters, with their type annotations, are its options (``method.opts``):
an option it does not take, or a value of another type, is a ConfigError naming
``method.opts.<key>`` before the method is constructed.
"""
from __future__ import annotations

import inspect

from pipeline.config import ConfigError, check_options, declared_options

from .base import EvalMeter, Method

_METHODS: dict[str, type[Method]] = {"baseline": Method}


def register_method(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    _import_all()
    return sorted(_METHODS)


def method_options(name: str | None) -> dict[str, inspect.Parameter]:
    """The options (``method.opts``) of method ``name``, with their annotations."""
    _import_all()
    name = name or "baseline"
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r} (expected one of {sorted(_METHODS)})")
    return declared_options(_METHODS[name])


def get_method(name: str | None, **opts) -> Method:
    name = name or "baseline"
    check_options(method_options(name), opts, "method.opts", f"{name!r}")
    return _METHODS[name](**opts)


def _import_all() -> None:
    from importlib import import_module

    for module in _METHOD_MODULES:
        import_module(f"{__name__}.{module}")


# One line per method module; each registers its Method subclass on import.
_METHOD_MODULES: list[str] = ["csg", "gating", "selectconv", "ce"]

__all__ = ["EvalMeter", "Method", "get_method", "method_names", "method_options",
           "register_method"]
