"""Supervised training, the paper's Table 2 baseline: backbone + fc by cross-entropy on labels, with
the same augmentation knobs as the self-supervised methods.

Recipe: torchvision's ResNet reference (references/classification): lr 0.1, wd 1e-4, x0.1 every 30 epochs.
"""
from __future__ import annotations

from trainers.methods.base import Context, Method, Training

PRESET = {"lr": 0.1, "weight_decay": 1e-4, "schedule": "step", "milestones": (30, 60)}


def build(backbone, pretrain, ctx: Context) -> Training:
    """backbone + Linear(feat_dim, classes); the step reports the training top-1."""
    import torch.nn.functional as F

    from trainers.losses import full_precision, top1
    from trainers.supervised import Supervised

    model = Supervised(backbone, ctx.num_classes)

    def step(net, views, y, idx, g, at):
        logits = net(views[0])
        with full_precision():
            loss = F.cross_entropy(logits.float(), y)
        return loss, {"train_acc": top1(logits, y)}

    return Training(model, step)


METHOD = Method(name="supervised", title="Supervised", source="pytorch/vision references/classification",
                preset=PRESET, build="trainers.methods.supervised:build", views=1, cost_units=3)
