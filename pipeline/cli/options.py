"""Parsing shared by several commands."""
from __future__ import annotations

from omegaconf import OmegaConf

from pipeline.errors import InputError


def parse_opts(items: list[str]) -> dict:
    """``["slice=12", "binary=true"]`` → ``{"slice": 12, "binary": True}`` (YAML scalars)."""
    opts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--opt {item!r} is not of the form key=value")
        opts[key] = OmegaConf.from_dotlist([f"v={value}"]).v
    return opts
