"""Weighted kNN (at one k and at several from one search), alignment and uniformity against naive
references; the kNN stage's extra k, its identity and its small-class warning; the online monitor."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evaluators.geometry import alignment, uniformity
from evaluators.knn import knn, small_class_warning
from pipeline.grid import load_grid
from pipeline.plan import build_plan
from pipeline.spec import to_dict
from pipeline.stages import STAGE_KINDS, KnnSpec
from tests.conftest import tiny_config
from trainers.neighbors import knn_accuracies, knn_predict, knn_predictions, knn_top1
from trainers.pretrain import pretrain
from trainers.sink import ListSink

QUICKSTART = Path(__file__).resolve().parents[2] / "grids" / "quickstart.yaml"


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


def _random_bank(seed, n=60, m=25, c=8, classes=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g), torch.randint(0, classes, (n,), generator=g),
            torch.randn(m, c, generator=g), torch.randint(0, classes, (m,), generator=g))


@pytest.mark.parametrize("T", [0.1, 0.5])
def test_knn_at_several_k_matches_naive_vote_at_each(T):
    bank, labels, queries, _ = _random_bank(int(T * 10))
    ks = (1, 3, 7, 20, 200)  # 200 > the 60 in the bank: votes with all of them
    got = knn_predictions(bank, labels, queries, 4, ks, T=T, chunk=7)
    assert list(got) == list(ks)
    for k in ks:
        assert torch.equal(got[k], naive_knn(bank, labels, queries, 4, min(k, 60), T)), k


def test_one_search_at_several_k_equals_one_search_per_k():
    bank, labels, queries, truth = _random_bank(3, n=200, m=50, classes=5)
    ks = (200, 20, 5, 1)
    many = knn_predictions(bank, labels, queries, 5, ks, T=0.1, chunk=16)
    for k in ks:
        assert torch.equal(many[k], knn_predict(bank, labels, queries, 5, k=k, T=0.1, chunk=16)), k
    acc = knn_accuracies(bank, labels, queries, truth, 5, ks, T=0.1)
    assert acc == {k: knn_top1(bank, labels, queries, truth, 5, k=k, T=0.1) for k in ks}
    assert all(0.0 <= v <= 100.0 for v in acc.values())  # percent


def test_default_more_k_keeps_every_knn_identity_and_another_value_changes_it():
    # the identity of a kNN stage before more_k existed held k and T only
    assert to_dict(KnnSpec(), identity_only=True) == {"k": 200, "T": 0.1}
    assert to_dict(KnnSpec(more_k=(20,)), identity_only=True) == {"k": 200, "T": 0.1}
    assert to_dict(KnnSpec(more_k=(5, 50)), identity_only=True) == {"k": 200, "T": 0.1, "more_k": [5, 50]}
    assert to_dict(KnnSpec(more_k=()), identity_only=True)["more_k"] == []

    def keys(overrides: list[str]) -> set[str]:
        return {f"{s.kind}/{s.key}" for s in build_plan(load_grid(QUICKSTART, overrides)).ordered()}

    pinned = set(json.loads((Path(__file__).parent / "identities.json").read_text())["quickstart"])
    assert keys([]) == keys(["knn.more_k=[20]"]) == pinned
    other = keys(["knn.more_k=[5]"])
    assert {k for k in other if not k.startswith("knn/")} == {k for k in pinned if not k.startswith("knn/")}
    assert not {k for k in other if k.startswith("knn/")} & pinned  # the kNN stages are new: they compute k 5


def test_report_and_plan_show_the_extra_k():
    record = STAGE_KINDS["knn"]
    assert record.reported[:2] == ("top1", "top1_k20")  # the headline (k 200) stays first
    cfg = tiny_config(method="none")
    assert record.summary(cfg) == "k=200 more_k=20 T=0.1"
    assert record.summary(dataclasses.replace(cfg, knn=KnnSpec(k=50, more_k=(5, 10)))) == "k=50 more_k=5,10 T=0.1"


def test_small_class_warning_names_the_k_the_class_size_and_the_metric_to_read():
    sizes, classes = torch.tensor([144, 150, 160]), ("cat", "dog", "owl")
    assert small_class_warning({"top1": 20, "top1_k5": 5}, sizes, classes) is None
    w = small_class_warning({"top1": 200, "top1_k20": 20, "top1_k5": 5}, sizes, classes)
    assert "k = 200 (top1)" in w and "144" in w and "'cat'" in w and "read top1_k20 (k = 20)" in w
    w = small_class_warning({"top1": 100, "top1_k500": 500}, sizes, classes)  # an extra k too large
    assert "k = 500 (top1_k500) exceeds the 144" in w and "read top1 (k = 100) instead" in w
    w = small_class_warning({"top1": 200, "top1_k150": 150}, sizes, classes)  # none fits
    assert "k = 200 (top1) and 150 (top1_k150) exceed the 144" in w and "knn.more_k to [20]" in w


def test_knn_stage_reports_each_k_and_warns_when_k_exceeds_the_smallest_class(tmp_path):
    cfg = tiny_config(method="none")  # random init: no training, the stage's own work is what is tested
    cfg = dataclasses.replace(cfg, knn=KnnSpec(more_k=(3, 20)))
    pre = pretrain(cfg, tmp_path / "pre", ListSink())
    sink = ListSink()
    result = knn(cfg, pre, tmp_path / "knn", sink)
    m = result.metrics
    assert m["k"] == 200 and result.info["more_k"] == [3, 20]
    assert all(0.0 <= m[name] <= 100.0 for name in ("top1", "top1_k3", "top1_k20"))
    assert {"top1", "top1_k3", "top1_k20", "align", "uniform"} <= set(sink.metrics[0][1])
    # top-1's resolution (issue 20): the 48 val images of tiny_config, logged and in the result
    assert m["val_images"] == 48 and sink.series("val_images") == [48.0]
    smallest = m["smallest_class"]
    assert 3 <= smallest < 20  # 96 synthetic images in a few classes: k 200 and 20 are too many
    [w] = sink.warnings
    assert f"k = 200 (top1) and 20 (top1_k20) exceed the {smallest} training images" in w
    assert "read top1_k3 (k = 3) instead" in w


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
