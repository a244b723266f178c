"""GPU-hour estimate of a stage, for ``sslgrid plan``.

One measured anchor: facebookresearch/moco's README gives 53 hours on 8 V100 GPUs for a 200-epoch
ResNet-50 pretraining on ImageNet-1k (1,281,167 images, 224 px): 424 GPU-hours, so 5.96 ms per
image per epoch. Everything else scales from it by assumption, not measurement:

- passes per image, a backward counted as two forwards: MoCo's query fwd+bwd plus key fwd = 4
  units (the anchor); each method's record gives its own (trainers/methods/: SimCLR two fwd+bwd = 6;
  BYOL two online fwd+bwd plus two target fwd = 8; InstDisc and supervised one fwd+bwd = 3); a linear probe one frozen forward = 1 per image per
  epoch (``moco`` protocol), or one pass over train and val (``cached``);
- compute per forward: multiply-accumulates of the backbone relative to ResNet-50 at 224 px
  (4.1 G), times (image_size/224)^2, times 16 for a torchvision ResNet with the CIFAR stem (no
  stride-4 stem). tiny_resnet at 32 px is 0.064 GMAC (counted by hand from trainers/backbones.py);
- kNN: one frozen forward over train and val; t-SNE: one forward per sample and view (3 views);
- detection, from a second anchor: detectron2's MODEL_ZOO.md gives 0.551 s/iteration on 8 V100s for
  R50-C4 (batch 16, COCO at short side 800, 512 RoIs of 14x14 per image), i.e. 0.2755 GPU-seconds
  per image. It scales with the backbone's MACs and with (largest min_size / 800)^2; the RoI head's
  share is taken as fixed (not scaled with rois_per_image or roi_size).

Inversion has no estimate (its U-Net's cost is not modelled).
"""
from __future__ import annotations

from typing import Any

from trainers.methods import METHODS

MS_PER_IMAGE_EPOCH_MOCO_R50 = 53 * 8 * 3600 * 1000 / (200 * 1_281_167)
ANCHOR_UNITS = 4  # the anchor's passes per image: MoCo's query fwd+bwd plus key fwd
GPU_S_PER_DET_IMAGE_R50_C4 = 0.551 * 8 / 16  # detectron2 MODEL_ZOO.md, faster_rcnn_R_50_C4_1x
GMAC_224 = {"resnet50": 4.1, "resnet18": 1.8, "tiny_resnet": 0.064 * (224 / 32) ** 2}
from pipeline.spec import TRAIN_IMAGES  # the train splits' sizes, shared with the K check


def train_images(ds: Any) -> int | None:
    """Training images of the DatasetSpec ``ds``, or None when unknown (set ``size_hint``)."""
    if ds.name == "synthetic":
        return ds.num_train
    return ds.max_train or ds.size_hint or TRAIN_IMAGES.get(ds.name)


def _ms_per_unit(cfg: Any) -> float:
    bb, ds = cfg.backbone, cfg.dataset
    gmac = GMAC_224[bb.name] * (ds.image_size / 224) ** 2
    if bb.name != "tiny_resnet" and bb.cifar_stem:
        gmac *= 16
    return MS_PER_IMAGE_EPOCH_MOCO_R50 / ANCHOR_UNITS * gmac / GMAC_224["resnet50"]


def _hours(units: float, cfg: Any) -> float:
    return units * _ms_per_unit(cfg) / 3.6e6


def pretrain_hours(cfg: Any) -> float | None:
    """The method's ``cost_units`` (trainers/methods/) per image and epoch."""
    n = train_images(cfg.dataset)
    p = cfg.pretrain
    return None if n is None else _hours(METHODS[p.method].cost_units * p.epochs * n, cfg)


def probe_hours(cfg: Any) -> float | None:
    """One frozen forward per image and epoch (``moco`` protocol) or one pass (``cached``), + ~10% val."""
    n = train_images(cfg.dataset)
    p = cfg.linear_probe
    return None if n is None else _hours((p.epochs if p.mode == "moco" else 1) * n * 1.1, cfg)


def knn_hours(cfg: Any) -> float | None:
    """One frozen forward over train and val (~10%)."""
    n = train_images(cfg.dataset)
    return None if n is None else _hours(n * 1.1, cfg)


def tsne_hours(cfg: Any) -> float:
    """One forward per sample and view (3 views); needs no train-set size."""
    return _hours(3 * cfg.tsne.samples, cfg)


def detection_hours(cfg: Any) -> float:
    """detectron2's R50-C4 anchor, scaled by the backbone's MACs and (largest min_size / 800)^2."""
    d = cfg.detection
    gmac = GMAC_224[cfg.backbone.name] / GMAC_224["resnet50"]
    return d.iterations * d.batch_size * GPU_S_PER_DET_IMAGE_R50_C4 * gmac * (max(d.min_size) / 800) ** 2 / 3600
