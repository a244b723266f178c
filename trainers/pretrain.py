"""The pretraining stage: one entry point, one builder per method in an explicit table.

``pretrain(spec, workdir, sink)`` takes the resolved stage spec as a plain dict with sections
``dataset``, ``backbone`` and ``pretrain`` (see pipeline/spec.py for every field and its default),
trains, and writes ``checkpoints/final.pt`` holding the backbone (and head) weights.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from trainers import checkpoint
from trainers.augment import AugmentParams, augment
from trainers.backbones import build_backbone
from trainers.data import load_split
from trainers.heads import build_head
from trainers.loop import LoopConfig, StepFn, device, fit
from trainers.moco import Encoder, MoCo
from trainers.sink import Sink


def augment_params(aug: dict) -> AugmentParams:
    """The grid's ``augment`` section → AugmentParams. ``color_strength`` s is SimCLR's:
    ColorJitter(0.8s, 0.8s, 0.8s, 0.2s); MoCo v2's (0.4, 0.4, 0.4, 0.1) is s = 0.5. An explicit
    ``color_jitter: [b, c, s, h]`` (MoCo v1: 0.4 each) takes precedence."""
    s = aug["color_strength"]
    jitter = tuple(aug["color_jitter"]) if aug.get("color_jitter") else (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
    return AugmentParams(crop_scale=tuple(aug["crop_scale"]), jitter=jitter, jitter_p=aug["color_p"],
                         grayscale_p=aug["grayscale_p"], blur_p=aug["blur_p"] if aug["blur"] else 0.0,
                         flip_p=0.5 if aug["flip"] else 0.0)


def build_moco(backbone: nn.Module, p: dict, size: int) -> tuple[nn.Module, StepFn]:
    h = p["head"]
    head, dim = build_head(h["kind"], backbone.feat_dim, h["hidden_dim"], h["out_dim"], h.get("batchnorm", False))
    model = MoCo(Encoder(backbone, head), dim=dim, K=p["K"], m=p["m"], T=p["T"])
    aug = augment_params(p["augment"])

    def step(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        im_q, im_k = augment(x, aug, size, g), augment(x, aug, size, g)
        loss, logits = model(im_q, im_k, g)
        acc = (logits.argmax(1) == 0).float().mean()  # instance-discrimination top-1
        return loss, {"inst_acc": float(acc)}

    return model, step


# method name → builder(backbone, pretrain section, crop size) → (model, step function)
METHODS: dict[str, Callable[[nn.Module, dict, int], tuple[nn.Module, StepFn]]] = {
    "mocov1": build_moco,
    "mocov2": build_moco,
}
UNTRAINED = "none"
QUEUE_METHODS = ("mocov1", "mocov2")


def pretrain(spec: dict, workdir: Path, sink: Sink) -> dict:
    p = spec["pretrain"]
    torch.manual_seed(p["seed"])
    backbone = build_backbone(spec["backbone"])
    final = Path(workdir) / "checkpoints" / "final.pt"
    result: dict = {"checkpoint": str(final), "feat_dim": backbone.feat_dim, "epochs": p["epochs"]}
    if p["method"] == UNTRAINED:  # the random-init floor every method must clear
        checkpoint.atomic_save({"backbone": backbone.state_dict(), "method": UNTRAINED}, final)
        sink.progress(1, 1)
        return result
    data = load_split(spec["dataset"], "train")
    if p["method"] in QUEUE_METHODS and p["K"] >= len(data):
        # the queue would hold an older key of each query's own image, a false negative that gets
        # harder as the encoder learns: the loss then rises towards ln(K+1)
        raise ValueError(f"pretrain.K = {p['K']} must be below the number of training images ({len(data)})")
    dev = device()
    model, step = METHODS[p["method"]](backbone, p, spec["dataset"]["image_size"])
    model.to(dev)
    cfg = LoopConfig(epochs=p["epochs"], batch_size=p["batch_size"], lr=p["lr"], weight_decay=p["weight_decay"],
                     momentum=p["momentum"], schedule=p["schedule"], milestones=tuple(p["milestones"]),
                     warmup_epochs=p["warmup_epochs"], seed=p["seed"])
    history = fit(model, step, model.parameters(), data.images, data.labels, cfg,
                  Path(workdir) / "checkpoints" / "last.pt", sink)
    enc = model.encoder_q
    checkpoint.atomic_save({"backbone": enc.backbone.state_dict(), "head": enc.head.state_dict(),
                            "method": p["method"]}, final)
    result.update({k: v for k, v in history[-1].items() if k in ("loss", "inst_acc")})
    result["epochs_trained"] = len(history)
    return result


def load_backbone(spec: dict, ckpt: str | Path) -> nn.Module:
    """The pretrained backbone f of a pretraining stage, on CPU, in eval mode."""
    backbone = build_backbone(spec["backbone"])
    backbone.load_state_dict(checkpoint.load(ckpt)["backbone"])
    return backbone.eval()
