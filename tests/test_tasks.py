"""The task seam: classification and segmentation losses, meters and inference, and the
evaluation loop's distributed sums (every image and pixel counted once over all ranks)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.engine.evaluate import evaluate
from pipeline.tasks import Classification, Segmentation
from pipeline.tasks.segmentation import confusion_matrix, iou_from_confusion, slide_inference

pytestmark = pytest.mark.unit
CLASSES = ["road", "sky", "car"]


def test_confusion_matrix_and_iou_by_hand():
    target = torch.tensor([[[0, 0, 1, 255], [2, 2, 1, 1]]])
    pred = torch.tensor([[[0, 1, 1, 2], [2, 0, 1, 2]]])
    matrix = confusion_matrix(pred, target, 3)
    # rows: ground truth 0 → {0, 1}; 1 → {1, 1, 2}; 2 → {2, 0}; the 255 pixel is not counted
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    iou, miou, accuracy = iou_from_confusion(matrix)
    assert iou == pytest.approx([1 / 3, 2 / 4, 1 / 3])
    assert miou == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert accuracy == pytest.approx(4 / 7)


def test_a_class_absent_from_prediction_and_truth_is_left_out_of_the_mean():
    target = torch.tensor([[[0, 1]]])
    iou, miou, _ = iou_from_confusion(confusion_matrix(target.clone(), target, 3))
    assert math.isnan(iou[2]) and miou == 1.0


def test_segmentation_loss_ignores_255_and_weights_the_aux_head():
    task = Segmentation(CLASSES, aux_weight=0.4)
    out, aux = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0] = 255
    ce = nn.CrossEntropyLoss(ignore_index=255)
    assert task.loss({"out": out, "aux": aux}, target) == pytest.approx(
        (ce(out, target) + 0.4 * ce(aux, target)).item(), rel=1e-6)
    assert task.loss({"out": out}, target) == pytest.approx(ce(out, target).item(), rel=1e-6)


def test_slide_inference_of_a_pointwise_model_equals_the_whole_image():
    model = nn.Conv2d(3, 4, 1)
    images = torch.randn(2, 3, 37, 50)
    for crop, stride in [((16, 16), (11, 13)), ((40, 64), (20, 20)), ((37, 50), (37, 50))]:
        torch.testing.assert_close(slide_inference(model, images, 4, crop, stride),
                                   model(images), rtol=1e-5, atol=1e-5)


def test_slide_windows_cover_every_pixel_and_stay_inside():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[2:]))
            return x[:, :1].repeat(1, 2, 1, 1)

    images = torch.ones(1, 3, 30, 41)
    logits = slide_inference(Recorder(), images, 2, (16, 16), (10, 10))
    assert set(seen) == {(16, 16)} and torch.equal(logits, torch.ones(1, 2, 30, 41))


def test_classification_meter_counts_images_and_topk():
    task = Classification(4)
    meter = task.meter(torch.device("cpu"))
    logits = torch.tensor([[4.0, 3, 2, 1], [1, 4, 3, 2], [1, 2, 3, 4]])
    meter.update(logits, torch.tensor([0, 2, 1]))
    result = meter.summarize(meter.sums())
    assert result["samples"] == 3 and result["top1"] == pytest.approx(1 / 3)
    assert result["top5"] == 1.0


def _batches(rank: int, world: int):
    """Segmentation batches of different sizes, sharded as the val loaders shard: image i on
    rank i % world."""
    generator = torch.Generator().manual_seed(0)
    for i in range(5):
        h, w = 6 + i, 9 - i
        images = torch.randn(1, 3, h, w, generator=generator)
        target = torch.randint(0, 3, (1, h, w), generator=generator)
        target[:, 0, :2] = 255
        if i % world == rank:
            yield images, target


def _evaluate_shard(rank: int, world: int, store: str, out: dict) -> None:
    # a file rendezvous: no port to pick
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(1)
        model = nn.Conv2d(3, 3, 1)
        result = evaluate(model, _batches(rank, world), Segmentation(CLASSES),
                          torch.device("cpu"))
        out[rank] = result
    finally:
        dist.destroy_process_group()


def test_two_rank_evaluation_counts_every_pixel_once(tmp_path):
    torch.manual_seed(1)
    model = nn.Conv2d(3, 3, 1)
    single = evaluate(model, _batches(0, 1), Segmentation(CLASSES), torch.device("cpu"))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_evaluate_shard, args=(2, str(tmp_path / "store"), out), nprocs=2)
        ranks = dict(out)
    for result in ranks.values():
        assert result["samples"] == single["samples"] == 5
        for key in ("miou", "pixel_acc", "loss", *(f"iou/{c}" for c in CLASSES)):
            assert result[key] == pytest.approx(single[key], rel=1e-9), key

