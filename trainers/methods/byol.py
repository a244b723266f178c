"""BYOL (Grill et al. 2020, arXiv 2006.07733); model in trainers/byol.py.

Recipe: deepmind-research/byol configs/byol.py: tau_base 0.996, projector to 256 with BN, lr 0.2 x B/256
(1000 epochs), wd 1.5e-6, 10 warmup epochs, cosine, LARS (eta 1e-3, momentum 0.9) with BN and biases
excluded; utils/augmentations.py: ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, blur p 1.0 / 0.1, solarize
p 0 / 0.2. Projector and predictor hidden widths are 4096 for a 2048-d ResNet-50, i.e. 2x the
feature width, the ratio kept for smaller backbones.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainers.methods.base import Context, HeadSpec, Method, Training, param


@dataclass(frozen=True)
class Config:
    tau_base: float = param(0.996, min=0.0, max=1.0, doc="byol: target EMA, rising from tau_base to 1")
    head: HeadSpec = HeadSpec(kind="mlp", batchnorm=True, out_dim=256)


PRESET = {"lr": 0.2, "weight_decay": 1.5e-6, "warmup_epochs": 10, "schedule": "cosine", "optimizer": "lars",
          "exclude_bias_norm": True, "lr_scaling": "linear",
          "augment": {"color_jitter": (0.4, 0.4, 0.2, 0.1), "crop_scale": (0.08, 1.0), "blur_p": 1.0,
                      "view2_blur_p": 0.1, "solarize_p": 0.0, "view2_solarize_p": 0.2}}
HIDDEN_SCALE = 2.0


def build(backbone, pretrain, ctx: Context) -> Training:
    """Online encoder + predictor against an EMA target whose tau rises to 1 over ctx.total_steps."""
    from trainers.byol import BYOL
    from trainers.heads import build_encoder, build_head

    c = pretrain.config
    hidden = int(HIDDEN_SCALE * backbone.feat_dim)
    online, dim = build_encoder(backbone, c.head, hidden=hidden)
    predictor, _ = build_head("mlp", dim, c.head.hidden_dim or hidden, dim, batchnorm=True)
    model = BYOL(online, predictor, tau_base=c.tau_base, total_steps=ctx.total_steps)

    def step(net, views, y, idx, g, at):
        return net(views[0], views[1]), {}

    return Training(model, step)


METHOD = Method(name="byol", title="BYOL", source="deepmind-research/byol configs/byol.py", config=Config,
                preset=PRESET, build="trainers.methods.byol:build", cost_units=8, head_prefix="online.head.",
                head_hidden_scale=HIDDEN_SCALE)
