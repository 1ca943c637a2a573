"""Learning-rate schedules and parameter groups."""
import math

import pytest
from torch import nn

from pipeline.engine.optim import lr_factor, param_groups

pytestmark = pytest.mark.unit


def schedule(name, **kw):
    args = dict(epochs=10, warmup_epochs=0, warmup_start=0.0, milestones=[], step_size=3,
                gamma=0.1, power=0.9, min_ratio=0.0)
    args.update(kw)
    return lr_factor(name, **args)


def test_warmup_is_linear_then_hands_over():
    f = schedule("constant", warmup_epochs=2, warmup_start=0.1)
    assert f(0) == pytest.approx(0.1) and f(1) == pytest.approx(0.55) and f(2) == 1.0


def test_cosine_poly_step_multistep():
    cos = schedule("cosine", warmup_epochs=2)
    assert cos(2) == pytest.approx(1.0) and cos(6) == pytest.approx(0.5) and cos(10) == 0
    assert schedule("poly")(5) == pytest.approx(0.5 ** 0.9)
    assert schedule("step")(2.9) == 1 and schedule("step")(3) == pytest.approx(0.1)
    multi = schedule("multistep", milestones=[3, 6])
    assert [multi(e) for e in (2.99, 3, 6)] == pytest.approx([1, 0.1, 0.01])
    assert schedule("cosine", min_ratio=0.01)(10) == pytest.approx(0.01)
    assert not math.isnan(schedule("cosine", warmup_epochs=10)(10))


def test_param_groups_no_decay_and_method_overrides():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    special = {"params": [model[2].weight], "weight_decay": 1e-5}
    groups = param_groups(model, 1e-4, True, [special])
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    assert by_decay[1e-4] == {id(model[0].weight)}
    assert by_decay[0.0] == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                             id(model[2].bias)}
    assert by_decay[1e-5] == {id(model[2].weight)}
    model[0].weight.requires_grad_(False)
    assert all(p is not model[0].weight for g in param_groups(model, 1e-4, False, [])
               for p in g["params"])


def test_lr_mult_splits_groups_by_the_longest_name_prefix():
    from pipeline.engine.optim import build_optimizer

    model = nn.ModuleDict({"backbone": nn.Linear(2, 2), "head": nn.Linear(2, 2),
                           "heads": nn.Linear(2, 2)})
    groups = param_groups(model, 1e-4, False, [], {"head": 10.0, "head.bias": 5.0})
    optimizer = build_optimizer(groups, "sgd", 0.01, 0.9, False, [0.9, 0.999])
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr[id(model["head"].weight)] == pytest.approx(0.1)
    assert lr[id(model["head"].bias)] == pytest.approx(0.05)
    assert lr[id(model["heads"].weight)] == lr[id(model["backbone"].weight)] == 0.01
