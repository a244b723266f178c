"""Our MoCo v2 training step (trainers/moco.py, as the training loop runs it: autocast to
``--precision``, channels_last and cudnn.benchmark on CUDA, foreach momentum update) against a plain
fp32 transcription of MoCo's Algorithm 1 (He et al. 2020, the paper's pseudocode; moco/builder.py's
per-parameter momentum loop), with the same backbone, MLP head, batch and pre-computed augmented
views, in one run. Prints images/s and the ratios.

The fp32 reference runs with TF32 off (``torch.backends.cuda.matmul.allow_tf32`` and
``torch.backends.cudnn.allow_tf32`` False): on Ampere and later GPUs cuDNN convolutions default to
TF32, so a default "fp32" run is a TF32 run. The TF32 figure is printed beside it, named as such.
Each figure is a steady state (bench/steady.py): warm-up steps (cudnn.benchmark's autotuning), then
at least ``--steps`` steps and ``--seconds`` seconds.

    python bench/pretrain_step.py [--batch 64] [--steps 20] [--backbone tiny_resnet] [--size 32]
    python bench/pretrain_step.py --backbone resnet50 --size 224 --batch 128   # the real-scale step
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script, with or without the project installed
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.steady import Meter, Rate, Window  # noqa: E402
from pipeline.spec import BackboneSpec  # noqa: E402
from trainers.augment import AugmentParams, augment  # noqa: E402
from trainers.backbones import build_backbone  # noqa: E402
from trainers.heads import Encoder, build_head  # noqa: E402
from trainers.loop import autocast, prepare, resolve_precision  # noqa: E402
from trainers.moco import MoCo  # noqa: E402

Views = list[tuple[torch.Tensor, torch.Tensor]]


class Algorithm1(nn.Module):
    """MoCo's pseudocode, line by line: f_k ← f_q; q, k; l_pos, l_neg; CE(logits/t); θ_k EMA; enqueue."""

    def __init__(self, f_q: nn.Module, dim: int, K: int, m: float, t: float):
        super().__init__()
        self.f_q, self.f_k = f_q, copy.deepcopy(f_q)
        for p in self.f_k.parameters():
            p.requires_grad = False
        self.K, self.m, self.t = K, m, t
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.ptr = 0

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor) -> torch.Tensor:
        n = x_q.shape[0]
        q = F.normalize(self.f_q(x_q), dim=1)  # queries: NxC
        with torch.no_grad():
            k = F.normalize(self.f_k(x_k), dim=1)  # keys: NxC
        l_pos = torch.bmm(q.view(n, 1, -1), k.view(n, -1, 1)).view(n, 1)
        l_neg = torch.mm(q, self.queue)
        logits = torch.cat([l_pos, l_neg], dim=1)
        labels = torch.zeros(n, dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits / self.t, labels)
        self._pending = k
        return loss

    @torch.no_grad()
    def after_step(self) -> None:
        for p_q, p_k in zip(self.f_q.parameters(), self.f_k.parameters()):
            p_k.data = p_k.data * self.m + p_q.data * (1.0 - self.m)
        n = self._pending.shape[0]
        self.queue[:, self.ptr:self.ptr + n] = self._pending.T
        self.ptr = (self.ptr + n) % self.K


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for fp32 matmuls and cuDNN convolutions on (True) or off (False) inside the block, the
    flags restored after it. On a CPU the flags exist and change nothing."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def tf32_flags() -> dict[str, bool]:
    """The two TF32 flags as they are now (recorded beside every step figure)."""
    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_views(batch: int, size: int, dev: torch.device, count: int = 4) -> Views:
    """``count`` batches of two MoCo v2 views (N×3×size×size each) of random images, augmented on
    ``dev`` (so the CPU does not spend the check's minutes on it); channels_last on CUDA."""
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(batch * count, 3, size, size, generator=g) * 255).to(torch.uint8).to(dev)
    p = AugmentParams()
    views = [(augment(x, p, size, g), augment(x, p, size, g)) for x in images.split(batch)]
    if dev.type == "cuda":
        views = [(a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last))
                 for a, b in views]
    return views


def encoder(backbone: str, size: int, bn_splits: int = 1) -> tuple[Encoder, int]:
    """A freshly initialised backbone (seed 0) with MoCo v2's MLP head: (encoder, z's width)."""
    torch.manual_seed(0)
    net = build_backbone(BackboneSpec(name=backbone, cifar_stem=size <= 64, bn_splits=bn_splits))
    head, dim = build_head("mlp", net.feat_dim, None, 128)
    return Encoder(net, head), dim


def ours(backbone: str, size: int, dev: torch.device, K: int = 4096,
         hard: tuple[float, float, float] | None = None) -> MoCo:
    """Our MoCo v2 model as the loop prepares it (channels_last and cudnn.benchmark on CUDA)."""
    enc, dim = encoder(backbone, size)
    return prepare(MoCo(enc, dim, K=K, m=0.99, T=0.2, hard=hard), dev).train()


def step_rate(model: nn.Module, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, views: Views,
              window: Window, precision: str = "fp32") -> Rate:
    """Steady-state training steps of ``model`` (SGD, moco's lr and weight decay) on the views in
    turn, the loss from ``step(x_q, x_k)`` (default: the model's own forward); the rate's items are
    images."""
    step = step or model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03, momentum=0.9, weight_decay=1e-4)
    batch = views[0][0].shape[0]

    def steps() -> Iterator[int]:
        i = 0
        while True:
            x_q, x_k = views[i % len(views)]
            with autocast(x_q.device, precision):
                loss = step(x_q, x_k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if hasattr(model, "after_step"):
                model.after_step()
            i += 1
            yield batch

    return Meter(window, size=lambda n: n).run(steps())


def moco_rate(model: MoCo, views: Views, window: Window, precision: str) -> Rate:
    """``step_rate`` of our MoCo model, its shuffle-BN and negatives drawn from a generator of seed 1."""
    g = torch.Generator().manual_seed(1)
    return step_rate(model, lambda a, b: model(a, b, g)[0], views, window, precision)


def step_window(steps: int, seconds: float, warmup: int = 3) -> Window:
    """A step bench's window: ``warmup`` steps, then at least ``steps`` steps and ``seconds``, at most
    10× the steps or 4× the seconds (and 8 s more)."""
    return Window(warmup=warmup, min_batches=steps, min_seconds=seconds, max_batches=10 * steps,
                  max_seconds=4 * seconds + 8)


def compare(backbone: str, size: int, batch: int, window: Window, precision: str = "auto") -> dict[str, dict]:
    """Ours at ``precision`` (auto: bf16 on CUDA, else fp32) with the default TF32 flags, Algorithm 1
    in fp32 with TF32 off, and Algorithm 1 with TF32 on: name → {rate, flags}."""
    dev = device()
    precision = resolve_precision(precision)
    views = make_views(batch, size, dev)
    out = {}
    out[f"ours_{precision}"] = {"rate": moco_rate(ours(backbone, size, dev), views, window, precision),
                                "flags": tf32_flags()}
    plain = [(a.contiguous(), b.contiguous()) for a, b in views]  # Algorithm 1 knows no channels_last
    for name, on in (("algorithm1_fp32_tf32_off", False), ("algorithm1_tf32", True)):
        with tf32(on):
            enc, dim = encoder(backbone, size)
            out[name] = {"rate": step_rate(Algorithm1(enc, dim, K=4096, m=0.99, t=0.2).to(dev).train(), None, plain,
                                           window), "flags": tf32_flags()}
            del enc
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="at least this many timed steps per model")
    ap.add_argument("--seconds", type=float, default=3.0, help="and at least this many seconds")
    ap.add_argument("--backbone", default="tiny_resnet")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--precision", default="auto", help="ours: bf16 | fp16 | fp32 | auto (bf16 on CUDA, else fp32)")
    args = ap.parse_args()
    dev = device()
    res = compare(args.backbone, args.size, args.batch, step_window(args.steps, args.seconds), args.precision)
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"{args.backbone}, batch {args.batch}, {args.size} px, device {dev} ({card}), "
          f"torch threads {torch.get_num_threads()}")
    mine = next(k for k in res if k.startswith("ours_"))
    off, on = res["algorithm1_fp32_tf32_off"]["rate"], res["algorithm1_tf32"]["rate"]
    print(f"{mine} {res[mine]['rate'].per_second:8.1f} img/s   Algorithm 1 fp32 (TF32 off) {off.per_second:8.1f} "
          f"img/s   ratio {res[mine]['rate'].per_second / off.per_second:.2f}x   Algorithm 1 TF32 {on.per_second:8.1f} "
          f"img/s   ratio {res[mine]['rate'].per_second / on.per_second:.2f}x")


if __name__ == "__main__":
    main()
