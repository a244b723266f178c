"""One optimiser step over a backbone's parameters: trainers/optim.py's LARS (foreach, one kernel per
op over all tensors) against the per-tensor loop that SimCLR's lars_optimizer.py runs (the
reference way), with torch's SGD (MoCo's optimiser) as the floor, in one run. Prints ms per step
and the ratios. Gradients are fixed random tensors, so only the update is timed.

    python bench/optimizer_step.py [--backbone resnet50] [--steps 20] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

from pipeline.spec import BackboneSpec
from trainers.backbones import build_backbone
from trainers.optim import build_optimizer, is_bias_or_norm


class LoopLARS:
    """SimCLR's apply_gradients, one tensor at a time, with BN and bias excluded."""

    def __init__(self, params, lr, momentum, weight_decay, eta=1e-3):
        self.params, self.lr, self.m, self.wd, self.eta = params, lr, momentum, weight_decay, eta
        self.bufs = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self):
        for p, v in zip(self.params, self.bufs):
            g = p.grad
            if is_bias_or_norm(p):
                d, trust = g, 1.0
            else:
                d = g + self.wd * p
                wn, dn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                trust = torch.where((wn > 0) & (dn > 0), self.eta * wn / dn, torch.ones_like(wn))
            v.mul_(self.m).add_(d * trust, alpha=self.lr)
            p.sub_(v)


def time_steps(opt, steps: int, dev: torch.device) -> float:
    opt.step()  # warm-up: allocates the momentum buffers
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet50", choices=("tiny_resnet", "resnet18", "resnet50"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def params():
        torch.manual_seed(0)
        ps = [p for p in build_backbone(BackboneSpec(name=args.backbone)).to(dev).parameters()]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-2
        return ps

    ps = params()
    print(f"{args.backbone}: {len(ps)} tensors, {sum(p.numel() for p in ps) / 1e6:.1f} M parameters, {dev}, "
          f"{args.threads} thread(s), {args.steps} steps")
    loop_ps, ours_ps = params(), params()
    rows = {
        "LARS, per-tensor loop (reference)": LoopLARS(loop_ps, 4.8, 0.9, 1e-6),
        "LARS, trainers/optim.py": build_optimizer(ours_ps, "lars", 4.8, 0.9, 1e-6, exclude_bias_norm=True),
        "SGD, torch (MoCo)": build_optimizer(params(), "sgd", 0.03, 0.9, 1e-4),
    }
    ms = {name: time_steps(opt, args.steps, dev) for name, opt in rows.items()}
    # the two LARS ran the same steps on the same gradients: they must agree
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(loop_ps, ours_ps))
    print(f"max |difference| between the two LARS after {args.steps + 1} steps: {diff:.2e}")
    ref = ms["LARS, per-tensor loop (reference)"]
    print(f"{'optimiser':<36} {'ms/step':>9} {'vs reference':>13}")
    for name, t in ms.items():
        print(f"{name:<36} {t:9.2f} {ref / t:12.2f}x")


if __name__ == "__main__":
    main()
