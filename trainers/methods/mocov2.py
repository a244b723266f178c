"""MoCo v2 (Chen et al. 2020, arXiv 2003.04297): the paper's baseline and the spec's defaults.

Recipe: facebookresearch/moco@7397dfe main_moco.py with ``--mlp --moco-t 0.2 --aug-plus --cos``
(K 65536, m 0.999, T 0.2, lr 0.03, batch 256, cosine schedule); the model is trainers/moco.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainers.methods.base import Context, HeadSpec, Method, NegativesSpec, Training, param


@dataclass(frozen=True)
class Config:
    K: int = param(65536, min=1, doc="number of negatives: queue size (moco), bank draws (instdisc); simclr: 2B-2")
    m: float = param(0.999, min=0.0, max=1.0, doc="key-encoder momentum")
    T: float = param(0.2, min=1e-6, doc="softmax temperature")
    head: HeadSpec = HeadSpec()
    negatives: NegativesSpec = NegativesSpec()


def build(backbone, pretrain, ctx: Context) -> Training:
    """MoCo on ``backbone`` with the spec's head, queue of K keys, momentum m and temperature T;
    the step reports instance-discrimination top-1 (the positive is logit 0)."""
    from trainers.heads import build_encoder
    from trainers.losses import top1
    from trainers.moco import MoCo

    c = pretrain.config
    encoder, dim = build_encoder(backbone, c.head)
    neg = c.negatives
    hard = (neg.shape, neg.loc, neg.scale) if neg.sampling == "hard" else None
    model = MoCo(encoder, dim=dim, K=c.K, m=c.m, T=c.T, hard=hard)

    def step(net, views, y, idx, g, at):
        loss, logits = net(views[0], views[1], g)
        return loss, {"inst_acc": top1(logits, 0)}

    return Training(model, step)


METHOD = Method(name="mocov2", title="MoCo v2", source="facebookresearch/moco@7397dfe main_moco.py --mlp --aug-plus --cos",
                config=Config, build="trainers.methods.mocov2:build", negatives="queue", cost_units=4,
                head_prefix="encoder_q.head.", shuffle_bn=True)
