"""Architectures and the registry that applies a method to them."""
from .registry import build_model, model_names, register_model

__all__ = ["build_model", "model_names", "register_model"]
