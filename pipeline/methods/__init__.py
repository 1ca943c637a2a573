"""Channel methods: each module holds a method's layers, its losses or schedules, its export.

``get_method(name, **opts)`` returns the method's hook object (see ``base.Method``).
"""
from __future__ import annotations

from .base import EvalMeter, Method

_METHODS: dict[str, type[Method]] = {"baseline": Method}


def register_method(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    _import_all()
    return sorted(_METHODS)


def get_method(name: str | None, **opts) -> Method:
    _import_all()
    name = name or "baseline"
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r} (expected one of {sorted(_METHODS)})")
    try:
        return _METHODS[name](**opts)
    except TypeError as err:  # an unknown keyword is a config error
        raise ValueError(f"method.opts for {name!r}: {err}") from None


def _import_all() -> None:
    from importlib import import_module

    for module in _METHOD_MODULES:
        import_module(f"{__name__}.{module}")


# One line per method module; each registers its Method subclass on import.
_METHOD_MODULES: list[str] = ["csg", "gating", "selectconv", "ce"]

__all__ = ["EvalMeter", "Method", "get_method", "method_names", "register_method"]
