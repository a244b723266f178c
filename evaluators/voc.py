"""PASCAL VOC layout: a reader, and a synthetic detection set written in that same layout.

Layout (``root`` is the folder that holds ``VOCdevkit``)::

    VOCdevkit/VOC<YEAR>/Annotations/<id>.xml        boxes: 1-based inclusive pixel coordinates
    VOCdevkit/VOC<YEAR>/JPEGImages/<id>.jpg
    VOCdevkit/VOC<YEAR>/ImageSets/Main/<split>.txt  one id per line (train, val, trainval, test)

The reader turns boxes into 0-based ``x1, y1, x2, y2`` with exclusive ends (VOC's xmin − 1,
ymin − 1, xmax, ymax, as detectron2's loader does), keeps the ``difficult`` flag per box, and
accepts images without objects. The class list is read from the data: the sorted names of every
object in ``Annotations``, so a real VOC tree gives its 20 classes and the synthetic one its 3; a
tree that has all 20 VOC classes and more names gets the 20, and the other names are invalid.

Every box is checked when a split is read, not when training first draws its image (torchvision's
FasterRCNN then asserts on coordinates it has flipped, naming no file). A box is invalid when its
class is missing or unknown, its ``bndbox`` or a coordinate is missing or not a number, it is
reversed (``xmax < xmin`` or ``ymax < ymin``; equal ends are one pixel wide, VOC's ends being
inclusive), or it leaves the image (``xmin``/``ymin`` below 1, ``xmax``/``ymax`` beyond the XML's
``<size>``). ``invalid_boxes: error`` refuses the sets and lists every invalid box (file, object,
coordinates); ``drop`` leaves them out with a warning that names them, and leaves out an image whose
every object was invalid (trained on, its unlabelled objects would be taught as background).
An unreadable XML, a missing image or split file cannot be dropped: they are always errors.
``voc_problems`` runs the same checks (XML only, no image decoded) for ``sslgrid run`` to refuse a
grid before anything launches.

``YEAR/split`` entries (``2007/trainval``) name a split of ``VOCdevkit/VOC<YEAR>``; several are
concatenated, as MoCo trains on VOC07+12 trainval and tests on VOC07 test.

The synthetic set (the embedded default) draws 0–3 coloured shapes (square, circle, triangle) per
canvas on a flat background. Shapes smaller than 8 px across are marked difficult, as VOC marks hard
objects. It is generated once into the cache, in the VOC layout, by write-then-rename, so the tests
exercise the real reader.
"""
from __future__ import annotations

import difflib
import math
import random
import re
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

if TYPE_CHECKING:
    import torch

from trainers.files import atomic_write

SHAPES = ("circle", "square", "triangle")
# PASCAL VOC's 20 classes (devkit VOCinit.m), in the sorted order read_classes gives them
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
INVALID_BOXES = ("error", "drop")  # detection.invalid_boxes
LISTED = 20  # problems listed in full; the rest are counted


class VocError(Exception):
    """A VOC tree that cannot be read; the message names the file and the fix."""


class VocWarning(UserWarning):
    """Boxes (and images) left out under ``invalid_boxes: drop``; the message names each."""


@dataclass
class VocItem:
    image: Path
    boxes: torch.Tensor  # N×4 float, x1 y1 x2 y2, 0-based
    labels: torch.Tensor  # N int64, indices into classes
    difficult: torch.Tensor  # N bool


@dataclass
class _Scan:
    """What reading some splits found: the images with their valid boxes, the invalid boxes (which
    ``drop`` may leave out) and the file problems (which nothing may skip), as messages."""

    items: list[VocItem] = field(default_factory=list)
    bad_boxes: list[str] = field(default_factory=list)
    bad_files: list[str] = field(default_factory=list)
    emptied: list[str] = field(default_factory=list)  # images whose every object is invalid
    emptied_images: set[Path] = field(default_factory=set)


def voc_dir(root: str | Path, year: str = "2007") -> Path:
    return Path(root) / "VOCdevkit" / f"VOC{year}"


def parse_set(entry: str) -> tuple[str, str]:
    """``"2007/trainval"`` → (``"2007"``, ``"trainval"``)."""
    year, _, split = entry.partition("/")
    return year, split


def _name(obj: ET.Element) -> str:
    return (obj.findtext("name") or "").strip()


def read_classes(root: str | Path, years: tuple[str, ...] = ("2007",)) -> list[str]:
    """The sorted names of every object annotated in the given years' trees; VOC's 20 when they are
    all there (other names are then typos, which the split readers report as unknown classes), and
    one name per class written several ways (case, spaces, ``_`` or ``-``): its most frequent."""
    counts: Counter[str] = Counter()
    for year in years:
        ann = voc_dir(root, year) / "Annotations"
        if not ann.is_dir():
            raise VocError(f"{ann}: no such folder; detection.voc_root must hold VOCdevkit/VOC{year}/Annotations, "
                           f"or leave {year} out of detection.train_sets and detection.test_set")
        for f in ann.glob("*.xml"):
            try:
                counts.update(_name(o) for o in ET.parse(f).getroot().iter("object"))
            except (OSError, ET.ParseError):
                pass  # reported by the split reader when a split lists it, and harmless when none does
    counts.pop("", None)
    if set(counts) > set(VOC_CLASSES):
        return list(VOC_CLASSES)
    # one class written two ways ("Dog" and "dog", "potted plant" and "pottedplant"): the most
    # frequent spelling is the class, the others are invalid names that the split readers report
    spellings: dict[str, list[str]] = {}
    for name in counts:
        spellings.setdefault(re.sub(r"[\s_-]+", "", name.lower()), []).append(name)
    return sorted(max(group, key=lambda n: (counts[n], n)) for group in spellings.values())


def _size(tree: ET.Element) -> tuple[float, float] | None:
    """The image's (width, height) from ``<size>``, or None when absent or not positive numbers (then
    only the 1-based lower bound can be checked: no image is decoded to find the size)."""
    try:
        w, h = float(tree.findtext("size/width")), float(tree.findtext("size/height"))
    except (TypeError, ValueError):
        return None
    return (w, h) if w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h) else None


def _box_problems(obj: ET.Element, index: dict[str, int], size: tuple[float, float] | None
                  ) -> tuple[list[float] | None, list[str]]:
    """One ``<object>``'s VOC coordinates (xmin, ymin, xmax, ymax, 1-based inclusive) and what is
    wrong with it (empty when it is a valid box)."""
    reasons = []
    name = _name(obj)
    if not name:
        reasons.append("it has no <name>")
    elif name not in index:
        close = difflib.get_close_matches(name, list(index), n=1)
        reasons.append(f"class {name!r} is not one of the {len(index)} classes"
                       + (f" (did you mean {close[0]!r}?)" if close else f" ({', '.join(index)})"))
    bb = obj.find("bndbox")
    if bb is None:
        return None, reasons + ["it has no <bndbox>"]
    coords = []
    for k in ("xmin", "ymin", "xmax", "ymax"):
        text = bb.findtext(k)
        try:
            v = float(text)
            if not math.isfinite(v):
                raise ValueError
            coords.append(v)
        except (TypeError, ValueError):
            reasons.append(f"<{k}> is missing" if text is None else f"<{k}> is {text.strip()!r}, not a number")
    if len(coords) < 4:
        return None, reasons
    x1, y1, x2, y2 = coords
    if x2 < x1:
        reasons.append("xmax < xmin")
    if y2 < y1:
        reasons.append("ymax < ymin")
    if x1 < 1 or y1 < 1:
        reasons.append("it starts left of or above the image (VOC coordinates start at 1)")
    if size is not None and (x2 > size[0] or y2 > size[1]):
        reasons.append(f"it ends beyond the {size[0]:g}x{size[1]:g} image of <size>")
    return coords, reasons


def _describe(obj: ET.Element) -> str:
    bb = obj.find("bndbox")
    coords = "no <bndbox>" if bb is None else ", ".join(f"{k} {(bb.findtext(k) or '(missing)').strip()}"
                                                         for k in ("xmin", "ymin", "xmax", "ymax"))
    return f"{_name(obj) or '(no name)'!r}, {coords}"


def _scan_split(root: str | Path, split: str, classes: list[str], year: str, scan: _Scan) -> None:
    """Read one split into ``scan``: every image with its valid boxes, and a message per problem."""
    import torch  # here, so that voc_problems' callers import torch only when a VOC set is checked

    d = voc_dir(root, year)
    ids_file = d / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.exists():
        known = sorted(p.stem for p in (d / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        scan.bad_files.append(f"{ids_file}: no such file; the split must be one of {known}")
        return
    index = {c: i for i, c in enumerate(classes)}
    for image_id in ids_file.read_text().split():
        xml = d / "Annotations" / f"{image_id}.xml"
        image = d / "JPEGImages" / f"{image_id}.jpg"
        try:
            tree = ET.parse(xml).getroot()
        except (OSError, ET.ParseError) as err:
            scan.bad_files.append(f"{xml}: cannot be read as VOC XML ({err}); fix it or remove {image_id} "
                                  f"from {ids_file}")
            continue
        if not image.is_file():
            scan.bad_files.append(f"{image}: no such image for {image_id}, listed in {ids_file}; add it or remove "
                                  f"{image_id} from the split")
        size = _size(tree)
        objects = list(tree.iter("object"))
        boxes, labels, difficult = [], [], []
        for i, obj in enumerate(objects, 1):
            coords, reasons = _box_problems(obj, index, size)
            if reasons:
                scan.bad_boxes.append(f"{xml}: object {i} of {len(objects)} ({_describe(obj)}): {'; '.join(reasons)}")
                continue
            x1, y1, x2, y2 = coords
            boxes.append([x1 - 1, y1 - 1, x2, y2])
            labels.append(index[_name(obj)])
            difficult.append(obj.findtext("difficult", "0").strip() == "1")
        if objects and not boxes:
            scan.emptied.append(f"{xml}: every object is invalid, so the image is left out")
            scan.emptied_images.add(image)
        scan.items.append(VocItem(image, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                  torch.tensor(labels, dtype=torch.int64), torch.tensor(difficult, dtype=torch.bool)))


def _listed(lines: list[str], what: str) -> list[str]:
    lines = list(dict.fromkeys(lines))  # a split read twice (train and test) reports once
    return lines[:LISTED] + ([f"... and {len(lines) - LISTED} more {what}"] if len(lines) > LISTED else [])


def _messages(scan: _Scan, invalid_boxes: str) -> list[str]:
    """What refuses the sets: every file problem, and under ``error`` every invalid box, then the fix."""
    out = _listed(scan.bad_files, "file problems")
    if invalid_boxes == "error" and scan.bad_boxes:
        n, files = len(set(scan.bad_boxes)), len({b.split(": object ")[0] for b in scan.bad_boxes})
        out += _listed(scan.bad_boxes, "invalid boxes")
        out.append(f"{n} invalid box{'es' if n > 1 else ''} in {files} annotation file{'s' if files > 1 else ''}: "
                   f"fix {'them' if n > 1 else 'it'}, or set detection.invalid_boxes: drop to leave invalid boxes "
                   f"out (each is named in a warning when the stage reads the sets)")
    return out


def _check_mode(invalid_boxes: str) -> None:
    if invalid_boxes not in INVALID_BOXES:
        raise ValueError(f"invalid_boxes {invalid_boxes!r}: valid values are {', '.join(INVALID_BOXES)}")


def _finish(scan: _Scan, invalid_boxes: str) -> list[VocItem]:
    """The items of ``scan``; raises VocError listing what refuses them, or warns about what it dropped."""
    _check_mode(invalid_boxes)
    problems = _messages(scan, invalid_boxes)
    if problems:
        raise VocError("\n".join(problems))
    if scan.bad_boxes:
        dropped = _listed(scan.bad_boxes, "invalid boxes") + _listed(scan.emptied, "images left out")
        warnings.warn(f"detection.invalid_boxes: drop left out {len(set(scan.bad_boxes))} invalid boxes and "
                      f"{len(set(scan.emptied))} images:\n  " + "\n  ".join(dropped), VocWarning, stacklevel=3)
    return [it for it in scan.items if it.image not in scan.emptied_images]


def read_sets(root: str | Path, sets: list[str] | tuple[str, ...], classes: list[str],
              invalid_boxes: str = "error") -> list[VocItem]:
    """The concatenation of ``YEAR/split`` entries, e.g. MoCo's ``["2007/trainval", "2012/trainval"]``.
    Raises VocError listing every file problem, and under ``invalid_boxes: error`` every invalid box
    (module docstring); under ``drop`` warns (VocWarning) naming the boxes and images it left out."""
    scan = _Scan()
    for entry in sets:
        year, split = parse_set(entry)
        _scan_split(root, split, classes, year, scan)
    return _finish(scan, invalid_boxes)


def read_split(root: str | Path, split: str, classes: list[str], year: str = "2007",
               invalid_boxes: str = "error") -> list[VocItem]:
    """One split of ``VOCdevkit/VOC<year>``; errors and warnings as ``read_sets``."""
    return read_sets(root, [f"{year}/{split}"], classes, invalid_boxes)


def _scan_train_test(root: str | Path, train_sets: list[str] | tuple[str, ...], test_set: str
                     ) -> tuple[list[str], _Scan, _Scan]:
    """(classes, the training sets' scan, the test set's scan); raises VocError for a missing year."""
    years = tuple(dict.fromkeys(parse_set(e)[0] for e in [*train_sets, test_set]))
    classes = read_classes(root, years)
    train, test = _Scan(), _Scan()
    for entry in train_sets:
        year, split = parse_set(entry)
        _scan_split(root, split, classes, year, train)
    year, split = parse_set(test_set)
    _scan_split(root, split, classes, year, test)
    return classes, train, test


def _joined(a: _Scan, b: _Scan) -> _Scan:
    return _Scan(a.items + b.items, a.bad_boxes + b.bad_boxes, a.bad_files + b.bad_files, a.emptied + b.emptied,
                 a.emptied_images | b.emptied_images)


def read_train_test(root: str | Path, train_sets: list[str] | tuple[str, ...], test_set: str,
                    invalid_boxes: str = "error") -> tuple[list[str], list[VocItem], list[VocItem]]:
    """(classes, training items, test items) of a detection stage. Both are checked together, so one
    VocError lists the problems of all sets; errors and warnings as ``read_sets``."""
    _check_mode(invalid_boxes)
    classes, train, test = _scan_train_test(root, train_sets, test_set)
    _finish(_joined(train, test), invalid_boxes)  # raises, or warns once for all sets
    return (classes, [it for it in train.items if it.image not in train.emptied_images],
            [it for it in test.items if it.image not in test.emptied_images])


def voc_problems(root: str | Path, train_sets: list[str] | tuple[str, ...], test_set: str,
                 invalid_boxes: str = "error") -> list[str]:
    """What would make a detection stage on ``root`` refuse its sets, one message each (at most
    LISTED of a kind, then a count; the last names the fix), from the XML files alone (no image is
    decoded): for ``sslgrid run`` to refuse the grid before any stage launches. Empty when the sets
    would be read (under ``drop``, invalid boxes are not problems: the stage drops and names them)."""
    _check_mode(invalid_boxes)
    try:
        _, train, test = _scan_train_test(root, train_sets, test_set)
    except VocError as err:
        return [str(err)]
    return _messages(_joined(train, test), invalid_boxes)


def load_image(path: Path) -> torch.Tensor:
    """uint8 3×H×W."""
    import torch

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
    with atomic_write(root, folder=True) as tmp:  # another process may publish the identical set first
        _write_synthetic_voc(tmp, n_trainval, n_test, size, seed)
    return root


def _write_synthetic_voc(tmp: Path, n_trainval: int, n_test: int, size: int, seed: int) -> None:
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
