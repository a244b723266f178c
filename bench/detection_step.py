"""One Faster R-CNN C4 training iteration (evaluators/detection.py) at detectron2's C4 RoI head
(14×14 RoIAlign, the quickstart's 64 RoIs per image before it was cut) against the smaller heads a
CPU run can afford, same backbone, images and batch, in one run. Prints seconds per iteration and
the ratio to the reference head.

    python bench/detection_step.py [--iters 3] [--batch 8] [--size 64] [--threads 1]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from evaluators.detection import _target, build_detector, voc_root
from evaluators.voc import load_image, read_classes, read_sets
from pipeline.spec import BackboneSpec, DetectionSpec
from trainers import checkpoint
from trainers.backbones import build_backbone


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backbone = BackboneSpec(name="tiny_resnet")
    tmp = Path(tempfile.mkdtemp(prefix="bench-det-"))
    checkpoint.atomic_save({"backbone": build_backbone(backbone).state_dict()}, tmp / "final.pt")
    d = DetectionSpec()
    base = replace(d, min_size=(args.size,), max_size=args.size, anchor_sizes=(8, 16, 32), proposals_train=200,
                   proposals_test=100, synthetic=replace(d.synthetic, size=args.size))
    root = voc_root(base)
    classes = read_classes(root, ("2007", "2012"))
    train = read_sets(root, base.train_sets, classes)[:args.batch]
    images = [load_image(it.image).float() / 255 for it in train]
    targets = [_target(it, keep_difficult=False) for it in train]
    print(f"torch threads: {args.threads}, batch {args.batch}, {args.size} px, tiny_resnet C4, "
          f"{args.iters} timed iterations after one warm-up")
    heads = [(14, 64, "detectron2 C4 side, 64 RoIs (reference)"), (8, 32, ""), (6, 32, ""),
             (6, 16, "the quickstart's")]
    ref = None
    for roi, rois, label in heads:
        torch.manual_seed(0)
        model = build_detector(backbone, tmp / "final.pt", len(classes), replace(base, roi_size=roi, rois_per_image=rois))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.0)
        times = []
        for i in range(args.iters + 1):
            t0 = time.perf_counter()
            loss = sum(model(images, targets).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t0)
        sec = sorted(times)[len(times) // 2]
        ref = ref or sec
        print(f"RoIAlign {roi:>2}x{roi:<2} {rois:>3} RoIs/image: {sec:6.3f} s/iteration   {ref / sec:4.1f}x  {label}")


if __name__ == "__main__":
    main()
