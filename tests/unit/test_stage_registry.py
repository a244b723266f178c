"""An evaluation is one record plus its module (issue 12). The proof: in a fresh interpreter, the
text of pipeline/stages.py gains one spec class and one StageKind record (what a contributor would
write), an evaluator module is written beside it, and nothing else changes. The grid file then
names the new kind; validation, the plan, its summary and cost, the stage's run and the report's
columns all follow from the record."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

RECORD = '''
@dataclass(frozen=True)
class CountSpec:
    """Counts the checkpoint's tensors (a test evaluation)."""

    scale: float = _f(1.0, min=0.0)


STAGE_KINDS["count"] = StageKind("count", CountSpec, "count_eval:count", lambda cfg: f"scale={cfg.count.scale}",
                                 reported=("tensors",))
'''

EVALUATOR = '''
from trainers import checkpoint
from trainers.results import EvalResult


def count(cfg, upstream, workdir, sink):
    n = len(checkpoint.load(upstream.checkpoint)["backbone"]) * cfg.count.scale
    sink.log({"tensors": n}, step=0)
    return EvalResult({"tensors": n})
'''

DRIVER = '''
import sys, types
from pathlib import Path

repo, tmp = Path(sys.argv[1]), Path(sys.argv[2])
text = (repo / "pipeline" / "stages.py").read_text()
marker = "EVALUATIONS = tuple("
text = text.replace(marker, RECORD + "\\n" + marker, 1)  # the one record, above the table's users
import pipeline  # the package; its stages module is the edited text
module = types.ModuleType("pipeline.stages")
module.__file__ = str(repo / "pipeline" / "stages.py")
sys.modules["pipeline.stages"] = module
exec(compile(text, module.__file__, "exec"), module.__dict__)
sys.path.insert(0, str(tmp))

from pipeline.grid import load_grid
from pipeline.plan import build_plan, describe
from pipeline.report import cell_table
from pipeline.stages import STAGE_KINDS
from trainers.sink import ListSink

grid = load_grid(tmp / "grid.yaml", workdir=str(tmp / "runs"), tracking_uri=f"sqlite:///{tmp}/m.db")
plan = build_plan(grid)
rows = {r["stage"]: r for r in describe(plan)}
assert rows["count"]["what"] == "scale=2.0" and rows["count"]["GPU-h"] == "?", rows["count"]
pre, count = plan.ordered()
up = STAGE_KINDS["pretrain"](pre.config, [], pre.directory(grid.workdir), ListSink())
result = STAGE_KINDS["count"](count.config, [up], count.directory(grid.workdir), ListSink())
assert result.metrics["tensors"] > 0 and result.metrics["tensors"] % 2 == 0, result
import pandas as pd
assert "count_tensors" in cell_table(plan, pd.DataFrame()).columns
print("ok")
'''

GRID = """
name: counted
defaults:
  dataset: {name: synthetic, num_train: 64, num_val: 32}
  backbone: {name: tiny_resnet}
  pretrain: {method: none}
  count: {scale: 2.0}
evaluations: [count]
"""


def test_an_evaluation_is_one_record_plus_its_module(tmp_path):
    (tmp_path / "count_eval.py").write_text(textwrap.dedent(EVALUATOR))
    (tmp_path / "grid.yaml").write_text(GRID)
    code = f"RECORD = {RECORD!r}\n" + DRIVER
    out = subprocess.run([sys.executable, "-c", code, str(REPO), str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def test_without_the_record_the_grid_names_an_unknown_stage(tmp_path):
    (tmp_path / "grid.yaml").write_text(GRID)
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", str(tmp_path / "grid.yaml")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "count" in out.stdout + out.stderr
