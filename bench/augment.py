"""Two-view MoCo v2 augmentation throughput: our batched tensor path against the reference way,
torchvision's PIL transforms applied per image in DataLoader workers (moco main_moco.py's
TwoCropsTransform over aug-plus), on the same images, in one run. Prints images/s and the ratio.

    python bench/augment.py [--n 2048] [--sizes 32 224] [--workers 2]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image, ImageFilter

from pipeline.spec import DatasetSpec
from trainers.augment import AugmentParams, augment
from trainers.data import load_split


class PILBlur:
    """moco/loader.py's GaussianBlur: PIL's filter with σ ~ U[0.1, 2]."""

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = float(torch.empty(1).uniform_(0.1, 2.0))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


class TwoViews:
    def __init__(self, t):
        self.t = t

    def __call__(self, img):
        return self.t(img), self.t(img)


class PILSet(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, transform):
        self.pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pil)

    def __getitem__(self, i):
        return self.transform(self.pil[i])


def aug_plus(size: int) -> T.Compose:
    """moco main_moco.py's aug-plus transform, on PIL images."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([PILBlur()], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])


def reference(images: torch.Tensor, size: int, workers: int, batch: int) -> float:
    aug_plus_t = aug_plus(size)
    loader = torch.utils.data.DataLoader(PILSet(images, TwoViews(aug_plus_t)), batch_size=batch, num_workers=workers)
    t0 = time.perf_counter()
    for q, k in loader:
        pass
    return len(images) / (time.perf_counter() - t0)


def ours(images: torch.Tensor, size: int, batch: int) -> float:
    p = AugmentParams()
    g = torch.Generator().manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(dev)
        q, k = augment(x, p, size, g), augment(x, p, size, g)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    base = load_split(DatasetSpec(name="synthetic", num_train=4000, num_val=1000, image_size=32, seed=0), "train")
    print(f"torch threads {torch.get_num_threads()}, reference DataLoader workers {args.workers}, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, {args.n} images, two views each")
    for size in args.sizes:
        src = base.images[:args.n]
        if size != 32:  # the ImageNet regime: decoded images a little larger than the crop
            src = F.interpolate(src.float(), size=round(size * 256 / 224), mode="bilinear").round().to(torch.uint8)
        ours(src[:args.batch], size, args.batch)  # warm-up
        r = reference(src, size, args.workers, args.batch)
        o = ours(src, size, args.batch)
        print(f"{size:4d} px: ours {o:8.0f} img/s   PIL per-image {r:8.0f} img/s   ratio {o / r:5.1f}x")


if __name__ == "__main__":
    main()
