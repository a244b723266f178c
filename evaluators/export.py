"""Export a pretrained backbone for detectron2 users.

detectron2's ResNet names its parts ``stem.conv1`` (with ``.norm`` for its BN) and ``res2``…``res5``
(torchvision's layer1…layer4), each block's BNs ``convN.norm`` and its projection ``shortcut`` (with
``shortcut.norm``). The pickle holds numpy arrays under ``model``, with ``matching_heuristics``
set, the format moco's detection/convert-pretrain-to-detectron2.py writes and detectron2's
checkpointer reads (``MODEL.WEIGHTS out.pkl``).
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

from trainers import checkpoint
from trainers.files import atomic_write

TORCHVISION_RESNETS = ("resnet18", "resnet50")


class ExportError(Exception):
    """The checkpoint cannot be exported; the message says why and what would work."""


def detectron2_name(name: str) -> str:
    """A torchvision ResNet parameter name (``conv1.weight``, ``layer1.0.bn2.bias``, ...) → detectron2's."""
    if not name.startswith("layer"):
        name = "stem." + name
    name = re.sub(r"layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", name)
    name = re.sub(r"bn(\d)", r"conv\1.norm", name)
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def to_detectron2(ckpt: str | Path, out: str | Path) -> dict[str, tuple[int, ...]]:
    """Write ``out`` from a pretraining checkpoint (``checkpoints/final.pt``); returns name → shape."""
    state = checkpoint.load(ckpt)
    if "backbone" not in state:
        raise ExportError(f"{ckpt}: not a pretraining checkpoint (no 'backbone'); pass <stage dir>/checkpoints/final.pt")
    weights = state["backbone"]
    if not all(k.startswith("net.") for k in weights):
        raise ExportError(f"{ckpt}: detectron2 has no counterpart of this backbone; export works for "
                          f"{', '.join(TORCHVISION_RESNETS)} (backbone.name)")
    model = {detectron2_name(k.removeprefix("net.")): v.detach().cpu().numpy()
             for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    with atomic_write(out) as tmp, open(tmp, "wb") as f:
        pickle.dump({"model": model, "__author__": "sslgrid", "matching_heuristics": True}, f)
    return {k: tuple(v.shape) for k, v in model.items()}
