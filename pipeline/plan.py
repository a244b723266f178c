"""Cells → stages with identities; two cells that need the same stage share it.

A stage's identity (after dora's ``_get_sig``, but over the *full resolved* spec rather than its
diff from defaults, so editing a default cannot silently change what an old identity means) is the
first 12 hex digits of sha1 over canonical JSON of: the schema version, the stage kind, the
identity fields of its spec (pipeline/spec.py marks the others), and its upstream identities.

Layout: ``<workdir>/<kind>/<identity>/`` with ``spec.json``, ``checkpoints/``, ``result.json`` and
``DONE`` (written last), plus ``progress.json`` and ``status.json`` while it runs or after it failed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.grid import Grid
from pipeline.spec import dataset_identity, pretrain_identity, to_dict
from pipeline.stages import ROOT, STAGE_KINDS, StageConfig, gpu_hours
from trainers.files import StageDir

SCHEMA_VERSION = 1


@dataclass
class Stage:
    kind: str
    key: str
    config: StageConfig  # what the stage function receives (typed, frozen)
    spec: dict  # its JSON view (spec.json, MLflow params): the sections this stage reads, all fields
    identity: dict  # what the key hashes
    upstream: tuple[str, ...]
    cells: list[str] = field(default_factory=list)
    values: dict[str, set] = field(default_factory=dict)  # dotted key → values of the cells that use it

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.key}"

    def directory(self, workdir: Path) -> StageDir:
        """``<workdir>/<kind>/<key>/``, whose files trainers/files.py ``StageDir`` names."""
        return StageDir(Path(workdir) / self.kind / self.key)


@dataclass
class Plan:
    grid: Grid
    stages: dict[str, Stage]  # key → stage, in topological order
    cells: dict[str, dict[str, str]]  # cell name → {stage kind: key}
    naive_count: int

    def ordered(self) -> list[Stage]:
        return list(self.stages.values())


def identity_key(kind: str, identity: dict, upstream: tuple[str, ...]) -> str:
    payload = {"schema": SCHEMA_VERSION, "kind": kind, "spec": identity, "upstream": list(upstream)}
    canon = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(canon.encode()).hexdigest()[:12]


def _pretrain_stage(cfg: StageConfig) -> Stage:
    spec = {"dataset": to_dict(cfg.dataset), "backbone": to_dict(cfg.backbone), ROOT: to_dict(cfg.pretrain)}
    ident = {"dataset": dataset_identity(cfg.dataset), "backbone": to_dict(cfg.backbone, True),
             ROOT: pretrain_identity(cfg.pretrain)}
    if not cfg.pretrain.record.trains:
        # a random init needs no data: its identity is the backbone and the seed alone
        ident.pop("dataset")
    return Stage(ROOT, identity_key(ROOT, ident, ()), cfg, spec, ident, ())


def _eval_stage(kind: str, cfg: StageConfig, upstream: Stage) -> Stage:
    section = getattr(cfg, kind)
    # the pretrain section rides along for stages that rebuild the head (inversion); the identity
    # has it through the upstream key
    spec = {"dataset": to_dict(cfg.dataset), "backbone": to_dict(cfg.backbone), ROOT: to_dict(cfg.pretrain),
            kind: to_dict(section)}
    ident = {"dataset": dataset_identity(cfg.dataset), kind: to_dict(section, True)}
    return Stage(kind, identity_key(kind, ident, (upstream.key,)), cfg, spec, ident, (upstream.key,))


def build_plan(grid: Grid) -> Plan:
    stages: dict[str, Stage] = {}
    cells: dict[str, dict[str, str]] = {}
    naive = 0
    for cell in grid.cells:
        pre = _pretrain_stage(cell.config)
        chain = [pre] + [_eval_stage(kind, cell.config, pre) for kind in grid.evaluations if grid.evaluates(kind, cell)]
        naive += len(chain)
        cells[cell.name] = {}
        for stage in chain:
            stage = stages.setdefault(stage.key, stage)
            stage.cells.append(cell.name)
            for k, v in cell.values.items():
                stage.values.setdefault(k, set()).add(json.dumps(v) if not isinstance(v, str) else v)
            cells[cell.name][stage.kind] = stage.key
    return Plan(grid, stages, cells, naive)


def describe(plan: Plan) -> list[dict[str, Any]]:
    """One row per stage, for ``sslgrid plan``: its kind's summary (pipeline/stages.py), precision,
    processes, GPUs and estimated GPU-hours."""
    rows = []
    for s in plan.ordered():
        res = plan.grid.resources[s.kind]
        kind = STAGE_KINDS[s.kind]
        detail = kind.summary(s.config)
        precision = getattr(getattr(s.config, s.kind), "precision", None)
        if precision and (s.kind != ROOT or s.config.pretrain.record.trains):
            detail += f" {precision}"
        hours = gpu_hours(s.kind, s.config)
        n = res.process_count()
        gpus = "auto" if res.gpus is None else f"{res.gpus / n:g}"
        wall = "?" if hours is None or not res.gpus else f"{hours / res.gpus:.3g}"
        rows.append({"stage": s.kind, "key": s.key, "after": ",".join(s.upstream) or "-", "what": detail,
                     "cells": ", ".join(s.cells), "cpus": res.cpus, "procs x GPUs": f"{n} x {gpus}",
                     "GPU-h": "?" if hours is None else f"{hours:.3g}", "wall-h": wall})
    return rows
