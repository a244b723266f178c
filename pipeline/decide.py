"""``sslgrid run GRID --decide``: seeds go where a claim is still open.

Settings (the grid's ``decide:`` section, pipeline/sequential.py ``Design``) are fixed before the
first seed and kept with the grid's run. Each **round**:

1. runs the plan at the current seeds per cell (finished stages are cached: nothing runs twice);
2. takes a **look**: every open claim of the family is tested at the seeds its cells finished, and
   the family's verdicts are recomputed (sequential p-values, Holm; pipeline/sequential.py);
3. gives one more seed only to the cells that open claims need (a cell shared by several claims
   runs once), up to ``max_seeds``; with a GPU-hour budget that cannot cover every open claim, the
   claims are taken in order of the chance that one more seed decides them (the next look's power
   at the current estimate, scipy's noncentral t) per estimated GPU-hour of the seeds they need,
   while the budget lasts;
4. stops when every claim is decided, or no open claim can get a seed (``max_seeds`` or the budget).

The state (settings, family, seeds per cell, looks per claim, rounds, GPU-hours) is written to
``<workdir>/decide.json`` by write-then-rename before the first round and after each look, and logged on the grid's parent run
(``sslgrid/decide.json``), so a killed ``--decide`` resumes at the same look (the round's finished
stages are cached) and rerunning a finished one spends nothing.

Cells outside the family (the random-init floor, cells no claim compares) run one seed.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.claims import CLAIMS, Claim, Result, check, picked
from pipeline.grid import Grid, reseed
from pipeline.plan import Plan, build_plan
from pipeline.sequential import Design, next_look_power
from pipeline.state import StateError
from pipeline.stages import ROOT, gpu_hours

STATE_FILE = "decide.json"
ARTIFACT = "sslgrid/decide.json"
VERSION = 1


class DecideError(StateError):
    """A decision that cannot start or go on as asked; the text names the field or file and the fix
    (the command exits 2)."""


@dataclass
class State:
    """A decision's record: what was fixed at its start and what it has spent and seen since."""

    design: dict[str, Any]
    family: list[str]  # claim ids decided together
    seeds: dict[str, int]  # base cell → seeds 0..n-1 it runs
    looks: dict[str, list[int]] = field(default_factory=dict)  # claim id → the seed counts it was looked at
    rounds: int = 0
    finished: bool = False
    why: str = ""  # why it stopped
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per look
    version: int = VERSION

    @property
    def settings(self) -> Design:
        d = dict(self.design)
        if d.get("claims") is not None:
            d["claims"] = tuple(d["claims"])
        return Design(**d)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "State":
        return State.from_dict(json.loads(text))

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> "State":
        return State(**{f.name: raw[f.name] for f in dataclasses.fields(State) if f.name in raw})


def family(grid: Grid, design: Design) -> list[Claim]:
    """The claims decided together: ``design.claims``, else every claim the grid's structure can
    test (its study, its cells and the evaluation of its metric are in the grid). Raises
    DecideError for a named claim the grid cannot test, or when there is none."""
    testable = {c.id: (c, pk) for c in CLAIMS if (pk := picked(grid, c)) is not None}
    if design.claims is not None:
        out = []
        for cid in design.claims:
            if cid not in testable or testable[cid][1].why:
                why = testable[cid][1].why if cid in testable else f"the grid has no study {cid.split('.')[0]}"
                raise DecideError(f"{grid.path}: decide.claims = {cid!r}: this grid cannot test it ({why}). Remove "
                                  f"it from decide.claims, or add the cells it compares.")
            out.append(testable[cid][0])
        return out
    out = [c for c, pk in testable.values() if not pk.why]
    if not out:
        raise DecideError(f"{grid.path}: --decide: this grid tests none of the paper's claims (pipeline/claims.py): "
                          f"there is nothing to decide. Run it without --decide, or add a study a claim compares "
                          f"(e.g. table1 with head.kind mlp and none).")
    return out


def claim_cells(grid: Grid, claims: list[Claim]) -> dict[str, list[str]]:
    """Claim id → the base cells it compares."""
    return {c.id: [n for n in picked(grid, c).names if n] for c in claims}


def start(grid: Grid) -> State:
    """A new decision's state: every cell of the family at ``start_seeds``, the others at one seed.
    Raises DecideError when the grid gives its own seeds (which would conflict), or when the first
    round alone costs more than ``budget_gpu_hours`` (the budget includes it; ``check_budget``)."""
    design = grid.decide
    if grid.seeded:
        raise DecideError(f"{grid.path}: seeds/repeats and --decide are both given: --decide chooses each cell's "
                          f"seeds (decide.start_seeds, decide.max_seeds). Remove seeds/repeats (and -o repeats).")
    fam = family(grid, design)
    cells = {b for names in claim_cells(grid, fam).values() for b in names}
    seeds = {base: (design.start_seeds if base in cells else 1) for base in grid.replicates()}
    state = State(design=_design_dict(design), family=[c.id for c in fam], seeds=seeds,
                  looks={c.id: [] for c in fam})
    check_budget(grid, state)
    return state


def _up(x: float, digits: int = 3) -> float:
    """``x`` rounded up to ``digits`` significant digits (a budget that surely covers ``x``)."""
    if x <= 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return math.ceil(x / step - 1e-9) * step


def check_budget(grid: Grid, state: State) -> None:
    """Raise DecideError (exit 2) when the first round (every stage at the state's seeds, by sslgrid
    plan's model) costs more than the design's GPU-hour budget, which includes it: the decision
    could not run even its first look within the budget."""
    design = state.settings
    if design.budget_gpu_hours is None or state.rounds:
        return
    first = build_plan(grid_at(grid, state))
    hours = plan_hours(first)
    if hours <= design.budget_gpu_hours + 1e-12:
        return
    pretrainings = sum(s.kind == ROOT for s in first.stages.values())
    raise DecideError(f"{grid.path}: decide.budget_gpu_hours = {design.budget_gpu_hours:g}, but the first round alone "
                      f"({pretrainings} pretrainings, {len(first.stages)} stages at {design.start_seeds} seeds per cell "
                      f"of the claims) costs {hours:.4g} GPU-hours by sslgrid plan's model, and the budget includes "
                      f"the first round. Raise decide.budget_gpu_hours to at least {_up(hours):g}, lower "
                      f"decide.start_seeds, or set the budget to null (no budget).")


def _design_dict(design: Design) -> dict[str, Any]:
    d = dataclasses.asdict(design)
    if d["claims"] is not None:
        d["claims"] = list(d["claims"])
    return d


def load(grid: Grid) -> State | None:
    """The decision recorded in the grid's work directory, or None. Raises DecideError when its
    settings are not the grid's now (changing them after seeing seeds voids the error rate)."""
    path = grid.workdir / STATE_FILE
    if not path.exists():
        return None
    try:
        state = State.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as err:
        raise DecideError(f"{path}: not a decision record ({err}). Move it away to start the decision anew.") from None
    now = _design_dict(grid.decide)
    changed = [f"{k} {state.design.get(k)!r} → {v!r}" for k, v in now.items() if state.design.get(k) != v]
    if changed:
        raise DecideError(f"{grid.path}: decide settings changed since this decision started ({'; '.join(changed)}): "
                          f"settings are fixed before the first seed, or the verdicts' error rate no longer holds. "
                          f"Put them back, or start a new decision with another --workdir (or remove {path}).")
    return state


def stored(grid: Grid) -> State | None:
    """The decision in the grid's work directory, else None (no settings check: for reading)."""
    path = grid.workdir / STATE_FILE
    try:
        return State.from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None


def save(grid: Grid, state: State) -> Path:
    from trainers.files import write_text

    path = grid.workdir / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, state.to_json() + "\n")
    return path


def grid_at(grid: Grid, state: State) -> Grid:
    """The grid at the state's seeds per cell."""
    return reseed(grid, {b: n for b, n in state.seeds.items() if b in grid.replicates()})


def plan_hours(plan: Plan) -> float:
    """Estimated GPU-hours of a plan's stages, after dedup (unknown estimates count 0)."""
    return sum(h for s in plan.stages.values() if (h := gpu_hours(s.kind, s.config)) is not None)


def look(grid: Grid, state: State, values) -> list[Result]:
    """Take a look at ``values`` (finished stages): record each open claim's seed count, then the
    family's verdicts. Returns the results of every claim of the grid."""
    design = state.settings
    before = check(grid_at(grid, state), values, design=design, looks=state.looks, family=tuple(state.family))
    open_ids = {r.claim.id for r in before if r.claim.id in state.family and r.verdict in ("inconclusive", "not tested")}
    for r in before:
        if r.claim.id in open_ids and r.n and (not state.looks.get(r.claim.id) or state.looks[r.claim.id][-1] != r.n):
            state.looks.setdefault(r.claim.id, []).append(r.n)
    results = check(grid_at(grid, state), values, design=design, looks=state.looks, family=tuple(state.family))
    state.history.append({"round": state.rounds, "seeds": dict(state.seeds),
                          "verdicts": {r.claim.id: [r.verdict, r.n] for r in results if r.claim.id in state.family}})
    return results


def next_seeds(grid: Grid, state: State, results: list[Result]) -> tuple[dict[str, int], str]:
    """The seeds per cell of the next round, and why nothing more runs when it equals the current
    ones ("" otherwise). Spends only on open claims below ``max_seeds``; with a budget, in order of
    the next look's power per GPU-hour."""
    design = state.settings
    cells = claim_cells(grid, [c for c in CLAIMS if c.id in state.family])
    open_results = [r for r in results if r.claim.id in state.family and r.verdict in ("inconclusive", "not tested")]
    if not open_results:
        return dict(state.seeds), "every claim is decided"
    wants = {r.claim.id: max(r.n, min(state.seeds[b] for b in cells[r.claim.id])) + 1 for r in open_results}
    wants = {cid: n for cid, n in wants.items() if n <= design.max_seeds}
    if not wants:
        return dict(state.seeds), f"the open claims reached max_seeds ({design.max_seeds})"
    current = build_plan(grid_at(grid, state))
    spent = plan_hours(current)

    def grow(seeds: dict[str, int], cid: str) -> dict[str, int]:
        out = dict(seeds)
        for b in cells[cid]:
            out[b] = max(out[b], wants[cid])
        return out

    if design.budget_gpu_hours is None:
        seeds = dict(state.seeds)
        for cid in wants:
            seeds = grow(seeds, cid)
        return seeds, ""
    # a budget: claims by the chance one more seed decides them, per GPU-hour of the seeds they need
    by_id = {r.claim.id: r for r in open_results}

    def cost(seeds: dict[str, int]) -> float:
        return plan_hours(build_plan(grid_at(grid, dataclasses.replace(state, seeds=seeds)))) - spent

    ranked = []
    for cid in wants:
        r = by_id[cid]
        values = r.values
        power = (next_look_power(values, design, r.level or design.alpha, r.claim.margin, r.resolution)
                 if values else 0.0)
        ranked.append((power / max(cost(grow(state.seeds, cid)), 1e-12), cid))
    seeds = dict(state.seeds)
    for _, cid in sorted(ranked, reverse=True):
        trial = grow(seeds, cid)
        if spent + cost(trial) <= design.budget_gpu_hours + 1e-12:
            seeds = trial
    if seeds == state.seeds:
        return seeds, f"the budget of {design.budget_gpu_hours:g} GPU-hours cannot pay for another seed ({spent:.4g} spent)"
    return seeds, ""


def describe_round(grid: Grid, before: dict[str, int], after: dict[str, int]) -> str:
    """``cells a, b to 4 seeds (2 new pretrainings, 0.012 GPU-hours)``."""
    grown = {b: n for b, n in after.items() if n > before.get(b, 0)}
    if not grown:
        return "nothing"
    plan_before = build_plan(reseed(grid, before))
    plan_after = build_plan(reseed(grid, after))
    new = [s for k, s in plan_after.stages.items() if k not in plan_before.stages]
    pre = sum(s.kind == ROOT for s in new)
    hours = sum(h for s in new if (h := gpu_hours(s.kind, s.config)) is not None)
    by_count: dict[int, list[str]] = {}
    for b, n in grown.items():
        by_count.setdefault(n, []).append(b)
    cells = "; ".join(f"{', '.join(bs)} to {n} seed{'s' if n > 1 else ''}" for n, bs in sorted(by_count.items()))
    return f"{cells} ({pre} new pretrainings, {len(new)} stages, {hours:.3g} GPU-hours by sslgrid plan's model)"


def worst_case(grid: Grid, state: State) -> Grid:
    """The grid with every cell of the family at ``max_seeds``."""
    design = state.settings
    cells = {b for names in claim_cells(grid, [c for c in CLAIMS if c.id in state.family]).values() for b in names}
    return reseed(grid, {b: (design.max_seeds if b in cells else n) for b, n in state.seeds.items()})
