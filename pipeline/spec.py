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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

# A grid's ``cluster:`` entry (``default`` or a stage kind) is the SLURM request of its jobs, declared
# once, with its defaults, in cluster/slurm_jobs.py (torch-free). Unset fields fall back to
# ``cluster.default``, then to the stage's ``resources`` (cpus, gpus), then to those defaults.
from cluster.slurm_jobs import SlurmParams as SlurmSpec  # noqa: F401  (re-exported)
from trainers.methods import DEFAULT as DEFAULT_METHOD
from trainers.methods import METHODS as METHOD_RECORDS
from trainers.methods.base import HeadSpec, NegativesSpec, param  # noqa: F401  (HeadSpec, NegativesSpec: re-exported)
from trainers.names import BACKBONES, OPTIMIZERS

if TYPE_CHECKING:
    from pipeline.stages import StageConfig

_f = param  # the field helper; trainers/methods/base.py documents the metadata
# the largest seed: NumPy's and scikit-learn's random_state take 32 bits, and the loop's per-epoch seed
# (trainers/loop.py, seed * 1_000_003 + epoch) must stay a 64-bit integer
MAX_SEED = 2**31 - 1
ROOT = "pretrain"  # the section, and the stage kind, of the pretraining every evaluation follows


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
    name: str = _f("synthetic", choices=("synthetic", "imagefolder", "cifar10", "stl10", "fashion_mnist"),
                   doc="fashion_mnist: Debian's dataset-fashion-mnist (trainers/fashion_mnist.py), 60,000 train "
                       "and the 10,000 official test images as val, upsampled from 28 px to image_size")
    root: Optional[str] = _f(None, path=True, doc="folder with train/ and val/ (imagefolder), the torchvision root "
                             "(cifar10, stl10), or the folder holding Fashion-MNIST's four idx files, .gz or not "
                             "(fashion_mnist; default /usr/share/datasets/fashion-mnist)")
    image_size: int = _f(32, min=8, max=1024)
    num_train: int = _f(4000, min=1, doc="synthetic only")
    num_val: int = _f(1000, min=1, doc="synthetic only")
    seed: int = _f(0, min=0, max=MAX_SEED, doc="synthetic only")
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
    # legacy cpu: every stage before the field decoded in DataLoader workers. cuda decodes with nvJPEG and
    # resizes with torch instead of PIL (other pixel values: trainers/decode.py), so it is in the identity
    decode: str = _f("cpu", choices=("cpu", "cuda"), legacy="cpu", doc="streamed imagefolder: where JPEGs are "
                     "decoded; cpu: DataLoader workers (PIL), cuda: the pretraining's GPU, a batch at a time "
                     "(torchvision's decode_jpeg, nvJPEG). Not yet measured on a GPU: see docs/real-scale.md")


@dataclass(frozen=True)
class BackboneSpec:
    name: str = _f("tiny_resnet", choices=BACKBONES)
    bn_splits: int = _f(1, min=1, doc="BatchNorm on this many sub-batches (single-device shuffle-BN)")
    cifar_stem: bool = _f(False, doc="3x3/1 stem without max-pool for torchvision ResNets")


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




@dataclass(frozen=True)
class PretrainSpec:
    """The fields every method reads, and the method's own fields in ``config`` (an instance of
    ``METHOD_RECORDS[method].config``, trainers/methods/). Defaults: MoCo v2, facebookresearch/moco@7397dfe
    main_moco.py with --mlp --moco-t 0.2 --aug-plus --cos. A grid names the method's own fields flat
    (``pretrain.K``), and ``to_dict`` writes them flat (spec.json, MLflow params), as before the split."""

    method: str = _f(DEFAULT_METHOD, choices=METHOD_RECORDS)  # the live registry: a method added to it is valid
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
    augment: AugmentSpec = AugmentSpec()
    seed: int = _f(0, min=0, max=MAX_SEED)
    precision: str = _precision()
    knn_every: int = _f(0, min=0, identity=False, doc="online monitor: log knn_top1 (k 200, T 0.1) on the val "
                                                   "split every N epochs and after the last; 0: off")
    config: Any = _f(None, inline=True, doc="the method's own fields; default: its Config's defaults")

    def __post_init__(self) -> None:
        """Fill ``config`` with the method's defaults when it is unset. Raises ValueError for a method
        that is not registered, and TypeError for a config of another method's class (e.g.
        ``dataclasses.replace(p, method=...)`` without a new config)."""
        if self.method not in METHOD_RECORDS:
            raise ValueError(f"pretrain.method {self.method!r}: registered methods are {', '.join(METHOD_RECORDS)}")
        want = METHOD_RECORDS[self.method].config
        if self.config is None:
            object.__setattr__(self, "config", want())
        elif type(self.config) is not want:
            raise TypeError(f"pretrain.config is a {type(self.config).__module__}.{type(self.config).__name__}, "
                            f"but method {self.method!r} reads {want.__module__}.{want.__name__}; pass config=None "
                            f"for its defaults")

    def __getattr__(self, name: str) -> Any:
        """The method's own fields read as the spec's (``p.K`` is ``p.config.K``); only called when
        ``name`` is not a common field. Raises AttributeError naming the method otherwise."""
        config = self.__dict__.get("config")  # absent while unpickling
        if name.startswith("__") or config is None:
            raise AttributeError(name)
        if name in {f.name for f in dataclasses.fields(config)}:
            return getattr(config, name)
        raise AttributeError(f"pretrain.{name}: method {self.method!r} has no such field")

    @property
    def record(self):
        """The method's record (trainers/methods/base.py ``Method``)."""
        return METHOD_RECORDS[self.method]

    @property
    def negatives_count(self) -> int | None:
        """How many negatives each query is contrasted with (K, SimCLR's 2B − 2), or None."""
        return self.record.count_negatives(self.config, self.batch_size)

    def base_lr(self) -> float:
        """The lr the schedule starts from: ``lr``, or lr x batch_size/256 under linear scaling
        (SimCLR's "LearningRate = 0.3 x BatchSize/256", BYOL's base lr x B/256)."""
        return self.lr * self.batch_size / 256 if self.lr_scaling == "linear" else self.lr


# The common pretrain fields that can change a method's result (a method's record may name fewer:
# random init keeps method and seed, so every random-init cell of a grid shares one stage).
COMMON_IDENTITY = ("method", "epochs", "batch_size", "lr", "weight_decay", "momentum", "optimizer", "lars_eta",
                   "exclude_bias_norm", "lr_scaling", "schedule", "milestones", "warmup_epochs", "augment", "seed",
                   "precision")


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


def build_pretrain(data: Any, path: str, problems: list[Problem]) -> PretrainSpec | None:
    """The ``pretrain`` section → PretrainSpec: the method's preset (its record's ``preset`` and its
    config's defaults) under the grid's values. A field of another registered method is checked and
    ignored (a grid's defaults may set K for every cell, SimCLR's included); a field no method has is
    a problem naming the closest valid one."""
    if isinstance(data, PretrainSpec):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(Problem(path, data, "must be a mapping of field: value"))
        return None
    name = data.get("method", DEFAULT_METHOD)
    fields = {f.name: f for f in dataclasses.fields(PretrainSpec)}
    valid = _check_scalar(str, name, f"{path}.method", dict(fields["method"].metadata), problems) is not None \
        and name in METHOD_RECORDS
    # an unknown method's cell is still checked field by field, so that every problem shows at once
    _check_records()
    record = METHOD_RECORDS[name] if valid else None
    merged = deep_merge(deep_merge(record.preset, to_dict(record.config())), data) if record else dict(data)
    common = set(fields) - {"config"}
    own = set(record.fields) if record else set()
    others = {n: r for r in METHOD_RECORDS.values() for n in r.fields if n not in own}
    hints = typing.get_type_hints(PretrainSpec)
    common_values, own_values = {}, {}
    for key, value in merged.items():
        if key in own:
            own_values[key] = value
        elif key in others:  # another method's field: checked as that method would, then left out
            f = next(f for f in dataclasses.fields(others[key].config) if f.name == key)
            _build(typing.get_type_hints(others[key].config)[key], value, f"{path}.{key}", dict(f.metadata), problems)
        elif key in common:
            common_values[key] = value
            if record is None and key != "method":
                _build(hints[key], value, f"{path}.{key}", dict(fields[key].metadata), problems)
        else:
            names = sorted(common | own | set(others))
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{path}.{close[0]}'?" if close else f"valid fields: {', '.join(names)}"
            problems.append(Problem(f"{path}.{key}", value, f"unknown field; {hint}"))
    if record is None:
        return None
    config = build_dataclass(record.config, own_values, path, problems)
    if config is None:
        return None
    common_values["config"] = config
    return build_dataclass(PretrainSpec, common_values, path, problems)


def _check_records() -> None:
    """What a method's record can only be checked against here, for every registered method (one
    bad record would change other methods' grids): its own fields must not share a common field's
    name, and ``identity_common`` must name common fields. Raises TypeError naming the file."""
    common = {f.name for f in dataclasses.fields(PretrainSpec)} - {"config"}
    for name, record in METHOD_RECORDS.items():
        clash = set(record.fields) & (common | {"config"})
        if clash:  # the spec would hold two values of one name, and train with the common one
            raise TypeError(f"trainers/methods/{name}.py: Config fields {sorted(clash)} are common pretrain fields "
                            f"(pipeline/spec.py PretrainSpec); rename them")
        unknown = set(record.identity_common or ()) - common
        if unknown:
            raise TypeError(f"trainers/methods/{name}.py: METHOD identity_common names {sorted(unknown)}, which are "
                            f"not common pretrain fields (pipeline/spec.py PretrainSpec)")


def build_stage_config(raw: dict, problems: list[Problem]) -> StageConfig | None:
    """A cell's nested config dict → StageConfig (pipeline/stages.py), with the method's preset under
    the user's values; every problem found is appended to ``problems``."""
    from pipeline.stages import StageConfig

    raw = dict(raw)
    before = len(problems)
    pretrain = build_pretrain(raw.pop(ROOT, None), ROOT, problems)
    cfg = build_dataclass(StageConfig, raw, "", problems)
    if cfg is None or pretrain is None or len(problems) > before:
        return None
    cfg = dataclasses.replace(cfg, pretrain=pretrain)
    _cross_checks(cfg, problems)
    return cfg


def resolve_precision(cfg: StageConfig, resources: dict[str, Resources]) -> StageConfig:
    """``cfg`` with every ``precision: auto`` replaced by what it means for the stage that reads it:
    bf16 when the grid's resources give that stage GPUs (gpus > 0), else fp32. The resolved value is
    what the stage's identity records (fp32 is the legacy value, so CPU stages keep their keys).
    Every section with a ``precision`` field is resolved with the resources of the stage kind of
    the same name."""
    changes = {}
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if getattr(section, "precision", None) != "auto":
            continue
        gpus = resources[f.name].gpus if f.name in resources else None
        changes[f.name] = dataclasses.replace(section, precision="bf16" if gpus else "fp32")
    return dataclasses.replace(cfg, **changes)


TRAIN_IMAGES = {"cifar10": 50_000, "stl10": 5_000, "fashion_mnist": 60_000}  # their train splits (pipeline/cost.py)


def _train_images(ds: DatasetSpec) -> tuple[int, str] | None:
    """The number of training images a stage will read, where it is known before any is read, and
    where it comes from: the synthetic set's ``num_train``; a known train split (``TRAIN_IMAGES``)
    capped by ``max_train``; an ImageFolder's ``max_train`` (at most that many). None otherwise."""
    if ds.name == "synthetic":
        return ds.num_train, "dataset.num_train"
    full = TRAIN_IMAGES.get(ds.name)
    if ds.max_train is not None and (full is None or ds.max_train < full):
        return ds.max_train, f"dataset.max_train = {ds.max_train}"
    if full is not None:
        return full, f"{ds.name}'s train split"
    return None


def _cross_checks(cfg: StageConfig, problems: list[Problem]) -> None:
    lo, hi = cfg.pretrain.augment.crop_scale
    if lo > hi:
        problems.append(Problem("pretrain.augment.crop_scale", [lo, hi], "min must not exceed max"))
    if cfg.dataset.name == "imagefolder" and not cfg.dataset.root:
        problems.append(Problem("dataset.root", None, "an imagefolder dataset needs root: <folder with train/ and val/>"))
    p = cfg.pretrain
    known = _train_images(cfg.dataset)
    if p.record.negatives == "queue" and known is not None and p.config.K >= known[0]:
        problems.append(Problem("pretrain.K", p.config.K,
                                f"must be below the dataset size ({known[0]} training images: {known[1]}): a queue that long holds an "
                                f"older key of each query's own image as a negative. Lower pretrain.K below "
                                f"{known[0]}" + (", or raise dataset.max_train" if known[1].startswith("dataset.max_train")
                                                 else "")))
    if p.record.trains and p.batch_size % cfg.backbone.bn_splits:
        problems.append(Problem("backbone.bn_splits", cfg.backbone.bn_splits,
                                f"must divide pretrain.batch_size ({cfg.pretrain.batch_size})"))
    for f in dataclasses.fields(cfg):  # a section's checks across its own fields (pipeline/stages.py ProbeSpec)
        own = getattr(getattr(cfg, f.name), "problems", None)
        if callable(own):
            problems.extend(own())


# --------------------------------------------------------------------------------------------
# Identity views


def _in_identity(f: dataclasses.Field, value: Any) -> bool:
    if f.metadata.get("identity", True) is False:
        return False
    return not ("legacy" in f.metadata and value == f.metadata["legacy"])


def to_dict(obj: Any, identity_only: bool = False) -> Any:
    """Dataclass → plain JSON-able dict (tuples become lists); optionally only identity fields. A
    field marked ``inline`` (PretrainSpec's ``config``) has its fields written into its parent's."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("inline"):
                out.update(to_dict(value, identity_only))
            elif not identity_only or _in_identity(f, value):
                out[f.name] = to_dict(value, identity_only)
        return out
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
    """The pretrain fields in the stage identity: the common fields that can change the method's
    result (``COMMON_IDENTITY``, or its record's ``identity_common``) and the method's own fields,
    each unless marked otherwise (``identity=False``, or at its ``legacy`` value)."""
    d = to_dict(p, identity_only=True)
    if p.optimizer == "sgd":
        d.pop("lars_eta", None)  # SGD does not read it
    keep = (p.record.identity_common or COMMON_IDENTITY) + p.record.fields
    return {k: d[k] for k in keep if k in d}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


_IN_STAGES = ("StageConfig", "EVALUATIONS", "ProbeSpec", "KnnSpec", "TsneSpec", "SyntheticVocSpec", "DetectionSpec",
              "InversionSpec")


def __getattr__(name: str) -> Any:
    """The evaluation specs and StageConfig live with their stage kinds (pipeline/stages.py); they
    are read from there, so ``from pipeline.spec import StageConfig`` keeps working."""
    if name in _IN_STAGES:
        from pipeline import stages

        return getattr(stages, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
