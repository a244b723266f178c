"""SimCLR (Chen et al. 2020, arXiv 2002.05709); model in trainers/simclr.py.

Recipe: google-research/simclr@be133b3 run.py (ImageNet): T 0.1, lr 0.3 x B/256, wd 1e-6, 10 warmup
epochs then cosine, a head with BN, crop 0.08-1, colour strength 1, blur p 0.5, LARS (eta 1e-3) with
BN and biases excluded. Negatives: the other 2B − 2 views of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainers.methods.base import Context, HeadSpec, Method, Training, param


@dataclass(frozen=True)
class Config:
    T: float = param(0.1, min=1e-6, doc="softmax temperature")
    head: HeadSpec = HeadSpec(kind="mlp", batchnorm=True)


PRESET = {"lr": 0.3, "weight_decay": 1e-6, "warmup_epochs": 10, "schedule": "cosine", "optimizer": "lars",
          "exclude_bias_norm": True, "lr_scaling": "linear",
          "augment": {"crop_scale": (0.08, 1.0), "color_strength": 1.0}}


def build(backbone, pretrain, ctx: Context) -> Training:
    """NT-Xent over the global batch; the step reports the top-1 of each view's positive."""
    import torch

    from trainers import distributed as D
    from trainers.heads import build_encoder
    from trainers.losses import top1
    from trainers.simclr import SimCLR

    encoder, _ = build_encoder(backbone, pretrain.config.head)
    model = SimCLR(encoder, T=pretrain.config.T)

    def step(net, views, y, idx, g, at):
        loss, logits = net(views[0], views[1])
        n, big_n = logits.shape[0] // 2, logits.shape[1] // 2
        w = D.world()
        rows = torch.arange(n, device=logits.device) * w.size + w.rank
        return loss, {"inst_acc": top1(logits, torch.cat([rows + big_n, rows]))}

    return Training(model, step)


METHOD = Method(name="simclr", title="SimCLR", source="google-research/simclr@be133b3 run.py", config=Config,
                preset=PRESET, build="trainers.methods.simclr:build", negatives="batch", cost_units=6,
                head_prefix="encoder.head.")
