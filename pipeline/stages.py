"""Stage kinds: one record per kind, in one explicit table, and the StageConfig built from it.

A kind's record holds its spec class, its run function, its artifacts, the metrics the report and
``sslgrid status`` show, its one-line summary for ``sslgrid plan``, its GPU-hour model
(pipeline/cost.py) or none, and whether it logs system metrics. The CLI, plan, execute and report
iterate ``STAGE_KINDS``; nothing registers itself by being imported. Each evaluation's spec class
sits above its record. Adding an evaluation: its spec class and record here, its module in
evaluators/.

This module imports no torch: a run function is imported when a stage runs.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pipeline import cost
from pipeline.spec import MAX_SEED, ROOT, BackboneSpec, DatasetSpec, PretrainSpec, Problem, _f, _precision
from trainers.results import EvalResult, PretrainResult

if TYPE_CHECKING:
    from trainers.sink import Sink



@dataclass(frozen=True)
class ProbeSpec:
    """Defaults: moco main_lincls.py (lr 30, batch 256, 100 epochs, x0.1 at 60/80, wd 0). ``repeats``
    (issue 20): N probes on the same cached features, averaged in one stage."""

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
    seed: int = _f(0, min=0, max=MAX_SEED)
    precision: str = _precision()
    # legacy 1: every probe stage before the field trained one probe, so repeats 1 keeps its key
    repeats: int = _f(1, min=1, max=100, legacy=1,
                      doc="mode cached: train this many probes on the same features (seed first, then seeds derived "
                          "from it: evaluators/linear_probe.py probe_seeds); top1 is their mean, top1_probe_sd "
                          "their standard deviation")

    def problems(self) -> list[Problem]:
        """What the fields cannot mean together: several probes need stored features."""
        if self.repeats > 1 and self.mode != "cached":
            return [Problem("linear_probe.repeats", self.repeats,
                            f"averages probes trained on the same cached features, and mode {self.mode!r} "
                            f"augments every epoch through the backbone instead; set linear_probe.mode: cached, "
                            f"or linear_probe.repeats: 1")]
        return []


@dataclass(frozen=True)
class KnnSpec:
    """Weighted kNN on L2-normalised backbone features (trainers/neighbors.py). ``k`` 200 and ``T``
    0.1: InstDisc's ImageNet setting (lemniscate.pytorch), kept by moco's CIFAR demo; its accuracy is
    the headline metric ``top1`` (percent). ``more_k``: further neighbourhood sizes from the same
    search, each logged as ``top1_k<k>`` (percent). 20: DINO's eval_knn.py (Caron et al. 2021; --nb_knn
    10 20 100 200, "20 is usually working the best"); it also fits sets with a hundred or so training
    images per class, where most of 200 neighbours are other classes."""

    k: int = _f(200, min=1, doc="neighbours of the headline top1")
    T: float = _f(0.1, min=1e-6)
    # legacy (20,), the default: it only adds the metric top1_k20 next to the unchanged top1 at k, so
    # every kNN stage keeps its identity (a finished one simply lacks top1_k20); any other value
    # changes the identity, so that a grid asking for other k gets them computed
    more_k: tuple[int, ...] = _f((20,), min=1, legacy=(20,),
                                 doc="further k, each logged as top1_k<k> from the same search")


@dataclass(frozen=True)
class TsneSpec:
    """Fig. 3: t-SNE of a fixed val sample under no, weak and strong augmentation (evaluators/tsne.py)."""

    samples: int = _f(500, min=10, doc="val images embedded (fewer if the split is smaller)")
    perplexity: float = _f(30.0, min=1.0)
    seed: int = _f(0, min=0, max=MAX_SEED)
    dpi: int = _f(100, min=30, identity=False)


@dataclass(frozen=True)
class SyntheticVocSpec:
    """The embedded detection set: coloured shapes on flat canvases, written in VOC layout."""

    trainval: int = _f(600, min=1)
    test: int = _f(200, min=1)
    size: int = _f(64, min=16, doc="canvas side in pixels")
    seed: int = _f(0, min=0, max=MAX_SEED)


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
    seed: int = _f(0, min=0, max=MAX_SEED)
    precision: str = _precision()
    log_every: int = _f(20, min=1, identity=False)
    ckpt_every: int = _f(500, min=1, identity=False)


@dataclass(frozen=True)
class InversionSpec:
    """Fig. 2: Deep Image Prior inversion of h and z (evaluators/inversion.py); DIP's Adam lr 1e-3."""

    images: int = _f(4, min=1, doc="val images inverted")
    iterations: int = _f(2000, min=1, doc="Adam steps per image and target")
    lr: float = _f(1e-3, min=0.0)
    seed: int = _f(0, min=0, max=MAX_SEED)
    dpi: int = _f(100, min=30, identity=False)


@dataclass(frozen=True)
class StageKind:
    """One kind of stage.

    - ``name``: also the StageConfig field holding its spec, of class ``spec``.
    - ``run``: "module:function", called as ``function(cfg, *upstream, workdir, sink) -> result``
      with the frozen StageConfig, the upstream stages' results (none for the root, the
      pretraining's PretrainResult for an evaluation), the stage folder and a metrics sink.
    - ``result``: the class of what it returns (trainers/results.py), which reads result.json back.
    - ``summary(cfg)``: what ``sslgrid plan`` prints for it, one line.
    - ``cost(cfg)``: estimated V100-class GPU-hours (pipeline/cost.py), None when the dataset size
      is unknown; ``cost`` None: no model.
    - ``artifacts``: files it leaves in its folder besides spec.json and result.json, logged to MLflow.
    - ``reported``: metrics in the report's cell table, headline first (column "<kind>_<headline>").
    - ``status_metrics``: metrics ``sslgrid status`` prints.
    - ``system_metrics``: log MLflow system metrics (GPU, CPU) while it runs: for long stages.
    - ``preflight(cfg)``: (field, message) problems that need the file system, checked before launch.
    - ``uses_cache(cfg)``: whether it writes to $SSLGRID_CACHE (checked for writability).
    - ``report_note(cfg)``: a line under the report's cell table saying what its columns measure.
    """

    name: str
    spec: type
    run: str
    summary: Callable[[Any], str]
    cost: Callable[[Any], float | None] | None = None
    artifacts: tuple[str, ...] = ()
    reported: tuple[str, ...] = ()
    status_metrics: tuple[str, ...] = ("top1",)
    system_metrics: bool = False
    preflight: Callable[[Any], list[tuple[str, str]]] | None = None
    uses_cache: Callable[[Any], bool] | None = None
    report_note: Callable[[Any], str] | None = None
    result: type = EvalResult

    def function(self) -> Callable[..., dict]:
        """The run function, imported now (this imports torch)."""
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, cfg: Any, upstream: list, workdir: Path, sink: Sink) -> Any:
        return self.function()(cfg, *upstream, workdir, sink)


def _pretrain_summary(cfg: Any) -> str:
    p = cfg.pretrain
    if not p.record.trains:
        return p.method
    head = getattr(p.config, "head", None)
    k = p.negatives_count
    k = "-" if k is None else f"2B-2={k}" if p.record.negatives == "batch" else str(k)
    neg = getattr(p.config, "negatives", None)
    hard = " hard-negatives" if neg is not None and neg.sampling == "hard" else ""
    return (f"{p.method}" + (f" head={head.kind}" if head is not None else "") + f" K={k}{hard} "
            f"epochs={p.epochs} batch={p.batch_size} {p.optimizer} lr={p.base_lr():.4g}")


def _detection_summary(cfg: Any) -> str:
    d = cfg.detection
    sizes = f"{min(d.min_size)}" + (f"-{max(d.min_size)}" if len(d.min_size) > 1 else "")
    return f"iterations={d.iterations} batch={d.batch_size} size={sizes} norm={d.norm}"


def _voc_preflight(cfg: Any) -> list[tuple[str, str]]:
    d = cfg.detection
    if d.voc_root is None:
        return []
    try:
        from evaluators.voc import voc_problems  # every VOC box, from the XML alone
        return [("detection.voc_root", m) for m in voc_problems(d.voc_root, d.train_sets, d.test_set, d.invalid_boxes)]
    except ImportError:  # a login node without torch: `sslgrid run`, which has it, checks the boxes
        return []


STAGE_KINDS: dict[str, StageKind] = {
    ROOT: StageKind(
        ROOT, PretrainSpec, "trainers.pretrain:pretrain", _pretrain_summary, cost.pretrain_hours,
        artifacts=("checkpoints/final.pt",), status_metrics=("top1", "loss"), system_metrics=True,
        result=PretrainResult),
    "linear_probe": StageKind(
        "linear_probe", ProbeSpec, "evaluators.linear_probe:linear_probe",
        lambda cfg: f"mode={cfg.linear_probe.mode} epochs={cfg.linear_probe.epochs}"
                    + (f" repeats={cfg.linear_probe.repeats}" if cfg.linear_probe.repeats > 1 else ""), cost.probe_hours,
        reported=("top1",)),
    "knn": StageKind(
        "knn", KnnSpec, "evaluators.knn:knn",
        lambda cfg: f"k={cfg.knn.k} more_k={','.join(map(str, cfg.knn.more_k)) or '-'} T={cfg.knn.T}", cost.knn_hours,
        reported=("top1", "top1_k20", "align", "uniform"),
        report_note=lambda cfg: (f"knn_top1: weighted vote of k = {cfg.knn.k} nearest training images (T = "
                                 f"{cfg.knn.T:g}); " + "".join(f"top1_k{k}: of k = {k}; " for k in cfg.knn.more_k)
                                 + "a k above a class's training images votes mostly for other classes")),
    "tsne": StageKind(
        "tsne", TsneSpec, "evaluators.tsne:tsne",
        lambda cfg: f"samples={cfg.tsne.samples} perplexity={cfg.tsne.perplexity}", cost.tsne_hours,
        artifacts=("tsne.png",), reported=("silhouette_none", "silhouette_weak", "silhouette_strong")),
    "detection": StageKind(
        "detection", DetectionSpec, "evaluators.detection:detection", _detection_summary, cost.detection_hours,
        reported=("det_AP50", "det_AP", "det_AP75"), preflight=_voc_preflight,
        uses_cache=lambda cfg: cfg.detection.voc_root is None),  # the synthetic VOC set is written there
    "inversion": StageKind(
        "inversion", InversionSpec, "evaluators.inversion:inversion",
        lambda cfg: f"images={cfg.inversion.images} iterations={cfg.inversion.iterations}", None,
        artifacts=("inversion.png", "inversion.pt"), reported=("inv_loss_h_last",)),
}
EVALUATIONS = tuple(k for k in STAGE_KINDS if k != ROOT)
DEFAULT_EVALUATIONS = ("linear_probe",)  # a grid without ``evaluations:``: moco's protocol

# Everything a cell configures: the grid's ``defaults`` with a cell's overrides applied. Its fields
# are the data, the backbone, and one section per stage kind, from the table above.
StageConfig = dataclasses.make_dataclass(
    "StageConfig",
    [("dataset", DatasetSpec, dataclasses.field(default=DatasetSpec())),
     ("backbone", BackboneSpec, dataclasses.field(default=BackboneSpec()))]
    + [(k.name, k.spec, dataclasses.field(default=k.spec())) for k in STAGE_KINDS.values()],
    frozen=True,
    namespace={"__module__": __name__,  # so that pickle finds it here (Ray, submitit)
               "__doc__": "Everything a cell configures: dataset, backbone and one section per stage kind "
                          "(pipeline/stages.py STAGE_KINDS), frozen; it pickles across Ray and submitit."})


def gpu_hours(kind: str, cfg: Any) -> float | None:
    """Estimated V100-class GPU-hours of a stage of ``kind`` configured by ``cfg``; None when its
    kind has no model or the dataset size is unknown (pipeline/cost.py)."""
    model = STAGE_KINDS[kind].cost
    return None if model is None else model(cfg)


def process_problems(cfg: Any, resources: dict[str, Any]) -> list[Problem]:
    """What the pretraining's process count (``resources.pretrain``) requires of the cell: a global
    batch and a number of BatchNorm groups that the processes divide."""
    n = resources[ROOT].process_count()
    record = cfg.pretrain.record
    if n == 1 or not record.trains:
        return []
    if not record.data_parallel:
        return [Problem("resources.pretrain", n, f"{record.name} runs in one process: set processes: 1")]
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


def shuffle_bn_warning(cfg: Any, resources: dict[str, Any]) -> str | None:
    """A MoCo stage whose key encoder's BatchNorm sees the whole batch at once: ``bn_splits: 1``. Shuffle-BN then cannot hide the batch's statistics from the key encoder (moco's
    CIFAR demo: 4 points worse without it). The default stays 1, because changing it would change the
    identity of every stage that relied on it; this warning names the field instead."""
    if not cfg.pretrain.record.shuffle_bn or cfg.backbone.bn_splits > 1:
        return None
    return ("backbone.bn_splits = 1: the key encoder's BatchNorm sees the whole batch (in one process, or "
            "synchronised over several), the leak shuffle-BN exists to stop. Set backbone.bn_splits to 8 (moco's 8 GPUs "
            "of 32 images at batch 256) or to batch_size/32")
