"""Exported models in the MLflow model registry, ready for ``mlflow models serve``.

An ONNX export is logged with MLflow's ``onnx`` flavour (served by onnxruntime, no pickle) in a
run of its own, tagged ``pipeline.kind=export`` and with the checkpoint it came from, together
with its signature (the tensor shapes: images ``[-1, 3, H, W]`` float32 in, outputs
``[-1, …]`` out) and one validation image as the input example; the model is registered under
the given name (a new version of it when the name exists).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.tracking import KIND_TAG

EXPORT_KIND = "export"   # the KIND_TAG value of an export's run


def register_onnx(onnx_file: Path, name: str, experiment: str, run_name: str,
                  example: np.ndarray, outputs: np.ndarray, tags: dict[str, str]) -> dict:
    """Log ``onnx_file`` and register it as ``name``; its run id, version and model URI."""
    import mlflow
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def spec(array: np.ndarray, tensor_name: str) -> Schema:
        return Schema([TensorSpec(array.dtype, (-1, *array.shape[1:]), tensor_name)])

    signature = ModelSignature(inputs=spec(example, "images"), outputs=spec(outputs, "output"))
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags={KIND_TAG: EXPORT_KIND, **tags}) as run:
        info = mlflow.onnx.log_model(onnx.load(str(onnx_file)), name="model",
                                     registered_model_name=name, signature=signature,
                                     input_example=example)
    return {"registered": name, "version": int(info.registered_model_version),
            "model_uri": f"models:/{name}/{info.registered_model_version}",
            "run_id": run.info.run_id}
