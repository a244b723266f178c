"""PASCAL VOC layout: a reader, and a synthetic detection set written in that same layout.

Layout (``root`` is the folder that holds ``VOCdevkit``)::

    VOCdevkit/VOC2007/Annotations/<id>.xml        boxes: 1-based inclusive pixel coordinates
    VOCdevkit/VOC2007/JPEGImages/<id>.jpg
    VOCdevkit/VOC2007/ImageSets/Main/<split>.txt  one id per line (train, val, trainval, test)

The reader turns boxes into 0-based ``x1, y1, x2, y2`` with exclusive ends (VOC's xmin − 1,
ymin − 1, xmax, ymax, as detectron2's loader does), keeps the ``difficult`` flag per box, and
accepts images without objects. The class list is read from the data: the sorted names of every
object in ``Annotations``, so a real VOC tree gives its 20 classes and the synthetic one its 3.

The synthetic set (the embedded default) draws 0–3 coloured shapes (square, circle, triangle) per
canvas on a flat background. Shapes smaller than 8 px across are marked difficult, as VOC marks hard
objects. It is generated once into the cache, in the VOC layout, by write-then-rename, so the tests
exercise the real reader.
"""
from __future__ import annotations

import os
import random
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


class VocError(Exception):
    """A VOC tree that cannot be read; the message names the file and the fix."""


@dataclass
class VocItem:
    image: Path
    boxes: torch.Tensor  # N×4 float, x1 y1 x2 y2, 0-based
    labels: torch.Tensor  # N int64, indices into classes
    difficult: torch.Tensor  # N bool


def voc_dir(root: str | Path) -> Path:
    return Path(root) / "VOCdevkit" / "VOC2007"


def read_classes(root: str | Path) -> list[str]:
    ann = voc_dir(root) / "Annotations"
    if not ann.is_dir():
        raise VocError(f"{ann}: no such folder; detection.voc_root must hold VOCdevkit/VOC2007/Annotations")
    names = set()
    for f in ann.glob("*.xml"):
        names.update(o.findtext("name") for o in ET.parse(f).getroot().iter("object"))
    return sorted(n for n in names if n)


def read_split(root: str | Path, split: str, classes: list[str]) -> list[VocItem]:
    d = voc_dir(root)
    ids_file = d / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.exists():
        raise VocError(f"{ids_file}: no such file; the split must be one of "
                       f"{sorted(p.stem for p in (d / 'ImageSets' / 'Main').glob('*.txt') if '_' not in p.stem)}")
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for image_id in ids_file.read_text().split():
        xml = d / "Annotations" / f"{image_id}.xml"
        try:
            tree = ET.parse(xml).getroot()
        except (OSError, ET.ParseError) as err:
            raise VocError(f"{xml}: cannot be read as VOC XML ({err}); fix or remove {image_id} from {ids_file}") from None
        boxes, labels, difficult = [], [], []
        for obj in tree.iter("object"):
            bb = obj.find("bndbox")
            x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([x1 - 1, y1 - 1, x2, y2])
            labels.append(index[obj.findtext("name")])
            difficult.append(obj.findtext("difficult", "0").strip() == "1")
        items.append(VocItem(d / "JPEGImages" / f"{image_id}.jpg", torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                             torch.tensor(labels, dtype=torch.int64), torch.tensor(difficult, dtype=torch.bool)))
    return items


def load_image(path: Path) -> torch.Tensor:
    """uint8 3×H×W."""
    with Image.open(path) as im:
        data = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
        return data.view(im.height, im.width, 3).permute(2, 0, 1).contiguous()


def _xml(image_id: str, size: int, objects: list[tuple[str, tuple[int, int, int, int], bool]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{int(d)}</difficult>"
        f"<bndbox><xmin>{b[0] + 1}</xmin><ymin>{b[1] + 1}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename><size><width>{size}</width>"
            f"<height>{size}</height><depth>3</depth></size><segmented>0</segmented>{objs}</annotation>")


def _canvas(rng: random.Random, size: int) -> tuple[Image.Image, list]:
    bg = tuple(rng.randrange(256) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    objects = []
    for _ in range(rng.choice((0, 1, 1, 2, 2, 3))):
        shape = rng.choice(SHAPES)
        side = rng.randint(max(5, size // 12), max(6, size // 2))
        x1, y1 = rng.randint(0, size - side), rng.randint(0, size - side)
        box = (x1, y1, x1 + side, y1 + side)
        while True:  # a colour that stands out from the background
            fg = tuple(rng.randrange(256) for _ in range(3))
            if sum(abs(a - b) for a, b in zip(fg, bg)) > 150:
                break
        if shape == "circle":
            draw.ellipse([x1, y1, x1 + side - 1, y1 + side - 1], fill=fg)
        elif shape == "square":
            draw.rectangle([x1, y1, x1 + side - 1, y1 + side - 1], fill=fg)
        else:
            draw.polygon([(x1 + side / 2, y1), (x1, y1 + side - 1), (x1 + side - 1, y1 + side - 1)], fill=fg)
        objects.append((shape, box, side < 8))
    return im, objects


def write_synthetic_voc(root: Path, n_trainval: int, n_test: int, size: int, seed: int) -> Path:
    """Write the synthetic set under ``root`` (once; an existing complete tree is reused)."""
    root = Path(root)
    if (voc_dir(root) / "ImageSets" / "Main" / "test.txt").exists():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    d = voc_dir(tmp)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (d / sub).mkdir(parents=True)
    rng = random.Random(seed)
    splits: dict[str, list[str]] = {"trainval": [], "test": []}
    for i in range(n_trainval + n_test):
        image_id = f"{i:06d}"
        im, objects = _canvas(rng, size)
        im.save(d / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (d / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, size, objects))
        splits["trainval" if i < n_trainval else "test"].append(image_id)
    half = len(splits["trainval"]) // 2
    splits["train"], splits["val"] = splits["trainval"][:half], splits["trainval"][half:]
    for name, ids in splits.items():
        (d / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root
