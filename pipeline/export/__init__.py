"""Portable inference exports of saved models (``pipeline export``).

``forms``     the inference forms of a model (the method's export, else the trained form) and
              the torch.export capture they go through
``formats``   TorchScript, ONNX and exported.pt: how each is written and run back
``exporter``  one checkpoint → one file, refused unless it matches the trained model on real
              validation images
"""
from .exporter import RELATIVE_TOLERANCE, export_checkpoint
from .formats import FORMATS

__all__ = ["FORMATS", "RELATIVE_TOLERANCE", "export_checkpoint"]
