"""Our MoCo v2 training step (trainers/moco.py, as the training loop runs it: autocast to
``--precision``, channels_last and cudnn.benchmark on CUDA, foreach momentum update) against a plain
fp32 transcription of MoCo's Algorithm 1 (He et al. 2020, the paper's pseudocode; moco/builder.py's
per-parameter momentum loop), with the same backbone, MLP head, batch and pre-computed augmented
views, in one run. Prints images/s and the ratio.

    python bench/pretrain_step.py [--batch 64] [--steps 20] [--backbone tiny_resnet] [--size 32]
    python bench/pretrain_step.py --backbone resnet50 --size 224 --batch 64   # the real-scale step
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.spec import BackboneSpec
from trainers.augment import AugmentParams, augment
from trainers.backbones import build_backbone
from trainers.heads import build_head
from trainers.loop import autocast, prepare, resolve_precision
from trainers.heads import Encoder
from trainers.moco import MoCo


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
        q = F.normalize(self.f_q(x_q), dim=1)
        with torch.no_grad():
            k = F.normalize(self.f_k(x_k), dim=1)
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


def timed(model: nn.Module, step, views, steps: int, precision: str = "fp32") -> float:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03, momentum=0.9, weight_decay=1e-4)
    for i in range(3 + steps):
        if i == 3:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x_q, x_k = views[i % len(views)]
        with autocast(x_q.device, precision):
            loss = step(x_q, x_k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(model, "after_step"):
            model.after_step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--backbone", default="tiny_resnet")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--precision", default="auto", help="ours: bf16 | fp16 | fp32 | auto (bf16 on CUDA, else fp32)")
    args = ap.parse_args()
    precision = resolve_precision(args.precision)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(args.batch * 4, 3, args.size, args.size, generator=g) * 255).to(torch.uint8)
    p = AugmentParams()
    views = [(augment(x, p, args.size, g).to(dev), augment(x, p, args.size, g).to(dev)) for x in images.split(args.batch)]

    def encoder() -> tuple[Encoder, int]:
        torch.manual_seed(0)
        backbone = build_backbone(BackboneSpec(name=args.backbone, cifar_stem=args.size <= 64))
        head, dim = build_head("mlp", backbone.feat_dim, None, 128)
        return Encoder(backbone, head), dim

    enc, dim = encoder()
    ours = prepare(MoCo(enc, dim, K=4096, m=0.99, T=0.2), dev).train()
    step_g = torch.Generator().manual_seed(1)
    cl = [(a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last))
          for a, b in views] if dev.type == "cuda" else views
    ours_sps = timed(ours, lambda a, b: ours(a, b, step_g)[0], cl, args.steps, precision)
    enc, dim = encoder()
    ref = Algorithm1(enc, dim, K=4096, m=0.99, t=0.2).to(dev).train()
    ref_sps = timed(ref, ref, views, args.steps)
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"{args.backbone}, batch {args.batch}, {args.size} px, device {dev} ({card}), "
          f"torch threads {torch.get_num_threads()}, ours in {precision}")
    print(f"ours {ours_sps * args.batch:8.1f} img/s   Algorithm 1 (fp32) {ref_sps * args.batch:8.1f} img/s   "
          f"ratio {ours_sps / ref_sps:.2f}x")


if __name__ == "__main__":
    main()
