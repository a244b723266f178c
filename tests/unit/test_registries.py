"""The registries are the only places that name a method or a stage kind (issue 12): pipeline/
iterates them, and validating a grid needs no torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from pipeline.stages import STAGE_KINDS
from trainers.methods import METHODS

REPO = Path(__file__).resolve().parents[2]
# the registries themselves, and the two modules that hold the paper's own data: its tables, whose
# rows are the paper's methods (MoCo v2 against supervised training) and whose values are its
# protocol's probe, and its claims, which compare those methods on the probe and detection
ALLOWED = {"stages.py", "paper_tables.py", "claims.py"}


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    named = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
             and [getattr(t, "id", None) for t in node.targets] == ["ROOT"]}  # the one name of the root kind
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in named]


def test_no_pipeline_module_names_a_method_or_a_stage_kind():
    # "none" (random init) is also a value of other fields (head kind, lr scaling), so it is not searched for
    names = (set(METHODS) - {"none"}) | set(STAGE_KINDS)
    found = [f"pipeline/{p.name}:{line}: {value!r}" for p in sorted((REPO / "pipeline").glob("*.py"))
             if p.name not in ALLOWED for line, value in _string_constants(p) if value in names]
    assert not found, "\n".join(found)


def test_sslgrid_plan_works_without_torch(tmp_path):
    """A login node without torch: `sslgrid plan` validates, plans, costs and checks the data of every
    shipped grid, and of an ImageFolder tree (whose mismatched classes it names)."""
    for split, cls in (("train", "a"), ("train", "b"), ("val", "a")):
        (tmp_path / "tree" / split / cls).mkdir(parents=True)
        (tmp_path / "tree" / split / cls / "x.jpg").write_bytes(b"")
    code = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
            "from pipeline.cli import main\n"
            "where = ['--workdir', sys.argv[1] + '/wd', '--tracking-uri', f'sqlite:///{sys.argv[1]}/m.db']\n"
            "codes = [main(['plan', f'grids/{g}.yaml', *where]) for g in ('quickstart', 'methods', 'paper', 'paper-mini', 'fashion')]\n"
            "codes.append(main(['plan', 'grids/quickstart.yaml', '-o', 'dataset.name=imagefolder', '-o',\n"
            "                   f'dataset.root={sys.argv[1]}/tree', *where]))\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "print('codes', codes)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "codes [0, 0, 0, 0, 0, 0]" in out.stdout, out.stdout[-3000:] + out.stderr
    assert "missing from val/: b/" in out.stdout


def test_each_record_is_filed_under_its_own_name():
    assert all(name == m.name for name, m in METHODS.items())
    assert all(name == k.name for name, k in STAGE_KINDS.items())
