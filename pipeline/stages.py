"""Stage kind → function(spec, upstream results, stage directory, sink) → result dict.

An explicit table: nothing registers itself by being imported."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from trainers.sink import Sink

StageFn = Callable[[dict, list[dict], Path, Sink], dict]


def _pretrain(spec: dict, upstream: list[dict], workdir: Path, sink: Sink) -> dict:
    from trainers.pretrain import pretrain

    return pretrain(spec, workdir, sink)


def _linear_probe(spec: dict, upstream: list[dict], workdir: Path, sink: Sink) -> dict:
    from evaluators.linear_probe import linear_probe

    return linear_probe(spec, upstream[0], workdir, sink)


def _knn(spec: dict, upstream: list[dict], workdir: Path, sink: Sink) -> dict:
    from evaluators.knn import knn

    return knn(spec, upstream[0], workdir, sink)


def _tsne(spec: dict, upstream: list[dict], workdir: Path, sink: Sink) -> dict:
    from evaluators.tsne import tsne

    return tsne(spec, upstream[0], workdir, sink)


def _detection(spec: dict, upstream: list[dict], workdir: Path, sink: Sink) -> dict:
    from evaluators.detection import detection

    return detection(spec, upstream[0], workdir, sink)


def _inversion(spec: dict, upstream: list[dict], workdir: Path, sink: Sink) -> dict:
    from evaluators.inversion import inversion

    return inversion(spec, upstream[0], workdir, sink)


STAGES: dict[str, StageFn] = {
    "pretrain": _pretrain,
    "linear_probe": _linear_probe,
    "knn": _knn,
    "tsne": _tsne,
    "detection": _detection,
    "inversion": _inversion,
}

# The artifact files each kind leaves in its directory, besides spec.json and result.json.
ARTIFACTS: dict[str, tuple[str, ...]] = {"pretrain": ("checkpoints/final.pt",), "tsne": ("tsne.png",),
                                         "inversion": ("inversion.png", "inversion.pt")}

# The metrics each evaluation kind shows in the report's cell table: the first is its headline
# (column "<kind>_<metric>"), the others keep their own names.
REPORTED: dict[str, tuple[str, ...]] = {
    "linear_probe": ("top1",),
    "knn": ("top1", "align", "uniform"),
    "tsne": ("silhouette_none", "silhouette_weak", "silhouette_strong"),
    "detection": ("det_AP50", "det_AP", "det_AP75"),
    "inversion": ("inv_loss_h_last",),
}
