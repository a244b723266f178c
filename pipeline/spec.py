"""Frozen specs for every stage, and the validator that builds them from a grid file's dicts.

A field's metadata may carry:
- ``identity=False``: the field cannot change results (worker counts, log intervals, paths to
  caches) and is left out of the stage identity;
- ``choices``: the allowed values;
- ``min`` / ``max``: an inclusive range for numbers;
- ``doc``: one line shown in error messages;
- ``path``: a file or folder; ``~`` is expanded when the spec is built;
- ``legacy``: for a field added after stages existed, the value that reproduces what they ran. The
  field is left out of the identity while it holds that value, so adding it changes no existing
  identity. The value is fixed for good; it is not the default, which may change.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from trainers.backbones import BACKBONES
from trainers.heads import HEADS
from trainers.optim import OPTIMIZERS
from trainers.pretrain import METHODS as TRAINED_METHODS
from trainers.pretrain import QUEUE_METHODS, UNTRAINED


def _f(default: Any, **meta: Any) -> Any:
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for list defaults")
    return field(default=default, metadata=meta)


# autocast dtypes of the training stages (trainers/loop.py); "auto" resolves per stage in
# ``resolve_precision``
PRECISIONS = ("bf16", "fp16", "fp32")
_PRECISION_DOC = ("autocast dtype of the forward pass; auto: bf16 when the stage's resources give it GPUs "
                  "(gpus > 0), else fp32. fp16 uses a gradient scaler; losses are fp32 in every case")


def _precision() -> Any:
    # legacy fp32: stages trained before the field existed ran in fp32 and keep their identities
    return _f("auto", choices=("auto",) + PRECISIONS, legacy="fp32", doc=_PRECISION_DOC)


@dataclass(frozen=True)
class DatasetSpec:
    name: str = _f("synthetic", choices=("synthetic", "imagefolder", "cifar10", "stl10"))
    root: Optional[str] = _f(None, path=True, doc="folder with train/ and val/ (imagefolder) or the torchvision root")
    image_size: int = _f(32, min=8, max=1024)
    num_train: int = _f(4000, min=1, doc="synthetic only")
    num_val: int = _f(1000, min=1, doc="synthetic only")
    seed: int = _f(0, doc="synthetic only")
    max_train: Optional[int] = _f(None, min=1, doc="subsample the train split")
    max_val: Optional[int] = _f(None, min=1, doc="subsample the val split")
    download: bool = _f(False, identity=False)
    # legacy true: before the streaming path, every ImageFolder was read as the evaluation view (resize and
    # centre crop) and trained on crops of it, which is what in_memory: true still does
    in_memory: Optional[bool] = _f(None, legacy=True, doc="imagefolder: true stores the evaluation view (resize + "
                                   "centre crop) and trains on crops of it; default: streams the files and crops "
                                   "the originals. The synthetic set: decoded up front unless false (same result)")
    size_hint: Optional[int] = _f(None, min=1, identity=False, doc="training images, for plan's GPU-hour estimate")
    workers: Optional[int] = _f(None, min=0, identity=False, doc="DataLoader workers per process for streamed "
                                "images (default: the process's CPUs minus one, at most 16)")


@dataclass(frozen=True)
class BackboneSpec:
    name: str = _f("tiny_resnet", choices=BACKBONES)
    bn_splits: int = _f(1, min=1, doc="BatchNorm on this many sub-batches (single-device shuffle-BN)")
    cifar_stem: bool = _f(False, doc="3x3/1 stem without max-pool for torchvision ResNets")


@dataclass(frozen=True)
class HeadSpec:
    kind: str = _f("mlp", choices=HEADS)
    hidden_dim: Optional[int] = _f(None, min=1, doc="default: the backbone's feature dimension")
    out_dim: int = _f(128, min=1)
    batchnorm: bool = _f(False, doc="BN after each hidden fc (SimCLR's head; MoCo v2's has none)")


@dataclass(frozen=True)
class AugmentSpec:
    crop_scale: tuple[float, float] = _f((0.2, 1.0), min=0.0, max=1.0)
    color_strength: float = _f(0.5, min=0.0, doc="SimCLR strength s: ColorJitter(0.8s,0.8s,0.8s,0.2s)")
    color_jitter: Optional[tuple[float, float, float, float]] = _f(None, min=0.0, doc="explicit [b, c, s, h]")
    color_p: float = _f(0.8, min=0.0, max=1.0)
    grayscale_p: float = _f(0.2, min=0.0, max=1.0)
    blur: bool = _f(True)
    blur_p: float = _f(0.5, min=0.0, max=1.0)
    solarize_p: float = _f(0.0, min=0.0, max=1.0, legacy=0.0, doc="BYOL's solarisation (x >= 0.5 becomes 1 - x)")
    view2_blur_p: Optional[float] = _f(None, min=0.0, max=1.0, legacy=None,
                                       doc="the second view's blur_p (BYOL: 1.0 and 0.1); default: blur_p")
    view2_solarize_p: Optional[float] = _f(None, min=0.0, max=1.0, legacy=None,
                                           doc="the second view's solarize_p (BYOL: 0 and 0.2); default: solarize_p")
    flip: bool = _f(True)


METHODS = (UNTRAINED,) + tuple(TRAINED_METHODS)


@dataclass(frozen=True)
class NegativesSpec:
    """How MoCo picks its K negatives from the queue (trainers/negatives.py)."""

    sampling: str = _f("all", choices=("all", "hard"))
    shape: float = _f(4.0, doc="skew-normal shape alpha (> 0: long tail towards easy ranks)")
    loc: float = _f(0.0, doc="skew-normal location, in units of the queue length")
    scale: float = _f(0.4, min=1e-6, doc="skew-normal scale, in units of the queue length")


@dataclass(frozen=True)
class PretrainSpec:
    """Defaults: MoCo v2, facebookresearch/moco@7397dfe main_moco.py with --mlp --moco-t 0.2 --aug-plus --cos."""

    method: str = _f("mocov2", choices=METHODS)
    epochs: int = _f(200, min=1)
    batch_size: int = _f(256, min=2)
    lr: float = _f(0.03, min=0.0)
    weight_decay: float = _f(1e-4, min=0.0)
    momentum: float = _f(0.9, min=0.0, max=1.0, doc="SGD or LARS momentum")
    optimizer: str = _f("sgd", choices=OPTIMIZERS, legacy="sgd", doc="lars: SimCLR's and BYOL's (trainers/optim.py)")
    lars_eta: float = _f(1e-3, min=1e-9, legacy=1e-3, doc="LARS trust coefficient")
    exclude_bias_norm: bool = _f(False, legacy=False, doc="no weight decay (and no LARS adaptation) for biases "
                                 "and BN parameters, as SimCLR and BYOL")
    lr_scaling: str = _f("none", choices=("none", "linear"), legacy="none",
                         doc="linear: the lr used is lr x batch_size/256 (SimCLR, BYOL)")
    schedule: str = _f("cosine", choices=("cosine", "step", "constant"))
    milestones: tuple[int, ...] = _f((120, 160), min=0)
    warmup_epochs: float = _f(0.0, min=0.0)
    K: int = _f(65536, min=1, doc="number of negatives: queue size (moco), bank draws (instdisc); simclr: 2B-2")
    m: float = _f(0.999, min=0.0, max=1.0, doc="key-encoder momentum")
    T: float = _f(0.2, min=1e-6, doc="softmax temperature")
    head: HeadSpec = HeadSpec()
    augment: AugmentSpec = AugmentSpec()
    negatives: NegativesSpec = NegativesSpec()
    tau_base: float = _f(0.996, min=0.0, max=1.0, doc="byol: target EMA, rising from tau_base to 1")
    bank_m: float = _f(0.5, min=0.0, max=1.0, doc="instdisc: memory-bank momentum")
    nce_loss: str = _f("nce", choices=("nce", "softmax"), doc="instdisc: NCE or the softmax over 1+K")
    seed: int = _f(0)
    precision: str = _precision()
    knn_every: int = _f(0, min=0, identity=False, doc="online monitor: log knn_top1 (k 200, T 0.1) on the val "
                                                   "split every N epochs and after the last; 0: off")


# Method presets: fields a method changes from the MoCo v2 defaults, before the grid's own values.
PRESETS: dict[str, dict[str, Any]] = {
    "mocov2": {},
    # moco v1: main_moco.py without --mlp/--aug-plus/--cos: T 0.07, fc head, step lr at 120/160,
    # ColorJitter(0.4, 0.4, 0.4, 0.4) always applied, no blur.
    "mocov1": {"T": 0.07, "schedule": "step", "milestones": (120, 160), "head": {"kind": "linear"},
               "augment": {"color_jitter": (0.4, 0.4, 0.4, 0.4), "color_p": 1.0, "blur": False}},
    # lemniscate.pytorch main.py: dim 128, nce-k 4096, nce-t 0.07, nce-m 0.5, lr 0.03, x0.1 at 120/160;
    # MoCo v1's augmentation
    "instdisc": {"K": 4096, "T": 0.07, "bank_m": 0.5, "schedule": "step", "milestones": (120, 160),
                 "head": {"kind": "linear"},
                 "augment": {"color_jitter": (0.4, 0.4, 0.4, 0.4), "color_p": 1.0, "blur": False}},
    # simclr run.py (ImageNet): T 0.1, lr 0.3xB/256, wd 1e-6, 10 warmup epochs then cosine; head with BN;
    # crop 0.08-1, colour strength 1, blur p 0.5; LARS (eta 1e-3) with BN and bias excluded.
    "simclr": {"T": 0.1, "lr": 0.3, "weight_decay": 1e-6, "warmup_epochs": 10, "schedule": "cosine",
               "optimizer": "lars", "exclude_bias_norm": True, "lr_scaling": "linear",
               "head": {"kind": "mlp", "batchnorm": True},
               "augment": {"crop_scale": (0.08, 1.0), "color_strength": 1.0}},
    # byol configs/byol.py: tau_base 0.996, projector -> 256 with BN, lr 0.2xB/256 (1000 ep), wd 1.5e-6,
    # 10 warmup epochs, cosine, LARS (eta 1e-3, momentum 0.9) with BN and bias excluded;
    # utils/augmentations.py: ColorJitter(0.4,0.4,0.2,0.1) p 0.8, blur p 1.0 / 0.1, solarize p 0 / 0.2.
    "byol": {"tau_base": 0.996, "lr": 0.2, "weight_decay": 1.5e-6, "warmup_epochs": 10, "schedule": "cosine",
             "optimizer": "lars", "exclude_bias_norm": True, "lr_scaling": "linear",
             "head": {"kind": "mlp", "batchnorm": True, "out_dim": 256},
             "augment": {"color_jitter": (0.4, 0.4, 0.2, 0.1), "crop_scale": (0.08, 1.0), "blur_p": 1.0,
                         "view2_blur_p": 0.1, "solarize_p": 0.0, "view2_solarize_p": 0.2}},
    # torchvision's ResNet recipe: lr 0.1, wd 1e-4, x0.1 every 30 epochs
    "supervised": {"lr": 0.1, "weight_decay": 1e-4, "schedule": "step", "milestones": (30, 60), "head": {"kind": "none"}},
    "none": {},
}

# For a method, the pretrain fields that can change its result (the rest are dropped from identity,
# so e.g. every random-init cell of a grid shares one stage).
_COMMON = ("method", "epochs", "batch_size", "lr", "weight_decay", "momentum", "optimizer", "lars_eta",
           "exclude_bias_norm", "lr_scaling", "schedule", "milestones", "warmup_epochs", "augment", "seed",
           "precision")
METHOD_FIELDS: dict[str, tuple[str, ...] | None] = {
    "none": ("method", "seed"),
    "instdisc": _COMMON + ("K", "T", "head", "bank_m", "nce_loss"),
    "mocov1": _COMMON + ("K", "m", "T", "head", "negatives"),
    "mocov2": _COMMON + ("K", "m", "T", "head", "negatives"),
    "simclr": _COMMON + ("T", "head"),  # K = 2B - 2 follows the batch size
    "byol": _COMMON + ("tau_base", "head"),
    "supervised": _COMMON,
}


@dataclass(frozen=True)
class ProbeSpec:
    """Defaults: moco main_lincls.py (lr 30, batch 256, 100 epochs, x0.1 at 60/80, wd 0)."""

    mode: str = _f("cached", choices=("cached", "moco"))
    epochs: int = _f(100, min=1)
    lr: float = _f(30.0, min=0.0)
    batch_size: int = _f(256, min=1)
    momentum: float = _f(0.9, min=0.0, max=1.0)
    weight_decay: float = _f(0.0, min=0.0)
    milestones: Optional[tuple[int, ...]] = _f(None, min=0, doc="default: 60% and 80% of epochs")
    # legacy true: probes before the field dropped each epoch's last partial batch (256 of 300 images)
    drop_last: bool = _f(False, legacy=True, doc="false trains on every image each epoch, as main_lincls; true "
                         "drops the last partial batch, as probe stages did before this field")
    seed: int = _f(0)
    precision: str = _precision()


@dataclass(frozen=True)
class KnnSpec:
    """Weighted kNN on L2-normalised backbone features (InstDisc; moco's CIFAR demo: k 200, T 0.1)."""

    k: int = _f(200, min=1)
    T: float = _f(0.1, min=1e-6)


@dataclass(frozen=True)
class TsneSpec:
    """Fig. 3: t-SNE of a fixed val sample under no, weak and strong augmentation (evaluators/tsne.py)."""

    samples: int = _f(500, min=10, doc="val images embedded (fewer if the split is smaller)")
    perplexity: float = _f(30.0, min=1.0)
    seed: int = _f(0)
    dpi: int = _f(100, min=30, identity=False)


@dataclass(frozen=True)
class SyntheticVocSpec:
    """The embedded detection set: coloured shapes on flat canvases, written in VOC layout."""

    trainval: int = _f(600, min=1)
    test: int = _f(200, min=1)
    size: int = _f(64, min=16, doc="canvas side in pixels")
    seed: int = _f(0)


@dataclass(frozen=True)
class DetectionSpec:
    """Faster R-CNN R50-C4 fine-tuning (evaluators/detection.py). Defaults: MoCo's VOC recipe
    (moco/detection/configs/pascal_voc_R_50_C4_24k_moco.yaml): 24k iterations, steps 18k/22k, base
    lr 0.02, batch 16, SyncBN (here ``train``)."""

    voc_root: Optional[str] = _f(None, path=True, doc="folder holding VOCdevkit/VOC2007; null: the synthetic set")
    train_sets: tuple[str, ...] = _f(("2007/trainval", "2012/trainval"), pattern=r"\d{4}/\w+", example="2007/trainval",
                                     doc="YEAR/split under VOCdevkit/VOC<YEAR>, concatenated (MoCo: VOC07+12 trainval)")
    test_set: str = _f("2007/test", pattern=r"\d{4}/\w+", example="2007/test")
    # legacy error: before the field, a set with an invalid box could only fail, so no finished stage
    # trained without one; drop changes which boxes train and score, hence part of the identity
    invalid_boxes: str = _f("error", choices=("error", "drop"), legacy="error",
                            doc="a box that is reversed, leaves the image, lacks a coordinate or has an unknown "
                                "class: error refuses the sets, naming each; drop leaves it out with a warning "
                                "(evaluators/voc.py)")
    synthetic: SyntheticVocSpec = SyntheticVocSpec()
    iterations: int = _f(24000, min=1)
    batch_size: int = _f(16, min=1)
    lr: float = _f(0.02, min=0.0)
    steps: tuple[int, ...] = _f((18000, 22000), min=0)
    warmup_iters: int = _f(100, min=0)
    momentum: float = _f(0.9, min=0.0, max=1.0)
    weight_decay: float = _f(1e-4, min=0.0)
    min_size: tuple[int, ...] = _f(tuple(range(480, 801, 32)), min=16,
                                   doc="shorter side; training draws one per image (MoCo's multi-scale 480-800), "
                                       "testing uses the last; a single value trains and tests at that size")
    max_size: int = _f(1333, min=16)
    anchor_sizes: tuple[int, ...] = _f((32, 64, 128, 256, 512), min=1)
    roi_size: int = _f(14, min=1, doc="RoIAlign output side fed to res5 (detectron2 C4: 14)")
    rois_per_image: int = _f(512, min=1, doc="RoIs sampled per image for the box head (detectron2: 512)")
    proposals_train: int = _f(2000, min=1, doc="RPN proposals kept per image in training (pre- and post-NMS)")
    proposals_test: int = _f(1000, min=1, doc="RPN proposals kept per image at test time")
    norm: str = _f("train", choices=("train", "frozen"))
    seed: int = _f(0)
    precision: str = _precision()
    log_every: int = _f(20, min=1, identity=False)
    ckpt_every: int = _f(500, min=1, identity=False)


@dataclass(frozen=True)
class InversionSpec:
    """Fig. 2: Deep Image Prior inversion of h and z (evaluators/inversion.py); DIP's Adam lr 1e-3."""

    images: int = _f(4, min=1, doc="val images inverted")
    iterations: int = _f(2000, min=1, doc="Adam steps per image and target")
    lr: float = _f(1e-3, min=0.0)
    seed: int = _f(0)
    dpi: int = _f(100, min=30, identity=False)


@dataclass(frozen=True)
class StageConfig:
    """Everything a cell configures: the grid's ``defaults`` with a cell's overrides applied."""

    dataset: DatasetSpec = DatasetSpec()
    backbone: BackboneSpec = BackboneSpec()
    pretrain: PretrainSpec = PretrainSpec()
    linear_probe: ProbeSpec = ProbeSpec()
    knn: KnnSpec = KnnSpec()
    tsne: TsneSpec = TsneSpec()
    detection: DetectionSpec = DetectionSpec()
    inversion: InversionSpec = InversionSpec()


@dataclass(frozen=True)
class Resources:
    """What a stage asks for in all. ``processes`` (default: one per GPU) share ``cpus`` and ``gpus``:
    {cpus: 32, gpus: 8} runs 8 data-parallel processes of 4 CPUs and 1 GPU each, as moco's 8-GPU recipe."""

    cpus: float = _f(1.0, min=0.0, doc="CPUs of the whole stage, shared by its processes")
    gpus: Optional[float] = _f(None, min=0.0, doc="GPUs of the whole stage; null: 1 when the Ray cluster has a GPU, else 0")
    processes: Optional[int] = _f(None, min=1, doc="processes joined by torch.distributed; default: one per GPU "
                                  "(gpus when it is a whole number >= 1), else 1")

    def process_count(self, gpus: float | None = None) -> int:
        """The number of processes for ``gpus`` in all (default: the field's; null counts as at most 1)."""
        g = self.gpus if gpus is None else gpus
        if self.processes:
            return self.processes
        return int(g) if g is not None and g >= 1 and float(g).is_integer() else 1

    def per_process(self, gpus: float) -> tuple[int, float, float]:
        """(processes, CPUs per process, GPUs per process) when the stage has ``gpus`` in all."""
        n = self.process_count(gpus)
        return n, self.cpus / n, gpus / n


@dataclass(frozen=True)
class SlurmSpec:
    """A grid's ``cluster:`` entry (``default`` or a stage kind): the SLURM request of its jobs. Unset
    fields fall back to ``cluster.default``, then to the stage's ``resources`` (cpus, gpus)."""

    partition: Optional[str] = None
    nodes: Optional[int] = _f(None, min=1, doc="default 1")
    tasks_per_node: Optional[int] = _f(None, min=1, doc="processes per node, one per GPU (data-parallel); default 1")
    gpus_per_node: Optional[int] = _f(None, min=0)
    cpus_per_task: Optional[int] = _f(None, min=1)
    mem_gb: Optional[float] = _f(None, min=0.0)
    timeout_min: Optional[int] = _f(None, min=1, doc="default 60")
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    additional_parameters: Optional[dict] = _f(None, doc="extra sbatch flags, e.g. {mail-type: END}")
    setup: Optional[tuple[str, ...]] = _f(None, doc="shell lines run before the job, e.g. module load")
    array_parallelism: Optional[int] = _f(None, min=1, doc="default 64")


EVALUATIONS = ("linear_probe", "knn", "tsne", "detection", "inversion")


# --------------------------------------------------------------------------------------------
# Validation


@dataclass
class Problem:
    field: str
    value: Any
    message: str

    def __str__(self) -> str:
        return f"{self.field} = {self.value!r}: {self.message}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} {_type_name(args[0])}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _check_scalar(tp: Any, value: Any, path: str, meta: dict, problems: list[Problem]) -> Any:
    ok = (isinstance(value, bool) if tp is bool else
          isinstance(value, int) and not isinstance(value, bool) if tp is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else
          isinstance(value, str) if tp is str else True)
    if not ok:
        problems.append(Problem(path, value, f"must be {_type_name(tp)}"))
        return None
    if tp is float:
        value = float(value)
        if not math.isfinite(value):  # YAML's .nan and .inf are numbers, but no setting of ours
            problems.append(Problem(path, value, "must be a finite number"))
            return None
    if meta.get("path"):  # ~ and ~user, as torchvision's datasets do (os.path.expanduser on root)
        value = os.path.expanduser(value)
    if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
        problems.append(Problem(path, value, f"must look like {meta['example']!r}"))
    if "choices" in meta and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"]], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(Problem(path, value, f"{hint}valid values: {', '.join(map(str, meta['choices']))}"))
    if tp in (int, float):
        if "min" in meta and value < meta["min"]:
            problems.append(Problem(path, value, f"must be >= {meta['min']}"))
        if "max" in meta and value > meta["max"]:
            problems.append(Problem(path, value, f"must be <= {meta['max']}"))
    return value


def _build(tp: Any, value: Any, path: str, meta: dict, problems: list[Problem]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build(args[0], value, path, meta, problems)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path, problems)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # a variadic list field accepts one value: ``min_size: 64`` means [64]
        if not isinstance(value, (list, tuple)):
            problems.append(Problem(path, value, f"must be {_type_name(tp)}"))
            return None
        if not (len(args) == 2 and args[1] is Ellipsis) and len(value) != len(args):
            problems.append(Problem(path, value, f"must be {_type_name(tp)}"))
            return None
        item_tp = args[0]
        return tuple(_check_scalar(item_tp, v, f"{path}[{i}]", meta, problems) for i, v in enumerate(value))
    return _check_scalar(tp, value, path, meta, problems)


def build_dataclass(cls: type, data: Any, path: str, problems: list[Problem]) -> Any:
    """Build ``cls`` from a dict, appending every problem found (with its dotted path) to ``problems``."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(Problem(path or "<top>", data, "must be a mapping of field: value"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{path + '.' if path else ''}{close[0]}'?" if close else \
                f"valid fields: {', '.join(fields)}"
            problems.append(Problem(sub, value, f"unknown field; {hint}"))
            continue
        kwargs[key] = _build(hints[key], value, sub, dict(fields[key].metadata), problems)
    if any(v is None and not _optional(hints[k]) for k, v in kwargs.items()):
        return None
    return cls(**kwargs)


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_stage_config(raw: dict, problems: list[Problem]) -> StageConfig | None:
    """A cell's nested config dict → StageConfig, with the method's preset under the user's values."""
    pre = raw.get("pretrain")
    if isinstance(pre, dict) and pre.get("method", PretrainSpec.method) in PRESETS:
        raw = dict(raw, pretrain=deep_merge(PRESETS[pre.get("method", PretrainSpec.method)], pre))
    cfg = build_dataclass(StageConfig, raw, "", problems)
    if cfg is not None:
        _cross_checks(cfg, problems)
    return cfg


def resolve_precision(cfg: StageConfig, resources: dict[str, Resources]) -> StageConfig:
    """``cfg`` with every ``precision: auto`` replaced by what it means for the stage that reads it:
    bf16 when the grid's resources give that stage GPUs (gpus > 0), else fp32. The resolved value is
    what the stage's identity records (fp32 is the legacy value, so CPU stages keep their keys)."""
    def resolve(section: Any, kind: str) -> Any:
        if section.precision != "auto":
            return section
        gpus = resources[kind].gpus if kind in resources else None
        return dataclasses.replace(section, precision="bf16" if gpus else "fp32")

    return dataclasses.replace(cfg, pretrain=resolve(cfg.pretrain, "pretrain"),
                               linear_probe=resolve(cfg.linear_probe, "linear_probe"),
                               detection=resolve(cfg.detection, "detection"))


def process_problems(cfg: StageConfig, resources: dict[str, Resources]) -> list[Problem]:
    """What the pretraining's process count (``resources.pretrain``) requires of the cell: a global
    batch and a number of BatchNorm groups that the processes divide."""
    n = resources["pretrain"].process_count()
    if n == 1 or cfg.pretrain.method == "none":
        return []
    problems = []
    if cfg.pretrain.batch_size % n:
        problems.append(Problem("pretrain.batch_size", cfg.pretrain.batch_size,
                                f"must be a multiple of the {n} processes resources.pretrain runs"))
    if cfg.backbone.bn_splits != 1 and cfg.backbone.bn_splits % n:
        problems.append(Problem("backbone.bn_splits", cfg.backbone.bn_splits,
                                f"must be 1 (BN synchronised over the processes) or a multiple of the {n} processes "
                                f"resources.pretrain runs: it counts BatchNorm groups in the global batch, so that "
                                f"the result does not depend on the number of GPUs. {n} is one group per process "
                                f"(moco's per-GPU BN)"))
    return problems


def shuffle_bn_warning(cfg: StageConfig, resources: dict[str, Resources]) -> str | None:
    """A MoCo stage whose key encoder's BatchNorm sees the whole batch at once: ``bn_splits: 1``. Shuffle-BN then cannot hide the batch's statistics from the key encoder (moco's
    CIFAR demo: 4 points worse without it). The default stays 1, because changing it would change the
    identity of every stage that relied on it; this warning names the field instead."""
    if cfg.pretrain.method not in QUEUE_METHODS or cfg.backbone.bn_splits > 1:
        return None
    return ("backbone.bn_splits = 1: the key encoder's BatchNorm sees the whole batch (in one process, or "
            "synchronised over several), the leak shuffle-BN exists to stop. Set backbone.bn_splits to 8 (moco's 8 GPUs "
            "of 32 images at batch 256) or to batch_size/32")


def _cross_checks(cfg: StageConfig, problems: list[Problem]) -> None:
    lo, hi = cfg.pretrain.augment.crop_scale
    if lo > hi:
        problems.append(Problem("pretrain.augment.crop_scale", [lo, hi], "min must not exceed max"))
    if cfg.dataset.name == "imagefolder" and not cfg.dataset.root:
        problems.append(Problem("dataset.root", None, "an imagefolder dataset needs root: <folder with train/ and val/>"))
    if cfg.pretrain.method in QUEUE_METHODS and cfg.dataset.name == "synthetic" and cfg.pretrain.K >= cfg.dataset.num_train:
        problems.append(Problem("pretrain.K", cfg.pretrain.K,
                                f"must be below the dataset size ({cfg.dataset.num_train}): a queue that long holds an "
                                f"older key of each query's own image as a negative"))
    if cfg.pretrain.method != "none" and cfg.pretrain.batch_size % cfg.backbone.bn_splits:
        problems.append(Problem("backbone.bn_splits", cfg.backbone.bn_splits,
                                f"must divide pretrain.batch_size ({cfg.pretrain.batch_size})"))


# --------------------------------------------------------------------------------------------
# Identity views


def _in_identity(f: dataclasses.Field, value: Any) -> bool:
    if f.metadata.get("identity", True) is False:
        return False
    return not ("legacy" in f.metadata and value == f.metadata["legacy"])


def to_dict(obj: Any, identity_only: bool = False) -> Any:
    """Dataclass → plain JSON-able dict (tuples become lists); optionally only identity fields."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name), identity_only) for f in dataclasses.fields(obj)
                if not identity_only or _in_identity(f, getattr(obj, f.name))}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, identity_only) for v in obj]
    return obj


def dataset_identity(ds: DatasetSpec) -> dict:
    """The dataset's identity fields; ``in_memory`` changes results only for an ImageFolder (the
    synthetic set gives the same batches either way), so it is left out for the other datasets."""
    d = to_dict(ds, identity_only=True)
    if ds.name != "imagefolder":
        d.pop("in_memory", None)
    return d


def pretrain_identity(p: PretrainSpec) -> dict:
    d = to_dict(p, identity_only=True)
    if p.optimizer == "sgd":
        d.pop("lars_eta", None)  # SGD does not read it
    keep = METHOD_FIELDS.get(p.method)
    return {k: d[k] for k in keep if k in d} if keep is not None else d


def negatives(method: str, K: int, batch_size: int) -> int | None:
    """The number of negatives a method contrasts each query with: SimCLR's in-batch 2B − 2, the
    queue or bank size K for MoCo and InstDisc, None for the methods without negatives."""
    if method == "simclr":
        return 2 * batch_size - 2
    return K if method in QUEUE_METHODS + ("instdisc",) else None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
