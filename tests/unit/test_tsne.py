"""The t-SNE stage on a tiny random-init backbone: one PNG with three panels, three silhouettes."""
from __future__ import annotations

from dataclasses import replace

from PIL import Image

from tests.conftest import tiny_config
from trainers.pretrain import pretrain
from trainers.sink import ListSink


def test_tsne_writes_three_panels_and_logs_a_silhouette_per_condition(tmp_path):
    from evaluators.tsne import tsne

    cfg = tiny_config(method="none")
    pre = pretrain(cfg, tmp_path / "pre", ListSink())
    cfg = replace(cfg, tsne=replace(cfg.tsne, samples=40, perplexity=30.0, seed=0, dpi=50))
    sink = ListSink()
    result = tsne(cfg, pre, tmp_path / "tsne", sink)
    png = tmp_path / "tsne" / "tsne.png"
    with Image.open(png) as im:
        assert im.size == (3 * 4 * 50, 4 * 50)  # three 4-inch panels at 50 dpi
    assert result.metrics["samples"] == 40
    for name in ("none", "weak", "strong"):
        assert -1.0 <= result.metrics[f"silhouette_{name}"] <= 1.0
    (step, logged), = sink.metrics
    assert set(logged) == {"silhouette_none", "silhouette_weak", "silhouette_strong"}
    # the same spec and seed give the same numbers (the stage is cached by identity)
    again = tsne(cfg, pre, tmp_path / "tsne2", ListSink())
    assert again == result
