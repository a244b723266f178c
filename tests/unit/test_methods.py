"""Every method's loss and state update against a naive reference, and each preset against its source."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.spec import PretrainSpec, Problem, build_stage_config
from trainers.methods import METHODS
from trainers.byol import BYOL
from trainers.instdisc import InstDisc
from trainers.losses import byol_loss, byol_tau, info_nce_selected, nce_memory_bank, nt_xent
from trainers.negatives import hard_negative_index, skewnorm_ranks


def rand_unit(*shape, dim=1, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=dim)


def test_nt_xent_matches_naive():
    z1, z2, T = rand_unit(4, 6, seed=1), rand_unit(4, 6, seed=2), 0.5
    z = torch.cat([z1, z2])
    total = 0.0
    for i in range(8):
        j = (i + 4) % 8
        denom = sum(math.exp(float(z[i] @ z[k]) / T) for k in range(8) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / T) / denom)
    loss, logits = nt_xent(z1, z2, T)
    assert abs(float(loss) - total / 8) < 1e-5 and logits.shape == (8, 8)


def test_info_nce_selected_matches_naive():
    q, k, queue = rand_unit(3, 5, seed=1), rand_unit(3, 5, seed=2), rand_unit(5, 7, dim=0, seed=3)
    index = torch.tensor([[0, 0, 6], [1, 2, 3], [6, 6, 6]])
    loss, _ = info_nce_selected(q, k, queue, index, 0.2)
    want = 0.0
    for n in range(3):
        pos = math.exp(float(q[n] @ k[n]) / 0.2)
        neg = sum(math.exp(float(q[n] @ queue[:, j]) / 0.2) for j in index[n].tolist())
        want += -math.log(pos / (pos + neg))
    assert abs(float(loss) - want / 3) < 1e-5


def test_nce_memory_bank_matches_naive():
    pos, neg = torch.tensor([0.9, 0.2]), torch.tensor([[0.1, -0.3, 0.5], [0.0, 0.4, 0.2]])
    T, Z, n_data = 0.07, 50.0, 100
    want = 0.0
    for i in range(2):
        p = math.exp(float(pos[i]) / T) / Z
        term = math.log(p / (p + 3 / n_data))
        for j in range(3):
            pn = math.exp(float(neg[i, j]) / T) / Z
            term += math.log((3 / n_data) / (pn + 3 / n_data))
        want += -term
    assert abs(float(nce_memory_bank(pos, neg, T, Z, n_data)) - want / 2) < 1e-4


def test_byol_loss_and_tau():
    p, z = rand_unit(4, 6, seed=1), rand_unit(4, 6, seed=2)
    want = sum(float(((p[i] - z[i]) ** 2).sum()) for i in range(4)) / 4  # = 2 - 2cos for unit vectors
    assert abs(float(byol_loss(p * 3, z * 2)) - want) < 1e-5
    assert byol_tau(0, 100, 0.996) == pytest.approx(0.996) and byol_tau(100, 100, 0.996) == pytest.approx(1.0)
    assert byol_tau(50, 100, 0.99) == pytest.approx(0.995)


def test_byol_target_is_an_ema_and_gets_no_gradient():
    torch.manual_seed(0)
    online, pred = nn.Linear(4, 3), nn.Linear(3, 3)
    model = BYOL(online, pred, tau_base=0.9, total_steps=10)
    with torch.no_grad():
        online.weight.add_(1.0)
    o, t = online.weight.clone(), model.target.weight.clone()
    loss = model(torch.randn(5, 4), torch.randn(5, 4))
    loss.backward()
    assert torch.allclose(model.target.weight, 0.9 * t + 0.1 * o, atol=1e-6)  # tau(step 0) = tau_base
    assert model.target.weight.grad is None and int(model.step) == 1


def test_instdisc_memory_update_and_negatives():
    torch.manual_seed(0)
    enc = nn.Linear(6, 4)
    model = InstDisc(enc, dim=4, n_data=10, K=5, T=0.1, bank_m=0.5, loss="softmax")
    idx = torch.tensor([2, 7])
    old = model.memory[idx].clone()
    x = torch.randn(2, 6)
    loss, logits = model(x, idx, torch.Generator().manual_seed(0))
    v = F.normalize(enc(x), dim=1).detach()
    assert logits.shape == (2, 6) and torch.isfinite(loss)
    assert torch.allclose(model.memory[idx], F.normalize(0.5 * old + 0.5 * v, dim=1), atol=1e-6)
    nce = InstDisc(enc, dim=4, n_data=10, K=5, loss="nce")
    nce(x, idx, torch.Generator().manual_seed(0))
    assert float(nce.Z) > 0  # estimated once, then kept


def test_skew_normal_ranks_skewed_with_easy_tail_and_count_K():
    K = 4096
    r = skewnorm_ranks(16, K, 4.0, 0.0, 0.4, torch.Generator().manual_seed(0)).float()
    assert r.shape == (16, K) and r.min() >= 0 and r.max() < K  # K negatives per query
    frac = r / K
    skew = float(((frac - frac.mean()) ** 3).mean() / frac.std() ** 3)
    assert 0.5 < skew < 1.2  # positive skew: mass at the hard end, a tail towards easy ranks
    assert 0.5 < float((frac < 1 / 3).float().mean()) < 0.7  # hard and semi-hard dominate
    assert 0.1 < float((frac >= 0.5).float().mean()) < 0.3  # easy ones remain
    assert float((frac < 0.01).float().mean()) < 0.05  # no pile-up on the single hardest key


def test_hard_negative_index_prefers_similar_keys():
    q, queue = rand_unit(8, 16, seed=1), rand_unit(16, 512, dim=0, seed=2)
    idx = hard_negative_index(q, queue, 4.0, 0.0, 0.4, torch.Generator().manual_seed(0))
    sims = q @ queue
    chosen = sims.gather(1, idx).mean()
    assert idx.shape == (8, 512) and chosen > sims.mean() + 0.05


def resolve(method: str, **extra) -> PretrainSpec:
    problems: list[Problem] = []
    raw = {"dataset": {"name": "imagefolder", "root": "/data/imagenet"}, "pretrain": {"method": method, **extra}}
    cfg = build_stage_config(raw, problems)
    assert not problems, problems
    return cfg.pretrain


def test_presets_match_reference_recipes():
    v2 = resolve("mocov2")  # facebookresearch/moco: --mlp --moco-t 0.2 --aug-plus --cos
    assert (v2.K, v2.m, v2.T, v2.lr, v2.weight_decay, v2.schedule, v2.head.kind) == (65536, 0.999, 0.2, 0.03, 1e-4, "cosine", "mlp")
    assert (v2.augment.crop_scale, v2.augment.color_strength, v2.augment.color_p, v2.augment.blur) == ((0.2, 1.0), 0.5, 0.8, True)
    v1 = resolve("mocov1")
    assert (v1.T, v1.head.kind, v1.schedule, v1.milestones, v1.augment.color_jitter, v1.augment.color_p) == \
        (0.07, "linear", "step", (120, 160), (0.4, 0.4, 0.4, 0.4), 1.0)
    ins = resolve("instdisc")  # lemniscate.pytorch
    assert (ins.K, ins.T, ins.bank_m, ins.head.out_dim, ins.milestones) == (4096, 0.07, 0.5, 128, (120, 160))
    sim = resolve("simclr")  # google-research/simclr
    assert (sim.T, sim.lr, sim.weight_decay, sim.warmup_epochs, sim.head.batchnorm, sim.augment.color_strength,
            sim.augment.crop_scale) == (0.1, 0.3, 1e-6, 10, True, 1.0, (0.08, 1.0))
    assert (sim.optimizer, sim.lars_eta, sim.exclude_bias_norm, sim.lr_scaling) == ("lars", 1e-3, True, "linear")
    byol = resolve("byol")  # deepmind-research/byol
    assert (byol.optimizer, byol.lars_eta, byol.exclude_bias_norm, byol.lr_scaling) == ("lars", 1e-3, True, "linear")
    a = byol.augment  # utils/augmentations.py: blur 1.0 / 0.1, solarize 0 / 0.2
    assert (a.blur_p, a.view2_blur_p, a.solarize_p, a.view2_solarize_p) == (1.0, 0.1, 0.0, 0.2)
    assert (v2.optimizer, v2.exclude_bias_norm, v2.lr_scaling) == ("sgd", False, "none")
    assert (byol.tau_base, byol.head.out_dim, byol.weight_decay, byol.augment.color_jitter) == (0.996, 256, 1.5e-6, (0.4, 0.4, 0.2, 0.1))
    assert resolve("simclr", T=0.5).T == 0.5  # grid values win over the preset
    assert set(METHODS) == set(PretrainSpec.__dataclass_fields__["method"].metadata["choices"])
