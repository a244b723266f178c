"""MoCo v1 (He et al. 2020, arXiv 1911.05722): MoCo v2's model with v1's recipe.

facebookresearch/moco@7397dfe main_moco.py without ``--mlp/--aug-plus/--cos``: T 0.07, a linear
(fc) head, step lr x0.1 at epochs 120 and 160, ColorJitter(0.4, 0.4, 0.4, 0.4) always applied, no blur.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainers.methods import mocov2
from trainers.methods.base import HeadSpec, Method, param


@dataclass(frozen=True)
class Config(mocov2.Config):
    T: float = param(0.07, min=1e-6, doc="softmax temperature")
    head: HeadSpec = HeadSpec(kind="linear")


PRESET = {"schedule": "step", "milestones": (120, 160),
          "augment": {"color_jitter": (0.4, 0.4, 0.4, 0.4), "color_p": 1.0, "blur": False}}

METHOD = Method(name="mocov1", title="MoCo", source="facebookresearch/moco@7397dfe main_moco.py", config=Config,
                preset=PRESET, build="trainers.methods.mocov2:build", negatives="queue", cost_units=4,
                head_prefix="encoder_q.head.", shuffle_bn=True)
