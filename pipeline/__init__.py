"""Distributed training of channel-level CNN methods: DALI data, DeepSpeed engine, MLflow tracking."""
__version__ = "0.1.0"
