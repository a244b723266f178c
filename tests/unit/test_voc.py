"""Every box of a VOC split is checked when the split is read (issue 11): an invalid one refuses the
sets with its file, object and coordinates, or, with ``invalid_boxes: drop``, is left out with a
warning that names it. ``voc_problems`` finds the same from the XML alone, for ``sslgrid run``."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from evaluators.voc import (LISTED, VOC_CLASSES, VocError, VocWarning, read_classes, read_sets, read_split,
                            read_train_test, voc_dir, voc_problems)
from trainers.results import PretrainResult

GOOD = (("dog", "10", "20", "50", "60"),)


def _xml(objects, size=(100, 80)) -> str:
    """objects: (name, xmin, ymin, xmax, ymax) as text, None leaves the element out; the string
    "nobox" as an object writes one without <bndbox>."""
    parts = []
    for o in objects:
        if o == "nobox":
            parts.append("<object><name>dog</name><difficult>0</difficult></object>")
            continue
        name, *coords = o
        tags = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), coords) if v is not None)
        parts.append(f"<object>{'' if name is None else f'<name>{name}</name>'}<difficult>0</difficult>"
                     f"<bndbox>{tags}</bndbox></object>")
    sz = "" if size is None else f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
    return f"<annotation><filename>x.jpg</filename>{sz}{''.join(parts)}</annotation>"


def _tree(root: Path, images: dict[str, tuple], split: str = "trainval", year: str = "2007",
          missing_jpg: tuple[str, ...] = (), size=(100, 80)) -> Path:
    d = voc_dir(root, year)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for image_id, objects in images.items():
        (d / "Annotations" / f"{image_id}.xml").write_text(_xml(objects, size))
        if image_id not in missing_jpg:
            (d / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"")  # never decoded by the checks
    (d / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    return root


# one case per way a box can be invalid: (objects of the image, the reason its message must give)
BAD = {
    "reversed-x": (("dog", "50", "20", "10", "60"), "xmax < xmin"),
    "reversed-y": (("dog", "10", "60", "50", "20"), "ymax < ymin"),
    "zero-based": (("dog", "0", "20", "50", "60"), "it starts left of or above the image (VOC coordinates start at 1)"),
    "beyond-width": (("dog", "10", "20", "101", "60"), "it ends beyond the 100x80 image of <size>"),
    "beyond-height": (("dog", "10", "20", "50", "81"), "it ends beyond the 100x80 image of <size>"),
    "not-a-number": (("dog", "abc", "20", "50", "60"), "<xmin> is 'abc', not a number"),
    "nan": (("dog", "nan", "20", "50", "60"), "<xmin> is 'nan', not a number"),
    "missing-coordinate": (("dog", "10", "20", None, "60"), "<xmax> is missing"),
    "no-bndbox": ("nobox", "it has no <bndbox>"),
    "no-name": ((None, "10", "20", "50", "60"), "it has no <name>"),
    "unknown-class": (("dgo", "10", "20", "50", "60"), "class 'dgo' is not one of the 1 classes (did you mean 'dog'?)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_kind_of_invalid_box_is_refused_naming_file_object_and_coordinates(tmp_path, case):
    bad, reason = BAD[case]
    root = _tree(tmp_path, {"000001": GOOD, "000002": (GOOD[0], bad)})
    xml = voc_dir(root) / "Annotations" / "000002.xml"
    with pytest.raises(VocError) as err:
        read_split(root, "trainval", ["dog"])
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"{xml}: object 2 of 2 (") and lines[0].endswith(f"): {reason}")
    if bad != "nobox":  # the coordinates as written in the file, before any flip or shift
        assert ", ".join(f"{k} {v if v is not None else '(missing)'}"
                         for k, v in zip(("xmin", "ymin", "xmax", "ymax"), bad[1:])) in lines[0]
    assert lines[-1] == ("1 invalid box in 1 annotation file: fix it, or set detection.invalid_boxes: drop to leave "
                         "invalid boxes out (each is named in a warning when the stage reads the sets)")
    # the same lines before launch, from voc_problems, which reads the classes from the tree as the stage
    # does: there 'dgo' is a second class (a misspelt VOC class is caught in the test below)
    (voc_dir(root) / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    assert voc_problems(root, ["2007/trainval"], "2007/test") == ([] if case == "unknown-class" else lines)


def test_valid_edges_are_accepted(tmp_path):
    # VOC's ends are 1-based and inclusive: 1..width is the whole image, and xmin == xmax one pixel
    root = _tree(tmp_path, {"000001": (("dog", "1", "1", "100", "80"), ("dog", "7", "7", "7", "9")),
                            "000002": (("dog", "10.5", "20", "50", "60"),)})  # fractional: VOC2012 has some
    items = read_split(root, "trainval", ["dog"])
    assert items[0].boxes.tolist() == [[0, 0, 100, 80], [6, 6, 7, 9]]  # each box 1 px wide or more
    assert items[1].boxes.tolist() == [[9.5, 19, 50, 60]]


def test_every_problem_is_listed_not_only_the_first(tmp_path):
    images = {f"{i:06d}": (("dog", "50", "20", "10", "60"),) for i in range(LISTED + 5)}
    images["000100"] = (("dog", "1", "1", "10", "10"), ("dog", "0", "1", "10", "10"), ("dog", "1", "1", "10", "90"))
    root = _tree(tmp_path, images, missing_jpg=("000003",))
    with pytest.raises(VocError) as err:
        read_split(root, "trainval", ["dog"])
    lines = str(err.value).splitlines()
    # the file problem first (dropping cannot skip it), then LISTED boxes, the count of the rest, the fix
    split = voc_dir(root) / "ImageSets" / "Main" / "trainval.txt"
    assert lines[0] == (f"{voc_dir(root) / 'JPEGImages' / '000003.jpg'}: no such image for 000003, listed in "
                        f"{split}; add it or remove 000003 from the split")
    assert len(lines) == 1 + LISTED + 2
    assert lines[-2] == "... and 7 more invalid boxes"
    assert lines[-1].startswith(f"{LISTED + 7} invalid boxes in {LISTED + 6} annotation files: fix them, or set "
                                f"detection.invalid_boxes: drop")


def test_drop_leaves_invalid_boxes_out_with_a_warning_naming_them(tmp_path):
    root = _tree(tmp_path, {"000001": GOOD,
                            "000002": (GOOD[0], ("dog", "50", "20", "10", "60")),  # one of two invalid
                            "000003": (("dog", "abc", "1", "2", "3"),),  # its only object invalid
                            "000004": ()})  # no objects at all: kept, as before (a negative image)
    xml = voc_dir(root) / "Annotations"
    with pytest.warns(VocWarning) as caught:
        items = read_split(root, "trainval", ["dog"], invalid_boxes="drop")
    text = str(caught[0].message)
    assert text.startswith("detection.invalid_boxes: drop left out 2 invalid boxes and 1 images:")
    assert f"{xml / '000002.xml'}: object 2 of 2 ('dog', xmin 50, ymin 20, xmax 10, ymax 60): xmax < xmin" in text
    assert f"{xml / '000003.xml'}: object 1 of 1 ('dog', xmin abc, ymin 1, xmax 2, ymax 3)" in text
    assert f"{xml / '000003.xml'}: every object is invalid, so the image is left out" in text
    assert [it.image.stem for it in items] == ["000001", "000002", "000004"]
    assert [len(it.boxes) for it in items] == [1, 1, 0]
    assert items[1].boxes.tolist() == [[9, 19, 50, 60]]
    assert voc_problems(root, ["2007/trainval"], "2007/trainval", invalid_boxes="drop") == []
    # a missing image is not a box: drop cannot skip it
    (voc_dir(root) / "JPEGImages" / "000001.jpg").unlink()
    with pytest.raises(VocError, match=r"000001\.jpg: no such image for 000001"):
        read_split(root, "trainval", ["dog"], invalid_boxes="drop")


def test_training_and_test_sets_are_checked_together(tmp_path):
    root = _tree(tmp_path, {"000001": (("dog", "50", "20", "10", "60"),)}, split="trainval")
    _tree(tmp_path, {"000002": (("dog", "1", "1", "10", "90"),)}, split="test")
    with pytest.raises(VocError) as err:
        read_train_test(root, ["2007/trainval"], "2007/test")
    assert [line.split(": object")[0] for line in str(err.value).splitlines()[:2]] == \
        [str(voc_dir(root) / "Annotations" / f"{i}.xml") for i in ("000001", "000002")]
    assert str(err.value).splitlines() == voc_problems(root, ["2007/trainval"], "2007/test")


def test_unreadable_xml_and_missing_split_are_listed_with_the_boxes(tmp_path):
    root = _tree(tmp_path, {"000001": (("dog", "50", "20", "10", "60"),), "000002": GOOD})
    (voc_dir(root) / "Annotations" / "000002.xml").write_text("<annotation><object>")
    lines = voc_problems(root, ["2007/trainval", "2007/train"], "2007/test")
    main = voc_dir(root) / "ImageSets" / "Main"
    assert lines[0].startswith(f"{voc_dir(root) / 'Annotations' / '000002.xml'}: cannot be read as VOC XML (")
    assert lines[0].endswith(f"; fix it or remove 000002 from {main / 'trainval.txt'}")
    assert lines[1:3] == [f"{main / name}.txt: no such file; the split must be one of ['trainval']"
                          for name in ("train", "test")]
    assert lines[3].startswith(f"{voc_dir(root) / 'Annotations' / '000001.xml'}: object 1 of 1")
    # a year whose tree is missing
    assert voc_problems(root, ["2012/trainval"], "2007/test")[0].startswith(
        f"{voc_dir(root, '2012') / 'Annotations'}: no such folder; detection.voc_root must hold")


def test_a_misspelt_voc_class_is_unknown_not_a_21st_class(tmp_path):
    objects = tuple((c, "1", "1", "10", "10") for c in VOC_CLASSES) + (("persn", "1", "1", "10", "10"),)
    root = _tree(tmp_path, {"000001": objects})
    assert read_classes(root) == list(VOC_CLASSES)
    lines = voc_problems(root, ["2007/trainval"], "2007/trainval")
    assert re.search(r"object 21 of 21 \('persn', .*\): class 'persn' is not one of the 20 classes "
                     r"\(did you mean 'person'\?\)$", lines[0])
    # a tree of other classes (the synthetic shapes, a custom set) keeps its own names
    root2 = _tree(tmp_path / "b", {"000001": (("square", "1", "1", "10", "10"), ("circle", "1", "1", "10", "10"))})
    assert read_classes(root2) == ["circle", "square"]
    assert read_sets(root2, ["2007/trainval"], ["circle", "square"])[0].labels.tolist() == [1, 0]


def test_invalid_boxes_is_a_detection_field_that_keeps_old_identities():
    from pipeline.spec import DetectionSpec, Problem, build_dataclass, to_dict

    assert DetectionSpec().invalid_boxes == "error"
    assert "invalid_boxes" not in to_dict(DetectionSpec(), identity_only=True)  # legacy: old keys unchanged
    problems: list[Problem] = []
    drop = build_dataclass(DetectionSpec, {"invalid_boxes": "drop"}, "detection", problems)
    assert to_dict(drop, identity_only=True)["invalid_boxes"] == "drop"  # it changes which boxes train
    build_dataclass(DetectionSpec, {"invalid_boxes": "skip"}, "detection", problems)
    assert [str(p) for p in problems] == ["detection.invalid_boxes = 'skip': valid values: error, drop"]


def test_detection_stage_refuses_invalid_boxes_before_training(tmp_path):
    from dataclasses import replace

    from evaluators.detection import detection
    from tests.conftest import tiny_config

    root = _tree(tmp_path / "voc", {"000001": (("dog", "50", "20", "10", "60"),)})
    (voc_dir(root) / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    cfg = tiny_config()
    cfg = replace(cfg, detection=replace(cfg.detection, voc_root=str(root), train_sets=("2007/trainval",),
                                         test_set="2007/test"))
    # no checkpoint exists: the error must come from reading the sets, before the model is built
    with pytest.raises(VocError, match=r"000001\.xml: object 1 of 1 \('dog', xmin 50, ymin 20, xmax 10, ymax 60\): "
                                       r"xmax < xmin"):
        detection(cfg, PretrainResult(str(tmp_path / "absent.pt"), 64, 1), tmp_path / "stage", None)


def test_a_class_written_two_ways_is_one_class_and_the_rare_spelling_is_refused(tmp_path):
    box = ("1", "1", "10", "10")
    root = _tree(tmp_path, {"000001": (("dog", *box), ("dog", *box), ("cat", *box)), "000002": (("Dog", *box),),
                            "000003": (("potted_plant", *box), ("potted plant", *box), ("potted plant", *box))})
    assert read_classes(root) == ["cat", "dog", "potted plant"]
    lines = voc_problems(root, ["2007/trainval"], "2007/trainval")
    assert any("000002.xml: object 1 of 1 ('Dog'" in line and "did you mean 'dog'" in line for line in lines)
    assert any("000003.xml: object 1 of 3 ('potted_plant'" in line for line in lines)


def test_boxes_dropped_by_the_stage_are_told_through_its_sink(tmp_path):
    """Stage output goes to Ray's worker logs, which nobody reads; the warning must reach the sink
    (MLflow's sslgrid.warnings tag and the driver's terminal)."""
    from dataclasses import replace

    from evaluators.detection import detection
    from tests.conftest import tiny_config
    from trainers.sink import ListSink

    root = _tree(tmp_path / "voc", {"000001": (("dog", "50", "20", "10", "60"), ("dog", *GOOD[0][1:]))})
    (voc_dir(root) / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    cfg = tiny_config()
    cfg = replace(cfg, detection=replace(cfg.detection, voc_root=str(root), train_sets=("2007/trainval",),
                                         test_set="2007/test", invalid_boxes="drop"))
    sink = ListSink()
    with pytest.raises(FileNotFoundError):  # no checkpoint: it stops when building the model, after the sets
        detection(cfg, PretrainResult(str(tmp_path / "absent.pt"), 64, 1), tmp_path / "stage", sink)
    assert len(sink.warnings) == 1 and "000001.xml: object 1 of 2 ('dog', xmin 50" in sink.warnings[0]
