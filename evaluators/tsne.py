"""The ``tsne`` evaluation stage (the paper's Fig. 3): how a frozen backbone's features of a fixed
sample of val images move under no, weak and strong augmentation.

- none: the images as they are;
- weak: RandomResizedCrop(scale 0.5–1) + horizontal flip;
- strong: MoCo v2's aug-plus (crop 0.2–1, ColorJitter(0.4, 0.4, 0.4, 0.1) w.p. 0.8, grayscale
  w.p. 0.2, blur w.p. 0.5, flip).

Each condition gets a 2-D embedding by scikit-learn's TSNE (PCA init, a fixed seed), drawn as one
panel of ``tsne.png``, coloured by class. So that the claim "classes collapse under strong
augmentation" is a number and not only a picture, the silhouette score of the classes in the
L2-normalised features (cosine distance; 1 is perfectly separated, 0 is overlapping) is logged per
condition: ``silhouette_none``, ``silhouette_weak``, ``silhouette_strong``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from trainers.augment import AugmentParams, augment, eval_view
from trainers.data import load_split
from trainers.files import atomic_write
from trainers.loop import device
from trainers.pretrain import load_backbone
from trainers.results import EvalResult, PretrainResult
from trainers.sink import Sink

if TYPE_CHECKING:
    from pipeline.spec import StageConfig

CONDITIONS = {
    "none": None,
    "weak": AugmentParams(crop_scale=(0.5, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
    "strong": AugmentParams(),
}


@torch.no_grad()
def features(backbone: torch.nn.Module, images: torch.Tensor, aug: AugmentParams | None, size: int,
             g: torch.Generator) -> torch.Tensor:
    """L2-normalised features (N×C, float32, CPU) of uint8 images (N×3×H×W) in the view ``aug``
    draws at ``size`` pixels with ``g``; the evaluation view when ``aug`` is None."""
    dev = next(backbone.parameters()).device
    x = images.to(dev)
    view = eval_view(x, AugmentParams()) if aug is None else augment(x, aug, size, g)
    return F.normalize(backbone(view).float(), dim=1).cpu()


def tsne(cfg: StageConfig, upstream: PretrainResult, workdir: Path, sink: Sink) -> EvalResult:
    """Reads ``cfg.dataset``, ``cfg.backbone`` and ``cfg.tsne``; ``upstream``: the pretraining
    stage's result (its ``checkpoint``). Writes ``tsne.png`` (one panel per condition, 4×4 inches at
    ``dpi``) and its result's metrics are ``samples`` and ``silhouette_<condition>`` (in [-1, 1]). Raises DataError
    (trainers/data.py) for unreadable data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    p = cfg.tsne
    backbone = load_backbone(cfg, upstream.checkpoint).to(device())
    val = load_split(cfg.dataset, "val")
    g = torch.Generator().manual_seed(p.seed)
    pick = torch.randperm(len(val.labels), generator=g)[:p.samples]
    images, labels = val.images[pick], val.labels[pick]
    fig, axes = plt.subplots(1, len(CONDITIONS), figsize=(4 * len(CONDITIONS), 4), dpi=p.dpi)
    result: dict = {"samples": int(len(labels))}
    for ax, (name, aug) in zip(axes, CONDITIONS.items()):
        feats = features(backbone, images, aug, cfg.dataset.image_size, g)  # N×C
        sil = float(silhouette_score(feats.numpy(), labels.numpy(), metric="cosine"))
        result[f"silhouette_{name}"] = sil
        emb = TSNE(n_components=2, perplexity=min(p.perplexity, (len(labels) - 1) / 3), init="pca",
                   random_state=p.seed).fit_transform(feats.numpy())
        ax.scatter(emb[:, 0], emb[:, 1], c=labels.numpy(), cmap="tab10", s=6)
        ax.set_title(f"{name} augmentation · silhouette {sil:.2f}", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    out = Path(workdir) / "tsne.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    sink.log({k: v for k, v in result.items() if k.startswith("silhouette")}, step=0)
    sink.progress(1, 1)
    return EvalResult.of(result)
