"""VOC reader on a generated tree (difficult boxes, an image without objects), mAP on known boxes,
and the C4 detector's wiring."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from evaluators.voc import read_classes, read_sets, read_split, voc_dir, write_synthetic_voc


def test_voc_reader_on_generated_tree(tmp_path):
    root = write_synthetic_voc(tmp_path / "voc", n_trainval=40, n_test=10, size=64, seed=0)
    classes = read_classes(root, ("2007", "2012"))
    assert classes == ["circle", "square", "triangle"]
    train = read_sets(root, ["2007/trainval", "2012/trainval"], classes)  # VOC07+12, as MoCo trains
    assert len(train) == 40 and len(read_split(root, "trainval", classes, "2012")) == 20
    assert len(read_sets(root, ["2007/test"], classes)) == 10
    assert sum(len(read_split(root, s, classes, y)) for s in ("train", "val") for y in ("2007", "2012")) == 40
    assert len({it.image for it in train}) == 40
    assert any(len(it.boxes) == 0 for it in train)  # images without objects are kept
    assert any(it.difficult.any() for it in train) and any((~it.difficult).any() for it in train)
    for it in train:
        assert it.image.exists() and it.boxes.shape == (len(it.labels), 4) and len(it.difficult) == len(it.labels)
        if len(it.boxes):
            assert (it.boxes[:, :2] >= 0).all() and (it.boxes[:, 2:] <= 64).all()
            assert (it.boxes[:, 2:] > it.boxes[:, :2]).all()
    # the 1-based inclusive XML coordinates come back 0-based: xmin - 1
    first = next(it for it in train if len(it.boxes))
    xml = (first.image.parent.parent / "Annotations" / f"{first.image.stem}.xml").read_text()
    xmin = int(xml.split("<xmin>")[1].split("<")[0])
    assert first.boxes[0, 0] == xmin - 1
    # a second call reuses the tree
    assert write_synthetic_voc(tmp_path / "voc", 40, 10, 64, 0) == root


def test_voc_reader_names_a_missing_split(tmp_path):
    from evaluators.voc import VocError

    root = write_synthetic_voc(tmp_path / "voc", 4, 2, 32, 0)
    with pytest.raises(VocError, match=r"test2007\.txt: no such file; the split must be one of"):
        read_split(root, "test2007", read_classes(root))
    import shutil

    shutil.rmtree(voc_dir(root, "2012"))  # a tree with VOC2007 only, and the 07+12 default
    with pytest.raises(VocError, match=r"VOC2012/Annotations: no such folder; detection.voc_root must hold "
                                       r"VOCdevkit/VOC2012/Annotations, or leave 2012 out of detection.train_sets"):
        read_classes(root, ("2007", "2012"))


def test_voc_sets_are_checked_when_the_grid_loads():
    from pipeline.spec import DetectionSpec, Problem, build_dataclass

    problems: list[Problem] = []
    build_dataclass(DetectionSpec, {"train_sets": ["2007-trainval"], "test_set": "test"}, "detection", problems)
    assert [str(p) for p in problems] == ["detection.train_sets[0] = '2007-trainval': must look like '2007/trainval'",
                                          "detection.test_set = 'test': must look like '2007/test'"]


def test_map_on_known_boxes():
    from torchmetrics.detection import MeanAveragePrecision

    gt = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]]), "labels": torch.tensor([1, 1]),
           "iscrowd": torch.tensor([0, 0])}]
    perfect = [{"boxes": gt[0]["boxes"].clone(), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1])}]
    m = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    m.update(perfect, gt)
    out = m.compute()
    assert float(out["map"]) == pytest.approx(1.0) and float(out["map_50"]) == pytest.approx(1.0)
    # one hit and one miss ranked below it: precision 1 up to recall 0.5, then nothing: COCO's
    # 101-point interpolation gives 51/101
    half = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]]), "scores": torch.tensor([0.9, 0.8]),
             "labels": torch.tensor([1, 1])}]
    m = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    m.update(half, gt)
    assert float(m.compute()["map_50"]) == pytest.approx(51 / 101, abs=1e-4)
    # a difficult (crowd) box that is missed costs nothing
    gt_d = [{**gt[0], "iscrowd": torch.tensor([0, 1])}]
    m = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    m.update([{k: v[:1] for k, v in half[0].items()}], gt_d)
    assert float(m.compute()["map_50"]) == pytest.approx(1.0)


def test_c4_detector_is_initialised_from_the_checkpoint(tmp_path):
    from evaluators.detection import build_detector
    from tests.conftest import tiny_config
    from trainers import checkpoint
    from trainers.backbones import build_backbone

    cfg = tiny_config()
    bb = build_backbone(cfg.backbone)
    checkpoint.atomic_save({"backbone": bb.state_dict()}, tmp_path / "final.pt")
    p = replace(cfg.detection, min_size=(64,), max_size=64, anchor_sizes=(8, 16, 32), norm="frozen")
    det = build_detector(cfg.backbone, tmp_path / "final.pt", 3, p)
    # res5 (the box head) and the trunk carry the pretrained weights
    assert torch.equal(det.roi_heads.box_head.res5.conv1.weight, bb.layers[-1].conv1.weight)
    assert torch.equal(det.backbone.body[0][0].weight, bb.stem[0].weight)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in det.modules())  # norm: frozen
    det.eval()
    with torch.no_grad():
        out = det([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "labels", "scores"}


class _Killed(Exception):
    pass


class _KillAfter:
    """A sink that dies once the stage reports ``at`` iterations done (right after that checkpoint)."""

    def __init__(self, at: int):
        from trainers.sink import ListSink

        self.inner, self.at = ListSink(), at
        self.metrics = self.inner.metrics

    def log(self, metrics, step):
        self.inner.log(metrics, step)

    def artifact(self, path):
        self.inner.artifact(path)

    def warn(self, message):
        self.inner.warn(message)

    def progress(self, done, total):
        self.inner.progress(done, total)
        if done == self.at:
            raise _Killed


def test_killed_detection_resumes_from_its_checkpoint_and_matches_uninterrupted(tmp_path, monkeypatch):
    from evaluators.detection import detection
    from tests.conftest import tiny_config
    from trainers.pretrain import pretrain
    from trainers.sink import ListSink

    monkeypatch.setenv("SSLGRID_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(method="none")
    pre = pretrain(cfg, tmp_path / "pre", ListSink())
    d = cfg.detection
    cfg = replace(cfg, detection=replace(
        d, iterations=6, batch_size=2, steps=(5,), warmup_iters=2, min_size=(64,), max_size=64,
        anchor_sizes=(8, 16, 32), rois_per_image=32, proposals_train=50, proposals_test=50, ckpt_every=2,
        log_every=1, synthetic=replace(d.synthetic, trainval=12, test=6, size=64, seed=0)))
    whole = detection(cfg, pre, tmp_path / "whole", ListSink())
    with pytest.raises(_Killed):
        detection(cfg, pre, tmp_path / "cut", _KillAfter(4))
    sink = ListSink()
    resumed = detection(cfg, pre, tmp_path / "cut", sink)
    assert [m["resumed_from_iteration"] for _, m in sink.metrics if "resumed_from_iteration" in m] == [4.0]
    assert resumed == whole
    from trainers import checkpoint

    a = checkpoint.load(tmp_path / "whole" / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_multi_scale_training_draws_from_min_size_and_tests_at_the_last(tmp_path):
    from evaluators.detection import build_detector
    from pipeline.spec import DetectionSpec, Problem, build_dataclass
    from tests.conftest import tiny_config
    from trainers import checkpoint
    from trainers.backbones import build_backbone

    problems: list[Problem] = []
    assert build_dataclass(DetectionSpec, {"min_size": 64}, "detection", problems).min_size == (64,)
    assert DetectionSpec().min_size == tuple(range(480, 801, 32))  # MoCo's VOC recipe
    assert not problems
    cfg = tiny_config()
    checkpoint.atomic_save({"backbone": build_backbone(cfg.backbone).state_dict()}, tmp_path / "final.pt")
    p = replace(cfg.detection, min_size=(40, 56, 72), max_size=1000, anchor_sizes=(8, 16, 32))
    det = build_detector(cfg.backbone, tmp_path / "final.pt", 3, p)
    img = torch.rand(3, 64, 64)
    torch.manual_seed(0)
    det.transform.train()
    seen = {det.transform([img])[0].image_sizes[0][0] for _ in range(30)}
    assert seen == {40, 56, 72}
    det.transform.eval()
    assert {det.transform([img])[0].image_sizes[0][0] for _ in range(5)} == {72}
