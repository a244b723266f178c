"""What MLflow's UI shows of a grid: experiments marked as model training (not GenAI), the report as
the parent run's description with its plots, and where ``sslgrid ui`` opens. A real SQLite store;
tests/integration/test_ui_browser.py renders the page in Chromium."""
from __future__ import annotations

import textwrap
from pathlib import Path

from pipeline.grid import load_grid
from pipeline.plan import build_plan
from pipeline.tracking import (EXPERIMENT_KIND, MAX_NOTE_CHARS, MODEL_TRAINING, NOTE, REPORT, UI_WORKFLOW, client,
                               ensure_experiment, landing_page, prepare_runs, show_report)

GRID = """
name: g
defaults:
  dataset: {name: synthetic, num_train: 96, num_val: 48}
  pretrain: {method: none}
  linear_probe: {epochs: 1}
cells:
  - {name: a}
evaluations: [linear_probe]
"""


def _plan(tmp_path: Path):
    (tmp_path / "g.yaml").write_text(textwrap.dedent(GRID))
    return build_plan(load_grid(tmp_path / "g.yaml", workdir=str(tmp_path / "wd"),
                                tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))


def test_a_new_experiment_is_marked_as_model_training(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = ensure_experiment(uri, "g")
    assert client(uri).get_experiment(exp_id).tags[EXPERIMENT_KIND] == "custom_model_development" == MODEL_TRAINING


def test_an_experiment_from_an_older_release_gets_the_tag_on_its_next_run(tmp_path):
    plan = _plan(tmp_path)
    c = client(plan.grid.tracking_uri)
    exp_id = c.create_experiment("g")  # as ensure_experiment created it before the tag
    assert EXPERIMENT_KIND not in c.get_experiment(exp_id).tags
    assert prepare_runs(plan)[0] == exp_id
    assert c.get_experiment(exp_id).tags[EXPERIMENT_KIND] == MODEL_TRAINING


def test_a_kind_the_user_chose_is_kept(tmp_path):
    plan = _plan(tmp_path)
    c = client(plan.grid.tracking_uri)
    exp_id = c.create_experiment("g", tags={EXPERIMENT_KIND: "genai_development"})
    prepare_runs(plan)
    assert c.get_experiment(exp_id).tags[EXPERIMENT_KIND] == "genai_development"


def test_the_report_becomes_the_description_with_its_plots_served_by_the_ui(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    run_id = c.create_run(ensure_experiment(uri, "g")).info.run_id
    text = "# g\n\n| cell | top1 |\n|:--|:--|\n| a | 41.20 |\n\n![cells](cells.png)"
    show_report(uri, run_id, text, [tmp_path / "cells.png", tmp_path / "fig4.png"])
    note = c.get_run(run_id).data.tags[NOTE]
    assert note == (f"# g\n\n| cell | top1 |\n|:--|:--|\n| a | 41.20 |\n\n"
                    f"![cells](get-artifact?path=report/cells.png&run_uuid={run_id})\n\n"
                    f"![fig4](get-artifact?path=report/fig4.png&run_uuid={run_id})")  # not in the text: appended


def test_a_report_longer_than_a_tag_is_cut_at_a_line_and_keeps_its_plots(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    run_id = c.create_run(ensure_experiment(uri, "g")).info.run_id
    text = "\n".join(f"| cell{i} | {i}.00 |" for i in range(1000))
    show_report(uri, run_id, text, [tmp_path / "fig4.png"])
    note = c.get_run(run_id).data.tags[NOTE]
    assert len(note) <= MAX_NOTE_CHARS
    body, cut, image = note.split("\n\n")
    assert body.startswith("| cell0 | 0.00 |\n") and body.endswith(" |") and f"`{REPORT}`" in cut
    assert image == f"![fig4](get-artifact?path=report/fig4.png&run_uuid={run_id})"


def test_the_ui_opens_on_the_report_else_the_parent_run_else_the_runs_table(tmp_path):
    plan = _plan(tmp_path)
    uri = plan.grid.tracking_uri
    exp_id = ensure_experiment(uri, "g")
    assert landing_page(uri, exp_id, "g") == f"/experiments/{exp_id}/runs?{UI_WORKFLOW}"
    _, parent_id, _ = prepare_runs(plan)
    assert landing_page(uri, exp_id, "g") == f"/experiments/{exp_id}/runs/{parent_id}?{UI_WORKFLOW}"
    (tmp_path / "report.md").write_text("# g\n")
    client(uri).log_artifact(parent_id, str(tmp_path / "report.md"), artifact_path="report")
    assert landing_page(uri, exp_id, "g") == f"/experiments/{exp_id}/runs/{parent_id}/artifacts/{REPORT}?{UI_WORKFLOW}"
    assert UI_WORKFLOW == "workflowType=machine_learning"
