"""One epoch of every pretraining method through `sslgrid run`, each followed by a linear probe and a
kNN stage (which also measures alignment and uniformity) and a t-SNE stage."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tests.integration.helpers import sslgrid, stage_runs, write_grid
from trainers.methods import METHODS

pytestmark = pytest.mark.integration

GRID = """
name: tiny
defaults:
  dataset: {name: synthetic, num_train: 192, num_val: 96}
  backbone: {name: tiny_resnet, bn_splits: 2}
  pretrain: {epochs: 1, batch_size: 32, K: 64, warmup_epochs: 0, head: {out_dim: 32}}
  linear_probe: {epochs: 2}
axes:
  pretrain.method: [{methods}]  # every method of the registry (trainers/methods/)
cells:
  - {name: mocov2-hard, pretrain.method: mocov2, pretrain.negatives.sampling: hard}
  - {name: instdisc-softmax, pretrain.method: instdisc, pretrain.nce_loss: softmax}
evaluations: [linear_probe, knn, tsne]
resources:
  pretrain: {cpus: 1}
"""


def test_every_method_runs_one_epoch(tmp_path):
    grid = write_grid(tmp_path, GRID.replace("{methods}", ", ".join(METHODS)))
    cells = len(METHODS) + 2
    plan = sslgrid(grid, tmp_path, sub="plan")
    assert plan.returncode == 0 and "K=2B-2=62" in plan.stdout and "hard-negatives" in plan.stdout
    out = sslgrid(grid, tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    runs = stage_runs(tmp_path)
    assert len(runs) == 4 * cells and all(r.info.status == "FINISHED" for r in runs)
    # a method's own fields are its params (pretrain.nce_loss for instdisc only)
    pre = {r.data.params["pretrain.method"] + r.data.params.get("pretrain.negatives.sampling", "all")
           + r.data.params.get("pretrain.nce_loss", "nce"): r
           for r in runs if r.data.tags["sslgrid.stage"] == "pretrain"}
    assert "pretrain.K" not in pre["simclrallnce"].data.params and "pretrain.nce_loss" in pre["instdiscallnce"].data.params
    for name, run in pre.items():
        if not name.startswith("none"):
            assert "loss" in run.data.metrics, name
    assert "train_acc" in pre["supervisedallnce"].data.metrics
    for method in ("simclr", "byol"):  # their presets train with LARS at lr x B/256
        params = pre[method + "allnce"].data.params
        assert (params["pretrain.optimizer"], params["pretrain.lr_scaling"]) == ("lars", "linear"), params
    knn = [r for r in runs if r.data.tags["sslgrid.stage"] == "knn"]
    assert len(knn) == cells
    for r in knn:
        m = r.data.metrics
        assert 0 <= m["top1"] <= 100 and 0 <= m["align"] <= 4 and m["uniform"] <= 0, m
    header = next(line for line in out.stdout.splitlines() if line.startswith("| cell"))
    assert "knn_top1" in header and "align" in header and "uniform" in header, header
    assert "tsne_silhouette_none" in header and "silhouette_strong" in header, header
    tsne = [r for r in runs if r.data.tags["sslgrid.stage"] == "tsne"]
    assert len(tsne) == cells and all("silhouette_strong" in r.data.metrics for r in tsne)
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "tsne.png" in [a.path for a in c.list_artifacts(tsne[0].info.run_id)]


DETECTION = """
name: tiny
defaults:
  dataset: {name: synthetic, num_train: 96, num_val: 48}
  backbone: {name: tiny_resnet}
  pretrain: {method: none, epochs: 1, batch_size: 32}
  detection:
    roi_size: 6
    iterations: 4
    batch_size: 2
    steps: [3]
    warmup_iters: 1
    min_size: 64
    max_size: 64
    anchor_sizes: [8, 16, 32]
    rois_per_image: 32
    proposals_train: 50
    proposals_test: 50
    synthetic: {trainval: 12, test: 6, size: 64}
axes:
  pretrain.method: [none, supervised]   # the two baselines the issue names
evaluations:
  linear_probe: [method=supervised]
  detection: all
"""


def test_detection_runs_as_a_stage(tmp_path):
    grid = write_grid(tmp_path, DETECTION)
    out = sslgrid(grid, tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    runs = stage_runs(tmp_path)
    kinds = sorted(r.data.tags["sslgrid.stage"] for r in runs)
    assert kinds == ["detection", "detection", "linear_probe", "pretrain", "pretrain"], kinds
    for r in runs:
        if r.data.tags["sslgrid.stage"] == "detection":
            det = r.data.metrics
            assert {"det_AP", "det_AP50", "det_AP75", "det_loss"} <= set(det) and 0 <= det["det_AP50"] <= 100
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| cell"))
    assert "detection_det_AP50" in header and "det_AP75" in header, header
    # the probe follows only the supervised cell; the random-init row says so instead of "pending"
    row = next(line for line in lines if line.startswith("| method=none"))
    probe = [c.strip() for c in header.split("|")].index("linear_probe_top1")
    assert row.split("|")[probe].strip() == "-", row


INVERSION = """
name: tiny
defaults:
  dataset: {name: synthetic, num_train: 96, num_val: 48}
  backbone: {name: tiny_resnet, bn_splits: 2}
  pretrain: {method: mocov2, epochs: 1, batch_size: 32, K: 64}
  inversion: {images: 2, iterations: 20}
axes:
  pretrain.head.kind: [mlp, none]
evaluations: [inversion]
"""


def test_inversion_stages_and_fig2_from_mlflow(tmp_path):
    from PIL import Image

    grid = write_grid(tmp_path, INVERSION)
    out = sslgrid(grid, tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    inv = [r for r in stage_runs(tmp_path) if r.data.tags["sslgrid.stage"] == "inversion"]
    assert len(inv) == 2
    for r in inv:
        m = r.data.metrics
        assert m["inv_loss_h_last"] < m["inv_loss_h_first"], m
    assert "Fig. 2: feature inversion" in out.stdout
    # four columns (original, h without head, h with MLP, z with MLP), two rows of 1.5-inch panels
    with Image.open(tmp_path / "runs" / "report" / "fig2.png") as im:
        assert im.size == (600, 300)
    for r in range(2):  # and one grid per image
        with Image.open(tmp_path / "runs" / "report" / f"fig2-image{r}.png") as im:
            assert im.size == (600, 150)
