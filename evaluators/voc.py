"""PASCAL VOC layout: a reader, and a synthetic detection set written in that same layout.

Layout (``root`` is the folder that holds ``VOCdevkit``)::

    VOCdevkit/VOC<YEAR>/Annotations/<id>.xml        boxes: 1-based inclusive pixel coordinates
    VOCdevkit/VOC<YEAR>/JPEGImages/<id>.jpg
    VOCdevkit/VOC<YEAR>/ImageSets/Main/<split>.txt  one id per line (train, val, trainval, test)

The reader turns boxes into 0-based ``x1, y1, x2, y2`` with exclusive ends (VOC's xmin − 1,
ymin − 1, xmax, ymax, as detectron2's loader does), keeps the ``difficult`` flag per box, and
accepts images without objects. The class list is read from the data: the sorted names of every
object in ``Annotations``, so a real VOC tree gives its 20 classes and the synthetic one its 3.

``YEAR/split`` entries (``2007/trainval``) name a split of ``VOCdevkit/VOC<YEAR>``; several are
concatenated, as MoCo trains on VOC07+12 trainval and tests on VOC07 test.

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


def voc_dir(root: str | Path, year: str = "2007") -> Path:
    return Path(root) / "VOCdevkit" / f"VOC{year}"


def parse_set(entry: str) -> tuple[str, str]:
    """``"2007/trainval"`` → (``"2007"``, ``"trainval"``)."""
    year, _, split = entry.partition("/")
    return year, split


def read_classes(root: str | Path, years: tuple[str, ...] = ("2007",)) -> list[str]:
    """The sorted names of every object annotated in the given years' trees."""
    names = set()
    for year in years:
        ann = voc_dir(root, year) / "Annotations"
        if not ann.is_dir():
            raise VocError(f"{ann}: no such folder; detection.voc_root must hold VOCdevkit/VOC{year}/Annotations, "
                           f"or leave {year} out of detection.train_sets and detection.test_set")
        for f in ann.glob("*.xml"):
            names.update(o.findtext("name") for o in ET.parse(f).getroot().iter("object"))
    return sorted(n for n in names if n)


def read_sets(root: str | Path, sets: list[str] | tuple[str, ...], classes: list[str]) -> list[VocItem]:
    """The concatenation of ``YEAR/split`` entries, e.g. MoCo's ``["2007/trainval", "2012/trainval"]``."""
    items: list[VocItem] = []
    for entry in sets:
        year, split = parse_set(entry)
        items += read_split(root, split, classes, year)
    return items


def read_split(root: str | Path, split: str, classes: list[str], year: str = "2007") -> list[VocItem]:
    d = voc_dir(root, year)
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
    """Write the synthetic set under ``root`` (once; an existing complete tree is reused), laid out
    as VOC07+12 is: VOC2007 holds the first half of the trainval images and the test images,
    VOC2012 the other half of trainval. Each year's trainval is split into train and val halves."""
    root = Path(root)
    if (voc_dir(root, "2012") / "ImageSets" / "Main" / "trainval.txt").exists():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for year in ("2007", "2012"):
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (voc_dir(tmp, year) / sub).mkdir(parents=True)
    rng = random.Random(seed)
    splits: dict[tuple[str, str], list[str]] = {("2007", "trainval"): [], ("2012", "trainval"): [], ("2007", "test"): []}
    first_half = (n_trainval + 1) // 2
    for i in range(n_trainval + n_test):
        image_id = f"{i:06d}"
        year, split = ("2007", "trainval") if i < first_half else ("2012", "trainval") if i < n_trainval else ("2007", "test")
        im, objects = _canvas(rng, size)
        d = voc_dir(tmp, year)
        im.save(d / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (d / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, size, objects))
        splits[(year, split)].append(image_id)
    for year in ("2007", "2012"):
        half = len(splits[(year, "trainval")]) // 2
        splits[(year, "train")], splits[(year, "val")] = splits[(year, "trainval")][:half], splits[(year, "trainval")][half:]
    for (year, name), ids in splits.items():
        (voc_dir(tmp, year) / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root
