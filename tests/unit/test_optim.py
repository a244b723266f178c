"""LARS against a hand-written per-tensor reference (google-research/simclr lars_optimizer.py), its
parameter groups, and a LARS pretraining resumed from its checkpoint."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from trainers import checkpoint
from trainers.optim import LARS, build_optimizer
from trainers.pretrain import pretrain
from trainers.sink import ListSink
from tests.conftest import tiny_config
from tests.unit.test_loop import Crash, CrashingSink


def naive_lars(params, grads, bufs, excluded, lr, m, wd, eta):
    """SimCLR's apply_gradients, one tensor at a time, in Python floats where it can."""
    out_p, out_b = [], []
    for w, g, v, ex in zip(params, grads, bufs, excluded):
        d = g.clone() if ex else g + wd * w
        trust = 1.0
        if not ex:
            wn, dn = math.sqrt(float((w * w).sum())), math.sqrt(float((d * d).sum()))
            trust = eta * wn / dn if wn > 0 and dn > 0 else 1.0
        v = m * v + lr * trust * d
        out_p.append(w - v)
        out_b.append(v)
    return out_p, out_b


def model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 5))
    with torch.no_grad():
        net[1].bias.zero_()  # a zero-norm tensor: its trust ratio must fall back to 1
    return net


@pytest.mark.parametrize("exclude", [False, True])
def test_lars_matches_naive_reference(exclude):
    net = model()
    params = list(net.parameters())
    excluded = [exclude and p.ndim <= 1 for p in params]
    opt = build_optimizer(params, "lars", lr=0.5, momentum=0.9, weight_decay=1e-2, exclude_bias_norm=exclude,
                          lars_eta=1e-3)
    assert isinstance(opt, LARS)
    ref_p = [p.detach().clone() for p in params]
    ref_b = [torch.zeros_like(p) for p in params]
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    for step, lr in enumerate([0.5, 0.25, 0.1]):  # the lr changes between steps, as a schedule does
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        grads = [p.grad.detach().clone() for p in params]
        ref_p, ref_b = naive_lars(ref_p, grads, ref_b, excluded, lr, 0.9, 1e-2, 1e-3)
        opt.step()
        for p, r in zip(params, ref_p):
            torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-7)
        # the reference state follows the real model's so that gradients stay comparable
        ref_p = [p.detach().clone() for p in params]
    assert any(e for e in excluded) == exclude


def test_trust_ratio_sets_the_step_size_relative_to_the_weight():
    w = nn.Parameter(torch.full((10,), 2.0))
    opt = LARS([w], lr=1.0, momentum=0.0, weight_decay=0.0, eta=1e-3)
    w.grad = torch.full((10,), 1000.0)  # a huge gradient: LARS's step is still eta * |w|
    opt.step()
    assert float((w.detach() - 2.0).norm()) == pytest.approx(1e-3 * 2.0 * math.sqrt(10), rel=1e-4)  # float32 w


def test_exclusion_groups_for_sgd_and_lars():
    net = model()
    sgd = build_optimizer(net.parameters(), "sgd", 0.1, 0.9, 1e-4, exclude_bias_norm=True)
    assert isinstance(sgd, torch.optim.SGD)
    decayed, free = sgd.param_groups
    assert decayed["weight_decay"] == 1e-4 and free["weight_decay"] == 0.0
    assert [p.ndim for p in decayed["params"]] == [4, 2]  # conv and fc weights
    assert sorted(p.ndim for p in free["params"]) == [1, 1, 1]  # BN weight and bias, fc bias
    plain = build_optimizer(net.parameters(), "sgd", 0.1, 0.9, 1e-4)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 1e-4
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        build_optimizer(net.parameters(), "adam", 0.1, 0.9, 1e-4)


def test_linear_lr_scaling():
    from pipeline.spec import PretrainSpec

    assert PretrainSpec(lr=0.3, batch_size=4096, lr_scaling="linear").base_lr() == pytest.approx(4.8)  # SimCLR
    assert PretrainSpec(lr=0.03, batch_size=4096, lr_scaling="none").base_lr() == 0.03


def test_lars_pretraining_resumes_exactly(tmp_path):
    spec = tiny_config(preset=False, method="simclr", epochs=3, optimizer="lars", exclude_bias_norm=True, lr_scaling="linear",
                       lr=1.0, weight_decay=1e-6, schedule="constant", head={"kind": "mlp", "batchnorm": True})
    full = ListSink()
    pretrain(spec, tmp_path / "full", full)
    assert full.series("lr") == [pytest.approx(1.0 * 16 / 256)] * 3  # lr x B/256
    with pytest.raises(Crash):
        pretrain(spec, tmp_path / "part", CrashingSink(after=1))
    state = checkpoint.load(tmp_path / "part" / "checkpoints" / "last.pt")["optimizer"]
    assert all("momentum_buffer" in s for s in state["state"].values())
    resumed = ListSink()
    pretrain(spec, tmp_path / "part", resumed)
    assert resumed.series("loss") == full.series("loss")  # epoch 0's saved point again, then epochs 1 and 2
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "final.pt")["backbone"]
    b = checkpoint.load(tmp_path / "part" / "checkpoints" / "final.pt")["backbone"]
    assert all(torch.equal(a[k], b[k]) for k in a)
