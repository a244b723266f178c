"""The ``detection`` evaluation stage: fine-tune a Faster R-CNN whose backbone is the pretrained one,
on PASCAL VOC (or the synthetic set in VOC layout), and report COCO-style AP, AP50 and AP75.

Model: torchvision's FasterRCNN in MoCo's R50-C4 arrangement (moco/detection/configs, after
detectron2's C4): the backbone up to its last stage (res2–res4) gives one stride-16 feature map
(stride 4 for the CIFAR-style tiny ResNet) to the RPN and to RoIAlign (``roi_size``, 14×14 as in
detectron2's C4; smaller sides make CPU runs affordable, see the quickstart grid); the last stage
(res5) is the box head, applied to each RoI and average-pooled; a linear classifier and box
regressor follow. All of res2–res5 starts from the pretraining checkpoint. We chose C4 over FPN
because it is what MoCo and the paper's detection numbers use.

BatchNorm (``norm``): ``train`` updates BN like MoCo's SyncBN does (one process here, so plain BN);
``frozen`` replaces every BN by torchvision's FrozenBatchNorm2d with the checkpoint's statistics.

Schedule: SGD, linear warm-up, ×0.1 at ``steps``; defaults follow MoCo's VOC recipe (24k
iterations, steps at 18k/22k, base lr 0.02, batch 16, shorter side drawn from 480–800 in steps of
32 for each training image and 800 at test time; torchvision's transform draws from ``min_size``
in training and uses its last entry in eval). Horizontal flip is the only other training
augmentation. Boxes marked ``difficult`` are left out of training (as detectron2's VOC
loader does) and ignored by the metric (passed to it as ``iscrowd``).

Metric: torchmetrics' MeanAveragePrecision on the pycocotools backend (never hand-written):
``det_AP`` (IoU 0.5:0.95), ``det_AP50``, ``det_AP75``, in percent.

Each iteration's randomness (batch, flip, the RPN's and RoI head's sampling) is seeded by
(seed, iteration), and a checkpoint (model, optimizer, iteration) is written by write-then-rename
every ``ckpt_every`` iterations, so a killed stage resumes where it was.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from evaluators.voc import VocItem, VocWarning, load_image, read_train_test, write_synthetic_voc
from trainers import checkpoint
from trainers.augment import IMAGENET_MEAN, IMAGENET_STD
from trainers.backbones import build_backbone
from trainers.data import cache_dir
from trainers.files import StageDir
from trainers.loop import autocast, device, resolve_precision
from trainers.results import EvalResult, PretrainResult
from trainers.sink import Sink

if TYPE_CHECKING:
    from pipeline.spec import BackboneSpec, DetectionSpec, StageConfig


class _Trunk(nn.Module):
    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        self.body, self.out_channels = body, out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Res5Head(nn.Module):
    """RoI features R×C4×14×14 → res5 → average pool → R×C5."""

    def __init__(self, res5: nn.Module):
        super().__init__()
        self.res5 = res5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.res5(x), 1).flatten(1)


def freeze_bn(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d (split BN included) → FrozenBatchNorm2d holding its weights and statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for k in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, k).copy_(getattr(child, k).detach())
            setattr(module, name, frozen)
        else:
            freeze_bn(child)
    return module


def build_detector(bb: BackboneSpec, ckpt: str | Path, num_classes: int, det: DetectionSpec) -> FasterRCNN:
    """The C4 Faster R-CNN (module docstring) for ``num_classes`` foreground classes, its res2–res5
    loaded from the pretraining checkpoint ``ckpt``; it takes a list of 3×H×W float images in
    [0, 1]. Raises FileNotFoundError for a missing checkpoint."""
    # split BN only emulates shuffle-BN in pretraining
    backbone = build_backbone(dataclasses.replace(bb, bn_splits=1))
    backbone.load_state_dict(checkpoint.load(ckpt)["backbone"])
    body, res5, c4, c5 = backbone.c4_split()
    if det.norm == "frozen":
        body, res5 = freeze_bn(body), freeze_bn(res5)
    anchors = AnchorGenerator(sizes=(tuple(det.anchor_sizes),), aspect_ratios=((0.5, 1.0, 2.0),))
    return FasterRCNN(_Trunk(body, c4), rpn_anchor_generator=anchors,
                      box_roi_pool=MultiScaleRoIAlign(["0"], output_size=det.roi_size, sampling_ratio=0),
                      box_head=_Res5Head(res5), box_predictor=FastRCNNPredictor(c5, num_classes + 1),
                      min_size=det.min_size, max_size=det.max_size, image_mean=list(IMAGENET_MEAN),
                      image_std=list(IMAGENET_STD), box_batch_size_per_image=det.rois_per_image,
                      rpn_pre_nms_top_n_train=det.proposals_train, rpn_post_nms_top_n_train=det.proposals_train,
                      rpn_pre_nms_top_n_test=det.proposals_test, rpn_post_nms_top_n_test=det.proposals_test)


def voc_root(det: DetectionSpec) -> Path:
    """``voc_root`` when set; else the synthetic set, written once into the cache (evaluators/voc.py)."""
    if det.voc_root:
        return Path(det.voc_root)
    s = det.synthetic
    root = cache_dir() / f"synthetic-voc0712-{s.trainval}-{s.test}-{s.size}-{s.seed}"
    return write_synthetic_voc(root, s.trainval, s.test, s.size, s.seed)


def _target(item: VocItem, keep_difficult: bool) -> dict[str, torch.Tensor]:
    keep = torch.ones_like(item.difficult) if keep_difficult else ~item.difficult
    return {"boxes": item.boxes[keep], "labels": item.labels[keep] + 1}  # 0 is background


def lr_at(it: int, det: DetectionSpec) -> float:
    """The learning rate of iteration ``it`` (0-based): linear warm-up over ``warmup_iters``, then
    ×0.1 at each of ``steps``."""
    warm = min(1.0, (it + 1) / det.warmup_iters) if det.warmup_iters else 1.0
    return det.lr * warm * 0.1 ** sum(it >= s for s in det.steps)


@torch.no_grad()
def evaluate(model: FasterRCNN, items: list[VocItem], batch: int = 8) -> dict[str, float]:
    from torchmetrics.detection import MeanAveragePrecision

    dev = next(model.parameters()).device
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    model.eval()
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        preds = model([load_image(it.image).to(dev).float().div_(255) for it in chunk])
        metric.update([{k: v.cpu() for k, v in pr.items()} for pr in preds],
                      [{**_target(it, keep_difficult=True), "iscrowd": it.difficult.long()} for it in chunk])
    out = metric.compute()
    return {"det_AP": 100 * float(out["map"]), "det_AP50": 100 * float(out["map_50"]),
            "det_AP75": 100 * float(out["map_75"])}


def detection(cfg: StageConfig, upstream: PretrainResult, workdir: Path, sink: Sink) -> EvalResult:
    """Reads ``cfg.backbone`` and ``cfg.detection``; ``upstream``: the pretraining stage's result
    (its ``checkpoint``). Its result's metrics: ``det_AP``, ``det_AP50``, ``det_AP75`` (percent), ``iterations``,
    ``classes`` and ``test_images``. Raises VocError (evaluators/voc.py) listing every unreadable file
    and, unless ``invalid_boxes: drop``, every invalid box of the training and test sets, before any
    training; FloatingPointError for a loss that is not finite."""
    p = cfg.detection
    root = voc_root(p)
    # every box is checked here, before the model is built: an invalid one raises VocError naming its
    # file (or, with invalid_boxes: drop, is left out with a warning), not an assertion hours in
    with warnings.catch_warnings(record=True) as caught:  # the dropped boxes, for the stage's sink
        warnings.simplefilter("always", VocWarning)
        classes, train, test = read_train_test(root, p.train_sets, p.test_set, p.invalid_boxes)
    for w in caught:
        if issubclass(w.category, VocWarning):
            sink.warn(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    dev = device()
    torch.manual_seed(p.seed)  # the RPN and box predictor start from random weights
    model = build_detector(cfg.backbone, upstream.checkpoint, len(classes), p).to(dev)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    precision = resolve_precision(p.precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    ckpt = StageDir(workdir).last
    start = 0
    state = checkpoint.load_resume(ckpt, sink.warn)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["iteration"] + 1
        sink.log({"resumed_from_iteration": float(start)}, step=start)
    sink.progress(start, p.iterations)
    model.train()
    running = 0.0
    for it in range(start, p.iterations):
        torch.manual_seed(p.seed * 1_000_003 + it)  # batch, flips, RPN and RoI sampling
        for group in opt.param_groups:
            group["lr"] = lr_at(it, p)
        images, targets = [], []
        for j in torch.randint(len(train), (p.batch_size,)).tolist():
            img, tgt = load_image(train[j].image).float().div_(255), _target(train[j], keep_difficult=False)
            if torch.rand(()) < 0.5:
                img = img.flip(-1)
                w = img.shape[-1]
                tgt["boxes"] = torch.stack([w - tgt["boxes"][:, 2], tgt["boxes"][:, 1], w - tgt["boxes"][:, 0],
                                            tgt["boxes"][:, 3]], 1)
            images.append(img.to(dev))
            targets.append({k: v.to(dev) for k, v in tgt.items()})
        with autocast(dev, precision):  # torchvision's detection heads support autocast
            losses = model(images, targets)
        loss = sum(v.float() for v in losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"detection loss is {float(loss)} at iteration {it}: lower detection.lr")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        running += float(loss.detach())
        done = it + 1
        if done % p.log_every == 0 or done == p.iterations:
            sink.log({"det_loss": running / (done - start if done - start < p.log_every else p.log_every),
                      "det_lr": lr_at(it, p), **{f"det_{k}": float(v.detach()) for k, v in losses.items()}}, step=done)
            running = 0.0
        if done % p.ckpt_every == 0 or done == p.iterations:
            checkpoint.atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": it},
                                   ckpt, keep_previous=True)
            sink.progress(done, p.iterations)
    metrics = evaluate(model, test)
    sink.log(metrics, step=p.iterations)
    return EvalResult.of({**metrics, "iterations": p.iterations, "classes": len(classes), "test_images": len(test)})
