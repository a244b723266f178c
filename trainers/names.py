"""The names a grid file may choose among, without importing torch, so that pipeline/spec.py can
validate a grid on a machine that has no torch (a login node). The modules that build these read
the same tuples: trainers/backbones.py, trainers/heads.py, trainers/optim.py."""
from __future__ import annotations

BACKBONES = ("tiny_resnet", "resnet18", "resnet50")
HEADS = ("none", "linear", "mlp", "frozen", "deep", "narrow")
OPTIMIZERS = ("sgd", "lars")
