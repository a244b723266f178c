"""Grid parsing and every validation message: file, dotted field, bad value, fix."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline.grid import GridError, load_grid

BASE = """
name: g
defaults:
  dataset: {name: synthetic, num_train: 200, num_val: 50}
  pretrain: {method: mocov2, epochs: 1, batch_size: 16, K: 64}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "grid.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def error(tmp_path: Path, text: str, overrides=()) -> str:
    p = write(tmp_path, text)
    with pytest.raises(GridError) as info:
        load_grid(p, list(overrides))
    msg = str(info.value)
    assert str(p) in msg  # every message names the file
    return msg


def test_axes_expand_as_cartesian_product_plus_extra_cells(tmp_path):
    g = load_grid(write(tmp_path, BASE + """
axes:
  pretrain.head.kind: [mlp, none]
  pretrain.T: [0.1, 0.2]
cells:
  - {name: rand, pretrain.method: none}
"""))
    assert [c.name for c in g.cells] == ["head.kind=mlp,T=0.1", "head.kind=mlp,T=0.2", "head.kind=none,T=0.1",
                                         "head.kind=none,T=0.2", "rand"]
    assert g.cells[3].config.pretrain.head.kind == "none" and g.cells[3].config.pretrain.T == 0.2
    assert g.cells[4].config.pretrain.method == "none"
    assert g.cells[0].config.pretrain.epochs == 1  # from defaults
    assert g.workdir == (Path.cwd() / "runs" / "g").resolve()
    assert g.tracking_uri == "sqlite:///" + str((Path.cwd() / "mlflow.db").resolve())


def test_override_applies_everywhere(tmp_path):
    g = load_grid(write(tmp_path, BASE + "axes:\n  pretrain.epochs: [3, 4]\n"),
                  ["pretrain.epochs=2", "linear_probe.lr=0.5", "resources.pretrain.gpus=1", "workdir=/tmp/x"])
    assert {c.config.pretrain.epochs for c in g.cells} == {2}
    assert g.cells[0].config.linear_probe.lr == 0.5
    assert g.resources["pretrain"].gpus == 1.0
    assert g.workdir == Path("/tmp/x")


def test_method_preset_under_user_values(tmp_path):
    g = load_grid(write(tmp_path, BASE + "cells:\n  - {pretrain.method: mocov1}\n  - {pretrain.method: mocov1, pretrain.T: 0.5}\n"))
    p = g.cells[0].config.pretrain
    assert (p.T, p.head.kind, p.schedule, p.augment.color_jitter, p.augment.blur) == (0.07, "linear", "step", (0.4,) * 4, False)
    assert g.cells[1].config.pretrain.T == 0.5


def test_typo_gets_closest_name(tmp_path):
    msg = error(tmp_path, BASE.replace("epochs: 1", "epochz: 1"))
    assert "defaults.pretrain.epochz = 1: unknown field; did you mean 'pretrain.epochs'?" in msg


def test_unknown_method_suggests(tmp_path):
    msg = error(tmp_path, BASE + "cells:\n  - {name: a, pretrain.method: mocov3}\n")
    assert "cells[0] (a): pretrain.method = 'mocov3': did you mean 'mocov2'?" in msg


def test_wrong_type(tmp_path):
    msg = error(tmp_path, BASE.replace("epochs: 1", "epochs: many"))
    assert "pretrain.epochs = 'many': must be an integer" in msg


def test_out_of_range_in_axis(tmp_path):
    msg = error(tmp_path, BASE + "axes:\n  pretrain.K: [64, 0]\n")
    assert "axes.pretrain.K: pretrain.K = 0: must be >= 1" in msg


def test_queue_longer_than_dataset(tmp_path):
    msg = error(tmp_path, BASE.replace("K: 64", "K: 4096"))
    assert "pretrain.K = 4096: must be below the dataset size (200 training images: dataset.num_train)" in msg


def test_queue_longer_than_a_known_train_split_is_refused_at_load(tmp_path, capsys):
    """Fashion-MNIST's train split is known (60,000), capped by max_train: K = 2048 over 512 images
    is refused when the grid loads (exit 2), not by 24 failed stages at run time."""
    from pipeline.cli import main

    fashion = BASE.replace("{name: synthetic, num_train: 200, num_val: 50}", "{name: fashion_mnist, max_train: 512}")
    msg = error(tmp_path, fashion.replace("K: 64", "K: 2048"))
    assert ("pretrain.K = 2048: must be below the dataset size (512 training images: dataset.max_train = 512): a "
            "queue that long holds an older key of each query's own image as a negative. Lower pretrain.K below "
            "512, or raise dataset.max_train") in msg
    assert "60000 training images: fashion_mnist's train split" in error(tmp_path, fashion.replace(
        "max_train: 512", "image_size: 32").replace("K: 64", "K: 60000"))
    load_grid(write(tmp_path, fashion.replace("K: 64", "K: 511")))  # below it: accepted
    for name in ("cifar10", "stl10"):
        assert "must be below the dataset size (512 training images: dataset.max_train = 512)" in error(
            tmp_path, fashion.replace("fashion_mnist", name).replace("K: 64", "K: 512"))
    # the shipped grid with a smaller train set: refused by plan and run alike, before anything runs
    grid = Path(__file__).resolve().parents[2] / "grids" / "fashion.yaml"
    for command in ("plan", "run"):
        assert main([command, str(grid), "-o", "dataset.max_train=512", "--workdir", str(tmp_path / "wd"),
                     "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
        err = capsys.readouterr().err
        assert "defaults.pretrain.K = 2048: must be below the dataset size (512 training images: " in err, err
        assert "Lower pretrain.K below 512, or raise dataset.max_train" in err and "nothing was launched" in err
    assert not (tmp_path / "wd").exists()


def test_bad_override_syntax_and_value(tmp_path):
    msg = error(tmp_path, BASE, ["pretrain.epochs=-3"])
    assert "-o: pretrain.epochs = -3: must be >= 1" in msg
    p = write(tmp_path, BASE)
    with pytest.raises(GridError, match="expected -o dotted.key=value"):
        load_grid(p, ["pretrain.epochs"])


def test_top_level_and_evaluation_and_resource_typos(tmp_path):
    msg = error(tmp_path, BASE + "evaluation: [linear_probe]\nresources:\n  pretrian: {cpus: 1}\n")
    assert "evaluation = ['linear_probe']: unknown top-level key; did you mean 'evaluations'?" in msg
    assert "resources.pretrian = {'cpus': 1}: did you mean 'pretrain'?" in msg
    msg = error(tmp_path, BASE + "evaluations: [linear_prob]\n")
    assert "evaluations[0] = 'linear_prob': did you mean 'linear_probe'?" in msg


def test_all_problems_reported_once(tmp_path):
    msg = error(tmp_path, BASE.replace("epochs: 1", "epochs: 0") + "axes:\n  pretrain.T: [0.1, 0.2]\n")
    assert msg.count("pretrain.epochs = 0") == 1


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(GridError, match="no such file"):
        load_grid(tmp_path / "nope.yaml")
    with pytest.raises(GridError, match="not valid YAML"):
        load_grid(write(tmp_path, "name: [unclosed\n"))


def test_shipped_quickstart_is_valid():
    g = load_grid(Path(__file__).resolve().parents[2] / "grids" / "quickstart.yaml")
    assert {c.config.pretrain.method for c in g.cells} == {"mocov2", "none"}
    assert {c.config.pretrain.head.kind for c in g.cells if c.config.pretrain.method == "mocov2"} == {"mlp", "none"}


STUDIES = BASE + """
studies:
  heads:
    axes: {pretrain.head.kind: [mlp, none]}
  temps:
    defaults: {pretrain.head.kind: none}
    axes: {pretrain.T: [0.1, 0.2]}
  solo:
    defaults: {pretrain.K: 32}
"""


def test_named_studies_expand_and_share_stages(tmp_path):
    from pipeline.plan import build_plan

    g = load_grid(write(tmp_path, STUDIES))
    assert [c.name for c in g.cells] == ["heads/head.kind=mlp", "heads/head.kind=none", "temps/T=0.1", "temps/T=0.2",
                                         "solo/baseline"]
    assert {c.study for c in g.cells} == {"heads", "temps", "solo"}
    assert g.cells[3].config.pretrain.head.kind == "none" and g.cells[3].config.pretrain.T == 0.2
    assert g.cells[4].config.pretrain.K == 32
    plan = build_plan(g)
    shared = plan.cells["heads/head.kind=none"]["pretrain"]
    assert shared == plan.cells["temps/T=0.2"]["pretrain"]  # same resolved spec: one stage for both studies
    only = load_grid(write(tmp_path, STUDIES), only_studies=["temps"])
    assert [c.study for c in only.cells] == ["temps", "temps"]


def test_unknown_study_and_bad_study_value(tmp_path):
    p = write(tmp_path, STUDIES)
    with pytest.raises(GridError, match="--study = 'temp': did you mean 'temps'"):
        load_grid(p, only_studies=["temp"])
    msg = error(tmp_path, STUDIES.replace("axes: {pretrain.T: [0.1, 0.2]}", "axes: {pretrain.T: [0.1, -1]}"))
    assert "studies.temps.axes.pretrain.T: pretrain.T = -1.0: must be >= 1e-06" in msg


def test_evaluations_restricted_to_unknown_cells_are_refused(tmp_path):
    text = BASE + "axes:\n  pretrain.head.kind: [mlp, none]\nevaluations:\n  linear_probe: all\n  knn: [head.kind=mpl]\n"
    msg = error(tmp_path, text)
    assert "evaluations.knn = 'head.kind=mpl': did you mean 'head.kind=mlp'? no such cell" in msg
    msg = error(tmp_path, BASE + "evaluations:\n  knn: some\n")
    assert "evaluations.knn = 'some': must be 'all' or a non-empty list of cell names" in msg
    msg = error(tmp_path, BASE + "evaluations:\n  detecton: all\n")
    assert "evaluations.detecton = 'detecton': did you mean 'detection'?" in msg


def test_unknown_optimizer_and_bad_view_probability(tmp_path):
    msg = error(tmp_path, BASE + "cells:\n  - {name: a, pretrain.optimizer: lamb, pretrain.augment.view2_blur_p: 2}\n")
    assert "cells[0] (a): pretrain.optimizer = 'lamb': valid values: sgd, lars" in msg
    assert "cells[0] (a): pretrain.augment.view2_blur_p = 2.0: must be <= 1.0" in msg


# ---------------------------------------------------------------------------------------------
# Grid files as people write them (issue 11, section 2)


@pytest.mark.parametrize("text,expected", [("1e-4", 1e-4), ("3E-2", 0.03), ("1.5e+3", 1500.0), ("5e-05", 5e-5)])
def test_numbers_written_as_papers_write_them_are_numbers(tmp_path, text, expected):
    g = load_grid(write(tmp_path, BASE.replace("epochs: 1,", f"epochs: 1, lr: {text},")))
    assert g.cells[0].config.pretrain.lr == expected
    g = load_grid(write(tmp_path, BASE), [f"pretrain.lr={text}", f"linear_probe.weight_decay={text}"])
    assert g.cells[0].config.pretrain.lr == expected and g.cells[0].config.linear_probe.weight_decay == expected


def test_yaml_1_1_implicit_types_do_not_change_what_was_written(tmp_path):
    # YAML 1.1 reads `on`/`no` as booleans, 010 as 8 and 1:30 as 90; under 1.2 they stay what they say
    g = load_grid(write(tmp_path, BASE + "cells:\n  - {name: no, pretrain.epochs: 010}\n  - {name: on}\n"))
    assert [c.name for c in g.cells] == ["no", "on"] and g.cells[0].config.pretrain.epochs == 10
    msg = error(tmp_path, BASE.replace("epochs: 1,", "epochs: 1:30,"))
    assert "pretrain.epochs = '1:30': must be an integer" in msg
    msg = error(tmp_path, BASE.replace("epochs: 1,", "epochs: 1, T: yes,"))
    assert "pretrain.T = 'yes': must be a number" in msg


def test_a_key_written_twice_is_an_error_not_a_silent_override(tmp_path):
    msg = error(tmp_path, BASE + "axes:\n  pretrain.T: [0.1]\n  pretrain.T: [0.2]\n")
    assert 'duplicate key "pretrain.T"' in msg and "line 8" in msg


def test_home_is_expanded_in_every_path_field(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / "data" / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / "a" / "0.png")
    g = load_grid(write(tmp_path, """
name: g
workdir: ~/wd
tracking_uri: sqlite:///~/store/mlflow.db
defaults:
  dataset: {name: imagefolder, root: ~/data}
  detection: {voc_root: ~/voc}
"""))
    cfg = g.cells[0].config
    assert cfg.dataset.root == str(tmp_path / "data") and cfg.detection.voc_root == str(tmp_path / "voc")
    assert g.workdir == tmp_path / "wd" and g.tracking_uri == f"sqlite:///{tmp_path}/store/mlflow.db"
    assert load_grid(write(tmp_path, BASE), workdir="~/other").workdir == tmp_path / "other"
    from pipeline.cli import data_problems

    assert data_problems(g) == []  # it was "has no train/ or val/ folder"


def test_cell_names_and_numbers_are_what_was_written(tmp_path):
    msg = error(tmp_path, BASE + "cells:\n  - {name: 010}\n  - {name: ~}\n")
    assert "cells[0].name = 10: must be a string; quote it" in msg and "cells[1].name = None: must be a string" in msg
    for text in (".nan", ".inf", "-.inf"):
        assert "pretrain.lr" in error(tmp_path, BASE.replace("epochs: 1,", f"epochs: 1, lr: {text},")) and \
            "must be a finite number" in error(tmp_path, BASE.replace("epochs: 1,", f"epochs: 1, lr: {text},"))
