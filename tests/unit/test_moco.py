"""MoCo's loss, queue and momentum update against naive per-sample references."""
from __future__ import annotations

import collections
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.backbones import SplitBatchNorm2d, TinyResNet
from trainers.heads import build_head
from trainers.losses import info_nce
from trainers.heads import Encoder
from trainers.moco import MoCo


def naive_info_nce(q, k, queue, T):
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / T)
        neg = sum(math.exp(float(q[i] @ queue[:, j]) / T) for j in range(queue.shape[1]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


def test_info_nce_matches_naive():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    k = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(8, 11, generator=g), dim=0)
    for T in (0.07, 0.2, 1.0):
        loss, logits = info_nce(q, k, queue, T)
        assert logits.shape == (5, 12)
        assert abs(float(loss) - naive_info_nce(q, k, queue, T)) < 1e-5


def tiny_moco(K: int, m: float = 0.99) -> MoCo:
    torch.manual_seed(0)
    backbone = TinyResNet(widths=(4, 8), bn_splits=2)
    head, dim = build_head("mlp", backbone.feat_dim, None, 6)
    return MoCo(Encoder(backbone, head), dim=dim, K=K, m=m, T=0.2)


def test_queue_is_fifo_with_wraparound():
    model = tiny_moco(K=7)
    ref = collections.deque((model.queue[:, j].clone() for j in range(7)), maxlen=7)
    g = torch.Generator().manual_seed(1)
    for n in (3, 3, 3, 5, 7, 9):  # batch sizes that do not divide K, one larger than K
        keys = F.normalize(torch.randn(n, 6, generator=g), dim=1)
        model._dequeue_and_enqueue(keys)
        for key in keys:
            ref.append(key)
        # the queue holds the newest K keys; as a set of columns it must equal the reference FIFO
        got = sorted(tuple(round(v, 5) for v in model.queue[:, j].tolist()) for j in range(7))
        want = sorted(tuple(round(v, 5) for v in key.tolist()) for key in ref)
        assert got == want


def test_forward_enqueues_keys_and_updates_key_encoder_by_momentum():
    model = tiny_moco(K=16, m=0.9)
    with torch.no_grad():  # make the encoders differ so the update is visible
        for p in model.encoder_q.parameters():
            p.add_(0.1)
    q_before = copy.deepcopy(model.encoder_q.state_dict())
    k_before = copy.deepcopy(model.encoder_k.state_dict())
    x = torch.randn(4, 3, 16, 16)
    loss, logits = model(x, x.flip(3), torch.Generator().manual_seed(0))
    assert logits.shape == (4, 17) and torch.isfinite(loss)
    for name, p in model.encoder_k.named_parameters():
        expected = 0.9 * k_before[name] + 0.1 * q_before[name]
        assert torch.allclose(p, expected, atol=1e-6), name
    assert int(model.queue_ptr) == 4
    assert not any(p.requires_grad for p in model.encoder_k.parameters())
    loss.backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())


def test_split_batchnorm_normalises_each_sub_batch():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    bn = SplitBatchNorm2d(3, num_splits=2)
    y = bn(x)
    plain = nn.BatchNorm2d(3)
    for j in range(2):  # sub-batch j holds samples j, j+2, j+4, ... (moco's CIFAR demo layout)
        assert torch.allclose(y[j::2], plain(x[j::2]), atol=1e-5)
    bn.eval()
    assert torch.allclose(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False), atol=1e-6)
