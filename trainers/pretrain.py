"""The pretraining stage: one entry point, one builder per method in an explicit table.

``pretrain(spec, workdir, sink)`` takes the resolved stage spec as a plain dict with sections
``dataset``, ``backbone`` and ``pretrain`` (see pipeline/spec.py for every field and its default),
trains, and writes ``checkpoints/final.pt`` holding the backbone (and head) weights.
"""
from __future__ import annotations

import dataclasses

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers import checkpoint
from trainers import distributed as D
from trainers import features
from trainers.augment import AugmentParams
from trainers.backbones import build_backbone
from trainers.data import load_split
from trainers.heads import build_head
from trainers.knn import extract, knn_top1
from trainers.loader import image_batches
from trainers.loop import LoopConfig, StepFn, device, fit, prepare, resolve_precision
from trainers.losses import full_precision
from trainers.byol import BYOL
from trainers.instdisc import InstDisc
from trainers.moco import Encoder, MoCo
from trainers.simclr import SimCLR
from trainers.sink import Sink


def augment_params(aug: dict) -> tuple[AugmentParams, AugmentParams]:
    """The grid's ``augment`` section → the AugmentParams of the two views. ``color_strength`` s is
    SimCLR's: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s); MoCo v2's (0.4, 0.4, 0.4, 0.1) is s = 0.5. An
    explicit ``color_jitter: [b, c, s, h]`` (MoCo v1: 0.4 each) takes precedence. ``view2_blur_p`` and
    ``view2_solarize_p`` make the views asymmetric, as BYOL's are (blur 1.0 / 0.1, solarize 0 / 0.2);
    unset, the second view is drawn like the first. One-view methods (InstDisc, supervised) use the first."""
    s = aug["color_strength"]
    jitter = tuple(aug["color_jitter"]) if aug.get("color_jitter") else (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
    blur = aug["blur_p"] if aug["blur"] else 0.0
    first = AugmentParams(crop_scale=tuple(aug["crop_scale"]), jitter=jitter, jitter_p=aug["color_p"],
                          grayscale_p=aug["grayscale_p"], blur_p=blur, solarize_p=aug.get("solarize_p", 0.0),
                          flip_p=0.5 if aug["flip"] else 0.0)
    blur2, sol2 = aug.get("view2_blur_p"), aug.get("view2_solarize_p")
    second = dataclasses.replace(first, blur_p=first.blur_p if blur2 is None or not aug["blur"] else blur2,
                                 solarize_p=first.solarize_p if sol2 is None else sol2)
    return first, second


class Context:
    """What a builder may need besides the spec: crop size, classes, dataset size, total steps."""

    def __init__(self, size: int, num_classes: int, n_data: int, total_steps: int):
        self.size, self.num_classes, self.n_data, self.total_steps = size, num_classes, n_data, total_steps


# builder(backbone, pretrain section, context) → (model, the views its step reads, step function)
Built = tuple[nn.Module, tuple[AugmentParams, ...], StepFn]


def _encoder(backbone: nn.Module, p: dict, hidden: int | None = None) -> tuple[Encoder, int]:
    h = p["head"]
    head, dim = build_head(h["kind"], backbone.feat_dim, h["hidden_dim"] or hidden, h["out_dim"], h["batchnorm"])
    return Encoder(backbone, head), dim


def _top1(logits: torch.Tensor, target: torch.Tensor | int) -> torch.Tensor:
    """Fraction of rows whose largest logit is the target, as a device tensor (no read-back)."""
    return (logits.argmax(1) == target).float().mean()


def build_moco(backbone: nn.Module, p: dict, ctx: Context) -> Built:
    encoder, dim = _encoder(backbone, p)
    neg = p["negatives"]
    hard = (neg["shape"], neg["loc"], neg["scale"]) if neg["sampling"] == "hard" else None
    model = MoCo(encoder, dim=dim, K=p["K"], m=p["m"], T=p["T"], hard=hard)

    def step(net: nn.Module, views: list[torch.Tensor], y: torch.Tensor, idx: torch.Tensor, g: torch.Generator):
        loss, logits = net(views[0], views[1], g)
        return loss, {"inst_acc": _top1(logits, 0)}  # instance-discrimination top-1

    return model, augment_params(p["augment"]), step


def build_simclr(backbone: nn.Module, p: dict, ctx: Context) -> Built:
    encoder, _ = _encoder(backbone, p)
    model = SimCLR(encoder, T=p["T"])

    def step(net: nn.Module, views: list[torch.Tensor], y: torch.Tensor, idx: torch.Tensor, g: torch.Generator):
        loss, logits = net(views[0], views[1])
        n, big_n = logits.shape[0] // 2, logits.shape[1] // 2
        w = D.world()
        rows = torch.arange(n, device=logits.device) * w.size + w.rank
        return loss, {"inst_acc": _top1(logits, torch.cat([rows + big_n, rows]))}

    return model, augment_params(p["augment"]), step


def build_byol(backbone: nn.Module, p: dict, ctx: Context) -> Built:
    # byol: projector 4096 -> 256 and predictor hidden 4096 for a 2048-d ResNet-50, i.e. 2x the
    # feature width; the same ratio scales them down for small backbones
    online, dim = _encoder(backbone, p, hidden=2 * backbone.feat_dim)
    predictor, _ = build_head("mlp", dim, p["head"]["hidden_dim"] or 2 * backbone.feat_dim, dim, batchnorm=True)
    model = BYOL(online, predictor, tau_base=p["tau_base"], total_steps=ctx.total_steps)

    def step(net: nn.Module, views: list[torch.Tensor], y: torch.Tensor, idx: torch.Tensor, g: torch.Generator):
        return net(views[0], views[1]), {}

    return model, augment_params(p["augment"]), step


def build_instdisc(backbone: nn.Module, p: dict, ctx: Context) -> Built:
    encoder, dim = _encoder(backbone, p)
    model = InstDisc(encoder, dim, ctx.n_data, K=p["K"], T=p["T"], bank_m=p["bank_m"], loss=p["nce_loss"])

    def step(net: nn.Module, views: list[torch.Tensor], y: torch.Tensor, idx: torch.Tensor, g: torch.Generator):
        loss, logits = net(views[0], idx, g)
        return loss, {"inst_acc": _top1(logits, 0)}

    return model, augment_params(p["augment"])[:1], step


class Supervised(nn.Module):
    """backbone + fc, trained by cross-entropy on labels (the paper's Table 2 baseline)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone, self.fc = backbone, nn.Linear(backbone.feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))  # logits: N×classes


def build_supervised(backbone: nn.Module, p: dict, ctx: Context) -> Built:
    """Cross-entropy on labels with the same augmentation knobs (the paper's Table 2 baseline)."""
    model = Supervised(backbone, ctx.num_classes)

    def step(net: nn.Module, views: list[torch.Tensor], y: torch.Tensor, idx: torch.Tensor, g: torch.Generator):
        logits = net(views[0])
        with full_precision():
            loss = F.cross_entropy(logits.float(), y)
        return loss, {"train_acc": _top1(logits, y)}

    return model, augment_params(p["augment"])[:1], step


# method name → builder(backbone, pretrain section, context) → (model, views, step function)
METHODS: dict[str, Callable[[nn.Module, dict, Context], Built]] = {
    "instdisc": build_instdisc,
    "mocov1": build_moco,
    "mocov2": build_moco,
    "simclr": build_simclr,
    "byol": build_byol,
    "supervised": build_supervised,
}
UNTRAINED = "none"
QUEUE_METHODS = ("mocov1", "mocov2")


def pretrain(spec: dict, workdir: Path, sink: Sink) -> dict:
    """Train the spec's method; every rank of a torch.distributed job calls this (rank 0 writes).

    Writes ``checkpoints/last.pt`` after every epoch and ``checkpoints/final.pt`` at the end.
    Raises ValueError for a batch size or bn_splits that the number of processes does not divide,
    and DataError (trainers/data.py) for unreadable data."""
    p = spec["pretrain"]
    w = D.world()
    if w.size > 1 and p["batch_size"] % w.size:
        raise ValueError(f"pretrain.batch_size = {p['batch_size']} must be a multiple of the {w.size} processes")
    torch.manual_seed(p["seed"])  # the same initial weights on every rank
    bb = dict(spec["backbone"])
    splits = bb.get("bn_splits", 1)
    if w.size > 1:
        # bn_splits counts BatchNorm groups in the global batch, whatever the number of processes, so
        # that a stage's identity (and its result) does not depend on how many GPUs ran it: one group
        # is BN synchronised over the processes, W·s groups are s per process
        if splits != 1 and splits % w.size:
            raise ValueError(f"backbone.bn_splits = {splits} must be 1 or a multiple of the {w.size} "
                             f"processes (it counts BatchNorm groups in the global batch)")
        bb["bn_splits"] = max(1, splits // w.size)
    backbone = build_backbone(bb)
    final = Path(workdir) / "checkpoints" / "final.pt"
    result: dict = {"checkpoint": str(final), "feat_dim": backbone.feat_dim, "epochs": p["epochs"],
                    "processes": w.size}
    if p["method"] == UNTRAINED:  # the random-init floor every method must clear
        if w.is_main:
            checkpoint.atomic_save({"backbone": backbone.state_dict(), "method": UNTRAINED}, final)
        sink.progress(1, 1)
        return result
    data = load_split(spec["dataset"], "train")
    if p["method"] in QUEUE_METHODS and p["K"] >= len(data):
        # the queue would hold an older key of each query's own image, a false negative that gets
        # harder as the encoder learns: the loss then rises towards ln(K+1)
        raise ValueError(f"pretrain.K = {p['K']} must be below the number of training images ({len(data)})")
    dev = device()
    size = spec["dataset"]["image_size"]
    ctx = Context(size, len(data.classes), len(data), p["epochs"] * (len(data) // p["batch_size"]))
    model, views, step = METHODS[p["method"]](backbone, p, ctx)
    if w.size > 1:  # the heads' BN (and the backbone's at bn_splits 1) see the global batch, as in one process
        D.global_batchnorm(model, two_d=splits == 1)
    prepare(model, dev)
    cfg = LoopConfig(epochs=p["epochs"], batch_size=p["batch_size"], lr=base_lr(p), weight_decay=p["weight_decay"],
                     momentum=p["momentum"], schedule=p["schedule"], milestones=tuple(p["milestones"]),
                     warmup_epochs=p["warmup_epochs"], seed=p["seed"], optimizer=p.get("optimizer", "sgd"),
                     exclude_bias_norm=p.get("exclude_bias_norm", False), lars_eta=p.get("lars_eta", 1e-3),
                     precision=resolve_precision(p.get("precision", "fp32")))
    monitor = _knn_monitor(backbone, spec, data, p["epochs"]) if p.get("knn_every") else None
    batches = image_batches(data, views, size, p["seed"], dev, spec["dataset"].get("workers"))
    history = fit(model, step, batches, cfg, Path(workdir) / "checkpoints" / "last.pt", sink, on_epoch_end=monitor)
    if w.is_main:
        checkpoint.atomic_save({"backbone": _cpu(backbone.state_dict()), "model": _cpu(model.state_dict()),
                                "method": p["method"]}, final)
        if monitor is not None and monitor.last:  # the last epoch's features are the final checkpoint's
            for split, feats in monitor.last.items():
                features.store(final, spec["dataset"], split, AugmentParams(), feats, cfg.precision)
    D.barrier()
    result.update({k: v for k, v in history[-1].items() if k in ("loss", "inst_acc", "train_acc")})
    result["epochs_trained"] = len(history)
    return result


def _cpu(state: dict) -> dict:
    """A state dict with contiguous CPU tensors (channels_last weights load anywhere)."""
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def base_lr(p: dict) -> float:
    """The lr the schedule starts from: ``lr``, or lr x batch_size/256 under linear scaling (SimCLR's
    "LearningRate = 0.3 x BatchSize/256", BYOL's base lr x B/256)."""
    if p.get("lr_scaling", "none") == "linear":
        return p["lr"] * p["batch_size"] / 256
    return p["lr"]


def _knn_monitor(backbone: nn.Module, spec: dict, train, epochs: int) -> Callable[[int], dict[str, float]]:
    """An on_epoch_end hook: kNN top-1 of the backbone's features on the val split, every
    ``knn_every`` epochs and after the last, so the UI shows learning while it happens. It runs in
    eval mode (no BN statistics move, no random numbers drawn) so it cannot change the training."""
    every = spec["pretrain"]["knn_every"]
    precision = resolve_precision(spec["pretrain"].get("precision", "fp32"))
    val = load_split(spec["dataset"], "val")
    aug = AugmentParams()

    def monitor(epoch: int) -> dict[str, float]:
        if (epoch + 1) % every and epoch + 1 != epochs:
            return {}
        was = backbone.training
        backbone.eval()
        feats = {"train": extract(backbone, train.images, aug, precision=precision),
                 "val": extract(backbone, val.images, aug, precision=precision)}
        top1 = knn_top1(feats["train"], train.labels, feats["val"], val.labels, len(train.classes))
        backbone.train(was)
        monitor.last = feats if epoch + 1 == epochs else {}
        return {"knn_top1": top1}

    monitor.last = {}  # the features of the last epoch, kept for trainers/features.py's cache
    return monitor


HEAD_PREFIXES = ("encoder_q.head.", "online.head.", "encoder.head.")  # moco; byol; simclr and instdisc


def load_head(spec: dict, ckpt: str | Path) -> nn.Module | None:
    """The pretrained projection head g (h → z) of the query/online encoder, on CPU, in eval mode;
    None for a method or head kind without one."""
    p = spec["pretrain"]
    model = checkpoint.load(ckpt).get("model")
    prefix = next((x for x in HEAD_PREFIXES if model and any(k.startswith(x) for k in model)), None)
    if prefix is None or p["method"] == UNTRAINED:
        return None
    h = p["head"]
    feat = build_backbone(spec["backbone"]).feat_dim
    hidden = h["hidden_dim"] or (2 * feat if p["method"] == "byol" else None)
    head, _ = build_head(h["kind"], feat, hidden, h["out_dim"], h["batchnorm"])
    head.load_state_dict({k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)})
    return head.eval()


def load_backbone(spec: dict, ckpt: str | Path) -> nn.Module:
    """The pretrained backbone f of a pretraining stage, on CPU, in eval mode."""
    backbone = build_backbone(spec["backbone"])
    backbone.load_state_dict(checkpoint.load(ckpt)["backbone"])
    return backbone.eval()
