"""Predictions in the format of Cityscapes' official evaluation and benchmark server.

One single-channel 8-bit PNG of **label ids** (not train ids) per image, at the image's full
resolution, named ``<city>_<seq>_<frame>_pred_labelIds.png``: the evaluation script
(``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling``) and the server find a
prediction by its ``<city>_<seq>_<frame>*.png`` prefix, anywhere under the results folder.
A prediction larger than its image (a validation batch padded to its largest image) is cropped
back to the image's size, read from the image file's header.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.segmentation.labels import train_id_to_label_id

_FRAME_NAME = re.compile(r"^(?P<frame>.+_\d+_\d+)_leftImg8bit\.png$")


def prediction_name(image_file: str | Path) -> str:
    """``<city>_<seq>_<frame>_pred_labelIds.png`` for a ``*_leftImg8bit.png`` image."""
    match = _FRAME_NAME.match(Path(image_file).name)
    if match is None:
        raise ValueError(f"not a Cityscapes image name (<city>_<seq>_<frame>_leftImg8bit.png): "
                         f"{image_file}")
    return f"{match['frame']}_pred_labelIds.png"


def write_cityscapes_prediction(train_ids: torch.Tensor | np.ndarray, image_file: str | Path,
                                out_dir: str | Path) -> Path:
    """Write the ``[H, W]`` train-id map predicted for ``image_file`` into ``out_dir``."""
    with Image.open(image_file) as im:
        width, height = im.size
    pred = train_ids.cpu().numpy() if isinstance(train_ids, torch.Tensor) else np.asarray(train_ids)
    if pred.ndim != 2 or pred.shape[0] < height or pred.shape[1] < width:
        raise ValueError(f"prediction of shape {list(pred.shape)} does not cover its image "
                         f"{image_file} ({height}x{width})")
    label_ids = train_id_to_label_id()[pred[:height, :width].astype(np.uint8)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / prediction_name(image_file)
    Image.fromarray(label_ids).save(path)   # uint8 [H, W]: mode L
    return path
