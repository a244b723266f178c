"""Grid file → validated cells. Nothing here starts anything.

A grid file (YAML)::

    name: quickstart                 # MLflow experiment and default work directory runs/<name>
    workdir: runs/quickstart         # optional
    tracking_uri: sqlite:///mlflow.db  # optional; MLflow's own default
    defaults:                        # the base configuration of every cell (pipeline/spec.py StageConfig)
      dataset: {name: synthetic}
      pretrain: {method: mocov2, epochs: 6}
    axes:                            # dotted keys → lists of values; cartesian product
      pretrain.head.kind: [mlp, none]
    cells:                           # explicit extra cells (not crossed with the axes)
      - {name: random-init, pretrain.method: none}
    seeds: [0, 1, 2]                 # optional: every cell once per seed (or ``repeats: 3``, seeds 0..2);
                                     # a study may set its own
    evaluations: [linear_probe]      # stages that follow every pretraining; or a mapping from
                                     # stage to ``all`` or to the cells it follows:
                                     #   {linear_probe: all, detection: [head.kind=mlp, random-init]}
    resources:                       # per stage kind
      pretrain: {cpus: 1, gpus: 0}
    cluster:                         # SLURM requests (--backend slurm): a default, then per stage kind
      default: {partition: gpu, timeout_min: 240, mem_gb: 32}
      pretrain: {gpus_per_node: 1, cpus_per_task: 10, timeout_min: 4320}

Command-line overrides (``-o pretrain.epochs=2``) set a field everywhere: in ``defaults`` and in
every axis or cell that sets the same key. Keys outside ``defaults`` (``name``, ``workdir``,
``resources.pretrain.cpus``...) set the grid's own fields.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.spec import (MAX_SEED, Problem, Resources, SlurmSpec, build_dataclass, build_stage_config, flatten,
                           resolve_precision)
from pipeline.sequential import Design
from pipeline.stages import DEFAULT_EVALUATIONS, EVALUATIONS, ROOT, STAGE_KINDS, StageConfig, process_problems

TOP_KEYS = ("name", "description", "workdir", "tracking_uri", "defaults", "axes", "cells", "studies", "evaluations",
            "resources", "cluster", "seeds", "repeats", "decide")
STUDY_KEYS = ("defaults", "axes", "cells", "description", "seeds", "repeats")
REPLICATE = "@seed="  # a replicate's name: <cell>@seed=<seed>
KINDS = tuple(STAGE_KINDS)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class GridError(Exception):
    """Invalid grid input. Its text names the file, each bad field, its value and the fix."""

    def __init__(self, source: str, problems: list[tuple[str, Problem]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {where}{p}" for where, p in problems]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Cell:
    """One run of one cell of the grid: with several seeds (``seeds:``/``repeats:``), one replicate.

    ``name`` is unique in the grid (a replicate's is ``<base>@seed=<seed>``); ``base`` is the cell's
    name as the grid file and ``evaluations:`` give it, shared by its replicates; ``seed`` is the
    replicate's seed (every section's ``seed``), None when the grid gives no seeds."""

    name: str
    config: StageConfig
    values: dict[str, Any]  # the dotted keys this cell sets (its axis values and explicit values)
    study: str = ""  # the named study it belongs to ("" for the grid's top-level axes and cells)
    base: str = ""  # "" means ``name``
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.base:
            object.__setattr__(self, "base", self.name)


@dataclass(frozen=True)
class Grid:
    name: str
    path: Path
    description: str
    workdir: Path
    tracking_uri: str
    cells: tuple[Cell, ...]
    evaluations: tuple[str, ...]
    resources: dict[str, Resources]
    cluster: dict[str, SlurmSpec]  # "default" and stage kinds
    evaluation_cells: dict[str, frozenset[str]] = None  # evaluations that follow only these cells
    decide: Design = Design()  # the ``decide:`` section: how ``sslgrid run --decide`` spends seeds
    only_studies: tuple[str, ...] = ()  # ``--study``: the grid was loaded with only these studies' cells
    seeded: bool = False  # the grid file (or -o) gives seeds/repeats

    def evaluates(self, kind: str, cell: Cell | str) -> bool:
        """Whether evaluation ``kind`` follows ``cell`` (a Cell, or a cell's base name)."""
        base = cell.base if isinstance(cell, Cell) else cell
        return kind in self.evaluations and (not self.evaluation_cells or kind not in self.evaluation_cells
                                             or base in self.evaluation_cells[kind])

    def replicates(self) -> dict[str, tuple[Cell, ...]]:
        """Base cell name → its replicates (one per seed; one Cell for a grid without seeds), in grid order."""
        out: dict[str, list[Cell]] = {}
        for c in self.cells:
            out.setdefault(c.base, []).append(c)
        return {k: tuple(v) for k, v in out.items()}

    @property
    def seed_counts(self) -> set[int]:
        """The distinct numbers of replicates per base cell ({1} without seeds)."""
        return {len(r) for r in self.replicates().values()}


def head_of(key: str) -> str:
    return key.split(".", 1)[0]


def unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(key)
        node[parts[-1]] = value
    return out


def load_yaml(text: str) -> Any:
    """YAML 1.2 (ruamel.yaml's safe loader), the version other tools and papers' configs assume.

    PyYAML reads YAML 1.1, whose implicit typing changes what people write: ``1e-4`` is a string,
    ``on``/``yes``/``no`` are booleans, ``010`` is 8 and ``1:30`` is 90. Under 1.2 numbers are numbers,
    only ``true``/``false`` are booleans and everything else stays the string it reads as. A key
    written twice in one mapping is an error, not a silent override. Raises ruamel.yaml's YAMLError."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def _yaml_message(err: Exception) -> str:
    text = str(err).replace('"<unicode string>", ', "")
    return text.split("\nTo suppress this check", 1)[0].strip()


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise GridError("command line", [("", Problem(f"-o {text}", text, "expected -o dotted.key=value, e.g. -o pretrain.epochs=2"))])
    key, value = text.split("=", 1)
    from ruamel.yaml import YAMLError

    try:
        return key.strip(), load_yaml(value)
    except YAMLError as err:
        raise GridError("command line", [("", Problem(f"-o {text}", value, f"not a valid YAML value: "
                                                      f"{_yaml_message(err)}; quote it"))]) from None


def _absolute_uri(uri: str, base: Path) -> str:
    """A relative sqlite path is resolved against the driver's directory, so Ray workers (which may
    start elsewhere) write to the same store."""
    prefix = "sqlite:///"
    if ":" not in uri.split("/", 1)[0]:  # a plain path: MLflow's file store
        return str((base / Path(uri).expanduser()).resolve())
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str((base / Path(uri[len(prefix):]).expanduser()).resolve())
    return uri


def load_grid(path: str | Path, overrides: list[str] = (), workdir: str | None = None,
              tracking_uri: str | None = None, only_studies: list[str] = ()) -> Grid:
    """Read, validate and resolve a grid file: every cell's frozen StageConfig, its evaluations,
    resources and SLURM requests. ``overrides`` are ``-o KEY=VALUE`` texts (a cell field, or a
    top-level key such as ``resources.pretrain.gpus``); ``only_studies`` keeps those studies' cells.
    Raises GridError listing every problem found, each naming the field and where it was set."""
    path = Path(path)
    source = str(path)
    doc = _read(path)
    cfg_over, cli_top = _apply_overrides(doc, overrides)
    problems = _Problems()
    name = _check_top_level(doc, path, problems)
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.add("", Problem("defaults", defaults, "must be a mapping with dataset/backbone/pretrain/linear_probe"))
        defaults = {}
    defaults = _nested(defaults, "defaults", problems.items)
    raw_cells, all_names = _raw_cells(doc, only_studies, problems, cli_top)
    cells = _build_cells(raw_cells, defaults, cfg_over, problems)
    cells = _replicate(cells, raw_cells, defaults, cfg_over, problems)
    evaluations, evaluation_cells = _evaluations(doc.get("evaluations", list(DEFAULT_EVALUATIONS)), all_names,
                                                 problems.items)
    resources, cluster = _resources(doc, problems)
    design = _decide(doc.get("decide"), problems)
    for cell in cells:
        for p in process_problems(cell.config, resources):
            problems.add(_origin(p.field, cell.values, {}, set(cfg_over)), p)
    cells = [dataclasses.replace(c, config=resolve_precision(c.config, resources)) for c in cells]
    if problems.items:
        raise GridError(source, problems.items)
    base = Path.cwd()
    wd = Path(workdir or doc.get("workdir") or Path("runs") / name).expanduser()
    uri = tracking_uri or doc.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return Grid(name=name, path=path, description=str(doc.get("description", "")),
                workdir=(base / wd).resolve(), tracking_uri=_absolute_uri(uri, base), cells=tuple(cells),
                evaluations=evaluations, resources=resources, cluster=cluster, evaluation_cells=evaluation_cells,
                decide=design, only_studies=tuple(only_studies),
                seeded=any(c[-1] is not None for c in raw_cells))


class _Problems:
    """Problems found so far, each once, with where it was set ("" or "cell X: ")."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Problem]] = []
        self._seen: set[tuple[str, str, str]] = set()

    def add(self, origin: str, problem: Problem) -> None:
        if (origin, problem.field, problem.message) not in self._seen:
            self._seen.add((origin, problem.field, problem.message))
            self.items.append((origin, problem))


def _read(path: Path) -> dict:
    """The grid file's YAML document. Raises GridError for a missing, unreadable or invalid file."""
    from ruamel.yaml import YAMLError

    source = str(path)
    try:
        doc = load_yaml(path.read_text())
    except FileNotFoundError:
        raise GridError(source, [("", Problem("<file>", str(path), "no such file; pass the path of a grid YAML file"))]) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise GridError(source, [("", Problem("<file>", str(path), f"cannot be read ({err}); pass the path of a "
                                                                  f"grid YAML file"))]) from None
    except YAMLError as err:
        raise GridError(source, [("", Problem("<yaml>", None, f"not valid YAML: {_yaml_message(err)}"))]) from None
    if not isinstance(doc, dict):
        raise GridError(source, [("", Problem("<top>", doc, "a grid file is a mapping with keys " + ", ".join(TOP_KEYS)))])
    return doc


def _apply_overrides(doc: dict, overrides: list[str]) -> tuple[dict[str, Any], set[str]]:
    """Write ``-o`` values of top-level keys into ``doc``; return those of cell fields (dotted key →
    value), which apply to every cell over its own values, and the top-level keys given."""
    top_over: dict[str, Any] = {}
    cfg_over: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        head = key.split(".", 1)[0]
        (top_over if head in TOP_KEYS and head != "defaults" else cfg_over)[key.removeprefix("defaults.")] = value
    if {"seeds", "repeats"} <= set(top_over):
        raise GridError("command line", [("", Problem("-o seeds", top_over["seeds"], f"and -o repeats "
                                                      f"({top_over['repeats']}) are both given; keep one"))])
    for key, value in top_over.items():
        if key in ("seeds", "repeats"):
            # -o sets it everywhere, as any -o does: the file's seeds or repeats, the grid's and every study's, go
            for section in [doc] + [sd for sd in (doc.get("studies") or {}).values() if isinstance(sd, dict)]:
                section.pop("seeds", None)
                section.pop("repeats", None)
        if key.startswith("studies."):
            _set_in_study(doc, key, value)
        elif key.startswith(("resources.", "cluster.", "decide.")):
            node = doc.setdefault(head_of(key), {})
            parts = key.split(".")[1:]
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        else:
            doc[key] = value
    return cfg_over, set(top_over)


def _set_in_study(doc: dict, key: str, value: Any) -> None:
    """``-o studies.<study>.<key>[.<dotted field>]=value``: e.g. ``studies.table1.repeats=5`` or
    ``studies.table2b.defaults.pretrain.augment.color_p=0.5`` (a study's defaults and axes take
    dotted fields as they are). Raises GridError for a study the file does not have."""
    parts = key.split(".", 3)
    studies = doc.get("studies") if isinstance(doc.get("studies"), dict) else {}
    if len(parts) < 3 or parts[1] not in studies or not isinstance(studies[parts[1]], dict):
        close = difflib.get_close_matches(parts[1] if len(parts) > 1 else "", list(studies), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise GridError("command line", [("", Problem(f"-o {key}", value, f"{hint}expected -o studies.<study>.<key>=value "
                                                      f"with a study of the file: {', '.join(studies) or 'none'}"))])
    study = studies[parts[1]]
    if len(parts) == 3:
        study[parts[2]] = value
    else:
        section = study.setdefault(parts[2], {})
        if isinstance(section, dict):
            section[parts[3]] = value


def _check_top_level(doc: dict, path: Path, problems: _Problems) -> Any:
    """Unknown top-level keys, and the grid's name (default: the file's stem), which is returned."""
    for key in doc:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(TOP_KEYS)}"
            problems.add("", Problem(str(key), doc[key], f"unknown top-level key; {hint}"))
    name = doc.get("name") or path.stem
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        problems.add("", Problem("name", name, "must be letters, digits, '-' or '_' (it names the experiment and folder)"))
    return name


def _raw_cells(doc: dict, only_studies: list[str], problems: _Problems, cli: set[str] = frozenset()
               ) -> tuple[list[tuple], list[str]]:
    """(name, study, values, where, seeds) of every cell of the grid and its studies, those of
    ``only_studies`` when given; and the names of all cells (evaluations may name any of them).
    ``seeds``: the study's ``seeds``/``repeats``, else the grid's, else None."""
    top_seeds = _seeds(doc, "", problems, cli)
    raw_cells = [(*c, top_seeds) for c in _expand(doc, "", problems.items)]
    studies = doc.get("studies") or {}
    if not isinstance(studies, dict):
        problems.add("", Problem("studies", studies, "must map study names to {defaults, axes, cells}"))
        studies = {}
    for sname, sdoc in studies.items():
        if not isinstance(sdoc, dict) or set(sdoc) - set(STUDY_KEYS):
            problems.add("", Problem(f"studies.{sname}", sdoc, f"a study is a mapping with {', '.join(STUDY_KEYS)}"))
            continue
        seeds = _seeds(sdoc, f"studies.{sname}.", problems)
        seeds = top_seeds if seeds is None else seeds
        raw_cells += [(*c, seeds) for c in _expand(sdoc, str(sname), problems.items)]
    if not raw_cells:
        raw_cells.append(("default", "", {}, {}, top_seeds))
    all_names = [c[0] for c in raw_cells]
    if only_studies:
        known = sorted({c[1] for c in raw_cells if c[1]})
        for name in only_studies:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                problems.add("", Problem("--study", name, f"{hint}studies in this grid: {', '.join(known) or 'none'}"))
        raw_cells = [c for c in raw_cells if c[1] in only_studies]
    names = [c[0] for c in raw_cells]
    for n in names:
        if REPLICATE in n:
            problems.add("", Problem("cells", n, f"a cell's name may not contain '{REPLICATE}', which names the "
                                     f"replicates of a cell with seeds; rename it"))
    for dup in _duplicates(names):
        problems.add("", Problem("cells", dup, "two cells share this name; give each a distinct name:"))
    return raw_cells, all_names


def _duplicates(names: list[str]) -> list[str]:
    """The names that occur more than once, sorted; counted once each (``list.count`` per name was
    cells² comparisons: 0.25 s at 5,000 cells here, growing with their square)."""
    return sorted(n for n, k in Counter(names).items() if k > 1)


def _build_cells(raw_cells: list[tuple], defaults: dict, cfg_over: dict[str, Any], problems: _Problems) -> list[Cell]:
    """Each cell's values over the defaults, ``-o`` values over both, built into a StageConfig."""
    cells: list[Cell] = []
    for label, study, values, where, _ in raw_cells:
        for key in ("seeds", "repeats"):
            if key in values:
                problems.add(f"cell {label}: ", Problem(key, values.pop(key), "is not a cell field: give seeds or "
                                                        "repeats at the grid's top level or in a study"))
        values = {**values, **{k: v for k, v in cfg_over.items() if k in values}}
        try:
            raw = _merge_flat(defaults, {**values, **cfg_over})
        except ValueError as err:
            problems.add("", Problem(str(err), None, "a key cannot be both a value and a section"))
            continue
        cell_problems: list[Problem] = []
        config = build_stage_config(raw, cell_problems)
        for p in cell_problems:
            problems.add(_origin(p.field, values, where, set(cfg_over)), p)
        if config is not None:
            cells.append(Cell(label, config, values, study))
    return cells


MAX_REPEATS = 1000  # replicates of one cell; more is a typo, not a study


def _seeds(section: dict, at: str, problems: _Problems, cli: set[str] = frozenset()) -> list[int] | None:
    """A grid's or study's replicate seeds: ``seeds: [0, 1, 2]`` (distinct integers in 0..MAX_SEED)
    or ``repeats: N`` (seeds 0..N-1, N <= MAX_REPEATS); None when it gives neither; the study's win
    over the grid's (``-o`` sets them everywhere). ``cli``: the keys given with ``-o``."""
    seeds, repeats = section.get("seeds"), section.get("repeats")
    origin = "-o: " if {"seeds", "repeats"} & cli and not at else ""
    if seeds is not None and repeats is not None:
        problems.add(origin, Problem(f"{at}seeds", seeds, f"and {at}repeats ({repeats}) are both set; keep one "
                                     f"(repeats: N means seeds: [0, ..., N-1])"))
        return None
    if repeats is not None:
        if isinstance(repeats, bool) or not isinstance(repeats, int) or not 1 <= repeats <= MAX_REPEATS:
            problems.add(origin, Problem(f"{at}repeats", repeats, f"must be a whole number from 1 to {MAX_REPEATS} "
                                         f"(runs of every cell, seeds 0..N-1)"))
            return None
        return list(range(repeats))
    if seeds is None:
        return None
    if (not isinstance(seeds, list) or not seeds or len(seeds) > MAX_REPEATS
            or any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= MAX_SEED for x in seeds)):
        problems.add(origin, Problem(f"{at}seeds", seeds, f"must be a list of 1 to {MAX_REPEATS} whole numbers "
                                     f"from 0 to {MAX_SEED}, e.g. [0, 1, 2]"))
        return None
    if len(set(seeds)) != len(seeds):
        problems.add(origin, Problem(f"{at}seeds", seeds, "lists a seed twice; each seed is one replicate"))
        return None
    return list(seeds)


def _seed_fields(cfg: StageConfig) -> list[str]:
    """The sections whose ``seed`` a replicate sets: the pretraining and every evaluation that has
    one (not ``dataset.seed``, which draws the synthetic set: every replicate sees the same data)."""
    return [k for k in STAGE_KINDS if "seed" in {f.name for f in dataclasses.fields(getattr(cfg, k))}]


def _replicate(cells: list[Cell], raw_cells: list[tuple], defaults: dict, cfg_over: dict[str, Any],
               problems: _Problems) -> list[Cell]:
    """Each cell once per seed of its study (or of the grid): the replicate's every section ``seed``
    is that seed, so seed 0 is the stage a grid without seeds runs. A grid that sets a section's
    ``seed`` itself and also gives seeds is refused: which one would count is not clear."""
    seeds_of = {(label, study): seeds for label, study, *_, seeds in raw_cells}
    where_of = {(label, study): where for label, study, _, where, _ in raw_cells}
    out: list[Cell] = []
    flat_defaults = flatten(defaults)
    for cell in cells:
        seeds = seeds_of.get((cell.name, cell.study))
        if seeds is None:
            out.append(cell)
            continue
        fields = _seed_fields(cell.config)
        set_here = [f"{k}.seed" for k in fields
                    if f"{k}.seed" in cell.values or f"{k}.seed" in flat_defaults or f"{k}.seed" in cfg_over]
        for field_name in set_here:  # each place that sets one, named
            given = {**flat_defaults, **cell.values, **cfg_over}[field_name]
            origin = _origin(field_name, cell.values, where_of[(cell.name, cell.study)], set(cfg_over))
            problems.add(origin, Problem(field_name, given, f"is set, and the grid also gives seeds/repeats, which "
                                         f"set {', '.join(f + '.seed' for f in fields)} of every replicate; remove "
                                         f"one of the two"))
        if set_here:
            continue
        for seed in seeds:
            config = dataclasses.replace(cell.config, **{
                k: dataclasses.replace(getattr(cell.config, k), seed=seed) for k in fields})
            name = cell.name if len(seeds) == 1 else f"{cell.name}{REPLICATE}{seed}"
            out.append(Cell(name, config, {**cell.values, f"{ROOT}.seed": seed}, cell.study, cell.name, seed))
    names = [c.name for c in out]
    for dup in _duplicates(names):
        problems.add("", Problem("cells", dup, "two replicates share this name; rename one of the cells"))
    return out


def _resources(doc: dict, problems: _Problems) -> tuple[dict[str, Resources], dict[str, SlurmSpec]]:
    """``resources`` (every stage kind gets one; unset: the defaults) and ``cluster`` (SLURM requests).

    A stage with GPUs runs at most one process per GPU: NCCL refuses two ranks on one device at the
    first collective, long after launch, so ``processes`` above ``gpus`` is refused here (one process
    on a fraction of a GPU has no collective and stays allowed). A stage
    without GPUs (``gpus: 0``) may run any number of processes (gloo). ``gpus: null`` is resolved
    when the grid runs (1 GPU where the backend has one, else 0): pipeline/execute.py and
    pipeline/slurm.py check it then, before anything is launched."""
    resources = _per_kind(doc, "resources", Resources, KINDS, "{cpus, gpus, processes}", problems.items)
    for kind in KINDS:
        resources.setdefault(kind, Resources())
    cluster = _per_kind(doc, "cluster", SlurmSpec, ("default",) + KINDS, "SLURM requests", problems.items)
    for kind, res in resources.items():
        if res.gpus and res.processes and res.processes > 1 and res.processes > res.gpus:
            whole = max(1, int(res.gpus))
            problems.add("", Problem(f"resources.{kind}.processes", res.processes,
                                     f"more processes than the stage's {_count(res.gpus, 'GPU')}; each process needs a "
                                     f"GPU of its own (NCCL refuses two ranks on one device). Set processes to "
                                     f"{whole}{' or fewer' if whole > 1 else ''}, raise resources.{kind}.gpus to "
                                     f"{res.processes}, or set resources.{kind}.gpus to 0 to run the {res.processes} "
                                     f"processes on CPUs"))
        elif res.gpus and res.processes and res.gpus / res.processes > 1 and not (res.gpus / res.processes).is_integer():
            shown = int(res.gpus) if float(res.gpus).is_integer() else res.gpus  # 8, not 8.0
            problems.add("", Problem(f"resources.{kind}.gpus", shown, _gpu_split(kind, res.gpus, res.processes)))
    return resources, cluster


def _count(n: float, noun: str) -> str:
    """``1 GPU``, ``2 GPUs``, ``1.5 GPUs`` (``:g``: no ``3.0``)."""
    return f"{n:g} {noun}" + ("" if n == 1 else "s")


def _gpu_split(kind: str, gpus: float, processes: int) -> str:
    """Why ``gpus`` GPUs (more than one per process, not a whole number each) cannot be given to
    ``processes`` processes, and the settings that can: each process gets whole GPUs (or, alone,
    a fraction of one)."""
    per = gpus / processes
    low, high = math.floor(per), math.ceil(per)
    if processes == 1:
        return (f"one process gets a fraction of one GPU or whole GPUs, not {_count(gpus, 'GPU')}: set "
                f"resources.{kind}.gpus to {low} or {high}, or below 1 to share a GPU")
    fix = (f"set resources.{kind}.gpus to a multiple of {processes} ({low * processes} or {high * processes}, "
           f"{_count(low, 'GPU')} or {high} per process)")
    if float(gpus).is_integer():
        divisors = [d for d in range(2, int(gpus) + 1) if int(gpus) % d == 0]
        fix += f", or resources.{kind}.processes to {' or '.join(map(str, divisors))} (dividing {gpus:g})"
    return (f"cannot be shared by the {processes} processes ({per:.3g} GPUs each): each process gets whole GPUs; "
            f"{fix}")


def _evaluations(node: Any, cell_names: list[str], problems: list[tuple[str, Problem]]
                 ) -> tuple[tuple[str, ...], dict[str, frozenset[str]]]:
    """``evaluations``: a list of stage kinds that follow every cell, or a mapping from stage kind to
    ``all`` or to a list of the cell names (as ``sslgrid plan`` shows them) it follows."""
    fields: dict = {}
    if isinstance(node, list):
        fields = {ev: f"evaluations[{i}]" for i, ev in enumerate(node) if isinstance(ev, str)}
        node = {ev: "all" for ev in node} if len(fields) == len(node) else node
    if not isinstance(node, dict):
        problems.append(("", Problem("evaluations", node, "must be a list, e.g. [linear_probe], or a mapping "
                                     "from stage to 'all' or to a list of cells, e.g. {detection: [random-init]}")))
        return (), {}
    kinds, only = [], {}
    for ev, which in node.items():
        if ev not in EVALUATIONS:
            close = difflib.get_close_matches(str(ev), EVALUATIONS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(("", Problem(fields.get(ev, f"evaluations.{ev}"), ev, f"{hint}valid stages: {', '.join(EVALUATIONS)}")))
            continue
        kinds.append(ev)
        if which == "all":
            continue
        if not isinstance(which, list) or not which:
            problems.append(("", Problem(f"evaluations.{ev}", which, "must be 'all' or a non-empty list of cell names")))
            continue
        for name in which:
            if name not in cell_names:
                close = difflib.get_close_matches(str(name), cell_names, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                if REPLICATE in str(name) and str(name).split(REPLICATE)[0] in cell_names:
                    hint = (f"name the cell without '{REPLICATE}…' ('{str(name).split(REPLICATE)[0]}'): an evaluation "
                            f"follows every seed of the cells it names. ")
                problems.append(("", Problem(f"evaluations.{ev}", name, f"{hint}no such cell; cells: {', '.join(cell_names)}")))
        only[ev] = frozenset(map(str, which))
    return tuple(kinds), only


def _per_kind(doc: dict, section: str, cls: type, keys: tuple[str, ...], what: str,
              problems: list[tuple[str, Problem]]) -> dict:
    """A top-level section that maps stage kinds (or ``keys``) to ``cls`` values, e.g. ``resources``."""
    out: dict = {}
    node = doc.get(section) or {}
    if not isinstance(node, dict):
        problems.append(("", Problem(section, node, f"must map {', '.join(keys)} to {what}")))
        return out
    for kind, spec in node.items():
        if kind not in keys:
            close = difflib.get_close_matches(str(kind), keys, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(("", Problem(f"{section}.{kind}", spec, f"{hint}keys: {', '.join(keys)}")))
            continue
        sub: list[Problem] = []
        built = build_dataclass(cls, spec, f"{section}.{kind}", sub)
        problems.extend(("", p) for p in sub)
        if built is not None:
            out[kind] = built
    return out


def _expand(section: dict, study: str, problems: list[tuple[str, Problem]]
            ) -> list[tuple[str, str, dict[str, Any], dict[str, str]]]:
    """A section's axes (cartesian product) and cells → (name, study, {dotted key: value},
    {dotted key: where it was set}). A study's own ``defaults`` apply under its cells' values."""
    at = f"studies.{study}." if study else ""
    prefix = f"{study}/" if study else ""
    base = (section.get("defaults") or {}) if study else {}  # the grid's own defaults are merged later
    if not isinstance(base, dict):
        problems.append(("", Problem(f"{at}defaults", base, "must be a mapping of fields")))
        base = {}
    base = flatten(base)
    base_where = {k: f"{at}defaults.{k}" for k in base}
    axes = section.get("axes") or {}
    cells_doc = section.get("cells") or []
    if not isinstance(axes, dict):
        problems.append(("", Problem(f"{at}axes", axes, "must map dotted keys to lists of values")))
        axes = {}
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            problems.append(("", Problem(f"{at}axes.{key}", values, "must be a non-empty list of values")))
    if not isinstance(cells_doc, list):
        problems.append(("", Problem(f"{at}cells", cells_doc, "must be a list of mappings")))
        cells_doc = []
    out = []
    good_axes = {k: v for k, v in axes.items() if isinstance(v, list) and v}
    if good_axes:
        for combo in itertools.product(*good_axes.values()):
            values = dict(zip(good_axes, combo))
            label = ",".join(f"{k.removeprefix('pretrain.')}={v}" for k, v in values.items())
            out.append((prefix + label, study, {**base, **values}, {**base_where, **{k: f"{at}axes.{k}" for k in values}}))
    for i, entry in enumerate(cells_doc):
        if not isinstance(entry, dict):
            problems.append(("", Problem(f"{at}cells[{i}]", entry, "must be a mapping of dotted keys to values")))
            continue
        entry = dict(entry)
        label = entry.pop("name", f"cell{i}")
        if not isinstance(label, str):  # 010 → 10, 1e-4 → 0.0001, ~ → None: not the name written
            problems.append(("", Problem(f"{at}cells[{i}].name", label, "must be a string; quote it, e.g. name: '010'")))
            label = str(label)
        values = flatten(entry)
        out.append((prefix + label, study, {**base, **values},
                    {**base_where, **{k: f"{at}cells[{i}] ({label}): " for k in values}}))
    if not out and base and study:
        out.append((prefix + "baseline", study, base, base_where))
    return out


def _nested(d: dict, where: str, problems: list[tuple[str, Problem]]) -> dict:
    """Accept both nested sections and dotted keys in ``defaults``."""
    try:
        return unflatten(flatten(d))
    except ValueError as err:
        problems.append(("", Problem(f"{where}.{err}", None, "a key cannot be both a value and a section")))
        return {}


def _merge_flat(defaults: dict, values: dict[str, Any]) -> dict:
    flat = flatten(defaults)
    for key, value in values.items():
        # a cell value replaces the whole subtree below its key
        flat = {k: v for k, v in flat.items() if not k.startswith(key + ".")}
        flat[key] = value
    return unflatten(flat)


def _origin(field: str, values: dict[str, Any], where: dict[str, str], cli: set[str]) -> str:
    """Where a problem's field was set: a cell, an axis, the command line, or ``defaults``."""
    parts = field.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n]).split("[")[0]
        if key in cli:
            return "-o: "
        if key in where:
            origin = where[key]
            return origin if origin.endswith(": ") else f"{origin}: "
    return "defaults."


def data_problems(grid: Grid) -> list[tuple[str, Problem]]:
    """Checks that need the file system, before anything launches (``sslgrid plan`` prints them,
    ``sslgrid run`` refuses with exit 2): each ImageFolder root holds train/ and val/ with the same
    class folders (hidden ones are not classes), each with images; each Fashion-MNIST root holds its
    four idx files (trainers/fashion_mnist.py); then each stage kind's own ``preflight``
    (pipeline/stages.py), once per distinct section, e.g. every VOC box."""
    from trainers import fashion_mnist  # no torch: plan runs on a login node
    from trainers.folders import DataError, imagefolder_classes

    problems, seen = [], set()
    for cell in grid.cells:
        ds = cell.config.dataset
        if ds.name == "fashion_mnist" and ("fashion_mnist", ds.root) not in seen:
            seen.add(("fashion_mnist", ds.root))
            try:
                fashion_mnist.find_files(ds.root)
            except DataError as err:
                problems.append((f"cell {cell.name}: ", Problem("dataset.root", ds.root, str(err))))
            continue
        if ds.name == "imagefolder" and ds.root not in seen:
            seen.add(ds.root)
            missing = [split for split in ("train", "val") if not (Path(ds.root) / split).is_dir()]
            if missing:
                problems.append((f"cell {cell.name}: ", Problem("dataset.root", ds.root,
                                 f"has no {' or '.join(m + '/' for m in missing)} folder; an imagefolder root "
                                 f"holds train/<class>/ and val/<class>/")))
                continue
            try:
                imagefolder_classes(Path(ds.root))
            except DataError as err:
                problems.append((f"cell {cell.name}: ", Problem("dataset.root", ds.root, str(err).replace("\n", "\n    "))))
    checked = set()
    for kind in STAGE_KINDS.values():
        if kind.preflight is None:
            continue
        for cell in grid.cells:
            section = getattr(cell.config, kind.name)
            if not (kind.name == ROOT or grid.evaluates(kind.name, cell)) or (kind.name, section) in checked:
                continue
            checked.add((kind.name, section))
            for field_name, message in kind.preflight(cell.config):
                problems.append((f"cell {cell.name}: ", Problem(field_name, _get(cell.config, field_name), message)))
    return problems


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _decide(node: Any, problems: _Problems) -> Design:
    """The ``decide:`` section (pipeline/sequential.py Design): the settings ``sslgrid run --decide``
    fixes before its first seed. Claim ids are checked against pipeline/claims.py."""
    from pipeline.claims import CLAIMS

    found: list[Problem] = []
    design = build_dataclass(Design, node, "decide", found) if node is not None else Design()
    if design is not None:
        found += [Problem(f"decide.{f}", v, m) for f, v, m in design.problems()]
        ids = [c.id for c in CLAIMS]
        for claim in design.claims or ():
            if claim not in ids:
                close = difflib.get_close_matches(str(claim), ids, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                found.append(Problem("decide.claims", claim, f"{hint}no such claim; the claims are listed in "
                                     f"pipeline/claims.py and in the report's Claims section"))
    for p in found:
        problems.add("", p)
    return design if design is not None and not found else Design()


def reseed(grid: Grid, seeds: dict[str, int]) -> Grid:
    """``grid`` with base cell ``b`` run at seeds 0..seeds[b]-1 (cells not named keep their
    replicates): how ``sslgrid run --decide`` gives cells more seeds. A replicate sets every
    section's ``seed`` (``_seed_fields``), so seed 0 is the stage the grid runs without seeds, and a
    replicate has the same identity whichever round added it."""
    cells: list[Cell] = []
    for base, reps in grid.replicates().items():
        if base not in seeds:
            cells += reps
            continue
        first = reps[0]
        fields = _seed_fields(first.config)
        count = seeds[base]
        values = {k: v for k, v in first.values.items() if k != f"{ROOT}.seed"}
        for seed in range(count):
            config = dataclasses.replace(first.config, **{
                k: dataclasses.replace(getattr(first.config, k), seed=seed) for k in fields})
            name = base if count == 1 else f"{base}{REPLICATE}{seed}"
            cells.append(Cell(name, config, {**values, f"{ROOT}.seed": seed}, first.study, base, seed))
    return dataclasses.replace(grid, cells=tuple(cells))
