"""Weighted kNN, alignment and uniformity against naive references; the online monitor."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evaluators.geometry import alignment, uniformity
from tests.conftest import tiny_config
from trainers.neighbors import knn_predict
from trainers.pretrain import pretrain
from trainers.sink import ListSink


def naive_knn(bank, labels, queries, num_classes, k, T):
    out = []
    for q in queries:
        sims = [(float(F.cosine_similarity(q, b, dim=0)), int(y)) for b, y in zip(bank, labels)]
        sims.sort(key=lambda t: -t[0])
        votes = [0.0] * num_classes
        for s, y in sims[:k]:
            votes[y] += math.exp(s / T)
        out.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(out)


@pytest.mark.parametrize("k, T", [(1, 0.1), (5, 0.1), (20, 0.5), (500, 0.1)])
def test_knn_matches_naive_vote(k, T):
    g = torch.Generator().manual_seed(k)
    bank, queries = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    assert torch.equal(knn_predict(bank, labels, queries, 4, k=k, T=T, chunk=7),
                       naive_knn(bank, labels, queries, 4, min(k, 60), T))


def test_knn_of_clustered_data_is_right():
    centres = torch.eye(3) * 10
    bank = torch.cat([centres[c] + torch.randn(20, 3) for c in range(3)])
    labels = torch.arange(3).repeat_interleave(20)
    assert torch.equal(knn_predict(bank, labels, centres, 3, k=10), torch.arange(3))


def test_alignment_and_uniformity_match_naive():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(12, 5, generator=g), dim=1)
    b = F.normalize(torch.randn(12, 5, generator=g), dim=1)
    assert alignment(a, b) == pytest.approx(sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b)) / 12, rel=1e-5)
    pairs = [math.exp(-2 * float(((a[i] - a[j]) ** 2).sum())) for i in range(12) for j in range(i + 1, 12)]
    assert uniformity(a) == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-5)
    assert alignment(a, a) == 0.0  # identical views are perfectly aligned


def test_online_monitor_logs_knn_and_does_not_change_training(tmp_path):
    quiet, watched = ListSink(), ListSink()
    pretrain(tiny_config(epochs=3), tmp_path / "a", quiet)
    pretrain(tiny_config(epochs=3, knn_every=2), tmp_path / "b", watched)
    knn = [(step, m["knn_top1"]) for step, m in watched.metrics if "knn_top1" in m]
    assert [s for s, _ in knn] == [1, 2]  # every 2nd epoch, and after the last
    assert all(0.0 <= v <= 100.0 for _, v in knn)
    loss = lambda sink: [m["loss"] for _, m in sink.metrics if "loss" in m]  # noqa: E731
    assert loss(quiet) == loss(watched)
