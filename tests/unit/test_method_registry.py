"""A method is one record plus one registry line (issue 12). This file is the proof: a tiny method,
written here and nowhere else, registered with one line (``monkeypatch.setitem``), that uses every
hook the loop offers (the step and epoch, a hook between backward and the optimizer step, gradient
clipping) and its own config field. It is planned, costed and trained through the same code as
the shipped methods."""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.methods.base import Method, Training, param

PROTOTYPES = 8
CLIP = 0.01
calls: dict[str, list] = {}


@dataclass(frozen=True)
class Config:
    warmup_freeze_epochs: int = param(1, min=0, doc="epochs whose prototype gradients are zeroed (SwAV's freezing)")


class Prototypes(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.prototypes = nn.Parameter(torch.randn(backbone.feat_dim, PROTOTYPES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=1) @ self.prototypes  # N×PROTOTYPES


def build(backbone, pretrain, ctx):
    model = Prototypes(backbone)
    freeze = pretrain.config.warmup_freeze_epochs

    def step(net, views, y, idx, g, at):
        calls["at"].append((at.step, at.epoch, at.steps_per_epoch, at.epochs))
        calls["params"].append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
        calls["prototypes"].append(model.prototypes.detach().clone())
        return F.cross_entropy(net(views[0]).float(), idx % PROTOTYPES), {}

    def after_backward(net, at):
        if at.epoch < freeze:
            net.prototypes.grad = None  # frozen: the optimizer leaves them alone
        for p in net.parameters():
            if p.grad is not None:
                p.grad.mul_(1e6)  # far above CLIP, so that only clipping keeps the step small

    return Training(model, step, after_backward=after_backward, clip_grad_norm=CLIP)


TINY = Method(name="tiny", title="Tiny prototypes", source="tests/unit/test_method_registry.py", config=Config,
              build=f"{__name__}:build", views=1, cost_units=3)


@pytest.fixture
def registered(monkeypatch):
    from trainers.methods import METHODS

    monkeypatch.setitem(METHODS, "tiny", TINY)  # the one registry line
    calls.clear()
    calls.update(at=[], params=[], prototypes=[])


def _config(**pretrain):
    from pipeline.spec import build_stage_config
    from tests.conftest import tiny_dataset

    problems: list = []
    cfg = build_stage_config({"dataset": tiny_dataset(32, 16), "backbone": {"name": "tiny_resnet"},
                              "pretrain": {"method": "tiny", "epochs": 2, "batch_size": 16, "lr": 0.1,
                                           "momentum": 0.0, "weight_decay": 0.0, "schedule": "constant",
                                           **pretrain}}, problems)
    assert not problems, [str(p) for p in problems]
    return cfg


def test_a_registered_method_is_validated_identified_and_costed(registered):
    from pipeline.spec import pretrain_identity
    from pipeline.stages import gpu_hours

    cfg = _config(warmup_freeze_epochs=2)
    assert cfg.pretrain.config == Config(warmup_freeze_epochs=2) and cfg.pretrain.warmup_freeze_epochs == 2
    ident = pretrain_identity(cfg.pretrain)
    assert ident["warmup_freeze_epochs"] == 2 and ident["method"] == "tiny" and "K" not in ident
    assert pretrain_identity(_config().pretrain) != ident  # its own field is in the identity
    assert gpu_hours("pretrain", cfg) > 0  # cost_units 3, from its record
    problems: list = []
    from pipeline.spec import build_stage_config

    build_stage_config({"pretrain": {"method": "tiny", "warmup_freeze_epochs": -1}}, problems)
    assert [str(p) for p in problems] == ["pretrain.warmup_freeze_epochs = -1: must be >= 0"]


def test_unregistered_it_is_refused_with_the_registered_names():
    from pipeline.spec import build_stage_config
    from trainers.methods import METHODS

    problems: list = []
    build_stage_config({"pretrain": {"method": "tiny"}}, problems)
    assert len(problems) == 1 and f"valid values: {', '.join(METHODS)}" in str(problems[0])


@pytest.mark.parametrize("fields, message", [
    (dict(build=None), "has fields and a cost but no build: it would run as random init"),
    (dict(build="trainers.methods.tiny"), "build = 'trainers.methods.tiny' must be \"module:function\""),
    (dict(cost_units=0), "needs cost_units > 0"),
    (dict(negatives="queue"), "has queue negatives, so its Config needs the field K"),
    (dict(views=3), "views must be 1 or 2"),
    (dict(preset={"warmup_freeze_epochs": 2}), "preset sets its own fields ['warmup_freeze_epochs']"),
])
def test_a_record_that_could_not_run_as_written_is_refused_naming_the_field(fields, message):
    import dataclasses

    with pytest.raises(ValueError, match=re.escape(f"trainers/methods/tiny.py: METHOD {message}")):
        dataclasses.replace(TINY, **fields)


def test_a_config_field_named_like_a_common_field_is_refused(monkeypatch):
    import dataclasses

    from pipeline.spec import build_stage_config
    from trainers.methods import METHODS

    Clash = dataclasses.make_dataclass("Clash", [("lr", float, dataclasses.field(default=0.5))], frozen=True)
    monkeypatch.setitem(METHODS, "tiny", dataclasses.replace(TINY, config=Clash))
    for method in ("tiny", "simclr"):  # a grid of another method would lose its lr to tiny's field
        with pytest.raises(TypeError, match=r"trainers/methods/tiny.py: Config fields \['lr'\] are common pretrain"):
            build_stage_config({"pretrain": {"method": method, "lr": 0.5}}, [])
    monkeypatch.setitem(METHODS, "tiny", dataclasses.replace(TINY, identity_common=("lrr", "seed")))
    with pytest.raises(TypeError, match=r"identity_common names \['lrr'\], which are not common pretrain fields"):
        build_stage_config({"pretrain": {"method": "simclr"}}, [])
    NoDefault = dataclasses.make_dataclass("NoDefault", [("K", int)], frozen=True)
    with pytest.raises(ValueError, match="config field K has no default"):
        dataclasses.replace(TINY, config=NoDefault)
    with pytest.raises(TypeError, match=r"config must be a dataclass class \(Config, not Config\(\)\)"):
        dataclasses.replace(TINY, config=Config())


def test_the_loop_passes_step_and_epoch_runs_the_hook_then_clips(registered, tmp_path):
    from trainers.pretrain import pretrain
    from trainers.sink import ListSink

    result = pretrain(_config(), tmp_path, ListSink())
    assert result.epochs_trained == 2
    # 32 images, batch 16: two steps per epoch, counted over the run
    assert calls["at"] == [(0, 0, 2, 2), (1, 0, 2, 2), (2, 1, 2, 2), (3, 1, 2, 2)]
    # after_backward ran before the optimizer step: epoch 0's prototypes did not move, epoch 1's did
    protos = calls["prototypes"]
    assert torch.equal(protos[0], protos[1]) and torch.equal(protos[1], protos[2])
    assert not torch.equal(protos[2], protos[3])
    # clipping ran after the hook: each SGD step (lr 0.1, no momentum) moves the weights by at
    # most lr x CLIP, though the hook made the gradients a million times larger
    params = calls["params"]
    moves = [float((b - a).norm()) for a, b in zip(params, params[1:])]
    assert all(0 < m <= 0.1 * CLIP * 1.001 for m in moves), moves
