"""Instance discrimination with a memory bank (Wu et al. 2018, arXiv 1805.01978); model in
trainers/instdisc.py.

Recipe: zhirongw/lemniscate.pytorch main.py: dim 128, nce-k 4096, nce-t 0.07, nce-m 0.5, lr 0.03,
x0.1 at epochs 120 and 160; MoCo v1's augmentation. One view per image.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainers.methods.base import Context, HeadSpec, Method, Training, param
from trainers.methods.mocov1 import PRESET as MOCOV1_PRESET


@dataclass(frozen=True)
class Config:
    K: int = param(4096, min=1, doc="number of negatives: queue size (moco), bank draws (instdisc); simclr: 2B-2")
    T: float = param(0.07, min=1e-6, doc="softmax temperature")
    head: HeadSpec = HeadSpec(kind="linear")
    bank_m: float = param(0.5, min=0.0, max=1.0, doc="instdisc: memory-bank momentum")
    nce_loss: str = param("nce", choices=("nce", "softmax"), doc="instdisc: NCE or the softmax over 1+K")


def build(backbone, pretrain, ctx: Context) -> Training:
    """InstDisc over a bank of one 128-d vector per training image (ctx.n_data of them)."""
    from trainers.heads import build_encoder
    from trainers.instdisc import InstDisc
    from trainers.losses import top1

    c = pretrain.config
    encoder, dim = build_encoder(backbone, c.head)
    model = InstDisc(encoder, dim, ctx.n_data, K=c.K, T=c.T, bank_m=c.bank_m, loss=c.nce_loss)

    def step(net, views, y, idx, g, at):
        loss, logits = net(views[0], idx, g)
        return loss, {"inst_acc": top1(logits, 0)}

    return Training(model, step)


METHOD = Method(name="instdisc", title="InstDisc", source="zhirongw/lemniscate.pytorch main.py", config=Config,
                preset=MOCOV1_PRESET, build="trainers.methods.instdisc:build", views=1, negatives="bank",
                cost_units=3, head_prefix="encoder.head.")
